"""`torchrun --nproc_per_node 2` (gloo, CPU, FSDP2) gives the single-process losses and weights."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from supernet.threads import torch_threads
from tests.float_bounds import U32, adam_ratio_bound, gamma
from supernet.training.tiny import TinyWorld

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def _losses(out: Path, key: str = "loss") -> dict[int, float]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows if key in r}


# Tolerances (derived, so that they hold on any CPU):
# - Losses: each micro-batch (2 windows x 32 tokens) is the same computation in both runs, one
#   thread each; at step 1 they differ only in the order of the sum of 128 non-negative token KLs
#   over tokens and ranks, within gamma_128 of the loss. We allow gamma_(128 + 128 + 259) = 3.1e-5,
#   which also covers another GEMM blocking of the sharded units (dot products of K <= 128 terms,
#   a log-sum-exp over 259 logits, each within gamma_K of their absolute sums). Later steps add the
#   weights' differences: last-bit ones for elements with a real gradient, and at most AdamW's
#   step bound (next comment) for elements whose gradient is at rounding level, which therefore
#   move the loss only to second order.
LOSS_RTOL = gamma(128 + 128 + 259)
# - Weights: AdamW normalises every element by its own gradient history, so an element whose
#   gradient is a near-cancelling sum (at its own rounding level) can take a different step in the
#   two runs, by up to C lr per step whatever the gradients (tests/float_bounds.py). Elementwise that
#   is the only bound that holds on every CPU; the function the weights compute is compared through
#   the losses and the final eval loss, which such elements barely move (their gradient is ~0).


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """One tiny world (corpus, tokenized cache, converted student: ~6 s of CPU) for every case; the
    runs only read it and write under their own tmp_path."""
    return TinyWorld(tmp_path_factory.mktemp("world"))


@pytest.mark.parametrize("trainable,shard_teacher,layers_per_unit,compiled,port", [
    ("mixers", True, 0, False, 29533), ("all", True, 0, False, 29534), ("mixers", False, 0, False, 29535),
    ("mixers", True, 4, False, 29536), ("mixers", True, 2, True, 29537)])
def test_two_process_fsdp_matches_one_process(world, tmp_path, trainable, shard_teacher, layers_per_unit, compiled,
                                              port):
    """`mixers`: frozen shared weights stay unsharded beside per-mixer units; `all`: everything sharded;
    shard_teacher False: every rank holds the whole teacher; layers_per_unit 2: units of two layers,
    student and teacher, each holding mixers that a step's placement leaves unused (4: the whole
    model in one unit, gathered once per step); compiled: the
    shipped GPU configs' `train.compile: true` under FSDP2, with the graphs of one process."""
    # frozen_bf16: the teacher in bf16 as on GPUs, so its FSDP2 units differ in dtype from the student's
    # fused AdamW (as on GPUs) with units of layers: its device-side skip on sharded DTensor weights
    common = dict(train={"max_steps": 3, "micro_batch_size": 2, "frozen_bf16": "true", "trainable": trainable,
                         "compile": compiled, "fused_adamw": "true" if layers_per_unit else "false"},
                  distributed={"shard_teacher": shard_teacher, "layers_per_unit": layers_per_unit},
                  checkpoint={"every": 2, "save_final": True},
                  eval={"at_end": True, "num_sequences": 4, "batch_size": 2})
    # the same global batch of 4 windows: 2 ranks x 1 micro-batch of 2, or 1 process x 2 micro-batches
    two = world.config(tmp_path / "two", train={**common["train"], "grad_accum": 1},
                       **{k: v for k, v in common.items() if k != "train"})
    one = world.config(tmp_path / "one", train={**common["train"], "grad_accum": 2},
                       **{k: v for k, v in common.items() if k != "train"})
    cfg_path = tmp_path / "two.yaml"
    cfg_path.write_text(yaml.safe_dump(two.to_dict()))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "supernet.cli.main", "distill", str(cfg_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "distill: 3 steps" in proc.stdout
    assert f"teacher {'sharded' if shard_teacher else 'replicated'}" in proc.stdout
    assert "fused AdamW unavailable" not in proc.stdout and "refused a device-side skip" not in proc.stdout
    # fused AdamW under FSDP2 clips and steps on the local shards (training/sharded_step.py)
    assert ("fused AdamW and clipping on the local shards" in proc.stdout) == bool(layers_per_unit), proc.stdout[-2000:]
    assert ("one unit per trainable mixer" if layers_per_unit == 0 else f"one unit per {layers_per_unit} layers") \
        in proc.stdout

    if compiled:  # in a fresh process too: dynamo's counters and caches are per process
        one_path = tmp_path / "one.yaml"
        one_path.write_text(yaml.safe_dump(one.to_dict()))
        ref = subprocess.run([sys.executable, "-m", "supernet.cli.main", "distill", str(one_path)], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=600)
        assert ref.returncode == 0, ref.stderr[-3000:]
        # FSDP2's unit hooks sit outside the compiled layers: the same graphs as one process, none eager
        line = [x for x in ref.stdout.splitlines() if x.startswith("torch.compile:")]
        assert line and " 0 frames left eager" in line[0] and line[0] in proc.stdout, (line, proc.stdout[-2000:])
    else:
        from supernet.training.trainer import Trainer

        with torch_threads(1):  # the ranks' OMP_NUM_THREADS: the same GEMM splits in both runs
            Trainer(one).train()
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=LOSS_RTOL, abs=1e-6), (step, a, b)
    ea, eb = _losses(tmp_path / "one", "eval_kl"), _losses(tmp_path / "two", "eval_kl")
    assert ea and sorted(ea) == sorted(eb)
    for step in ea:  # the final weights, compared by what they compute
        assert eb[step] == pytest.approx(ea[step], rel=LOSS_RTOL, abs=1e-6), (step, ea, eb)
    # FSDP2 checkpoints are complete and the final export gathers the full model
    assert (tmp_path / "two" / "checkpoints" / "step-00000002").is_dir()
    from supernet.training.models import load_student

    m1, m2 = load_student(tmp_path / "one" / "final"), load_student(tmp_path / "two" / "final")
    p2 = dict(m2.named_parameters())
    assert sorted(p2) == sorted(name for name, _ in m1.named_parameters())
    step_bound = 2 * adam_ratio_bound(*one.train.betas, 3) * 3 * one.train.lr  # both runs, 3 steps at most lr
    for name, p in m1.named_parameters():
        assert p.shape == p2[name].shape, name
        if trainable == "mixers" and ".mixers." not in name:
            assert torch.equal(p, p2[name]), name  # frozen: both exports hold the initial weights
        else:
            torch.testing.assert_close(p2[name], p, rtol=8 * 3 * U32, atol=step_bound, msg=name)
