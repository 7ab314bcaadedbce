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

from tests.helpers.world import TinyWorld

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def _losses(out: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.parametrize("trainable,shard_teacher,layers_per_unit,compiled,port", [
    ("mixers", True, 0, False, 29533), ("all", True, 0, False, 29534), ("mixers", False, 0, False, 29535),
    ("mixers", True, 4, False, 29536), ("mixers", True, 2, True, 29537)])
def test_two_process_fsdp_matches_one_process(tmp_path, trainable, shard_teacher, layers_per_unit, compiled, port):
    """`mixers`: frozen shared weights stay unsharded beside per-mixer units; `all`: everything sharded;
    shard_teacher False: every rank holds the whole teacher; layers_per_unit 2: units of two layers,
    student and teacher, each holding mixers that a step's placement leaves unused (4: the whole
    model in one unit, gathered once per step); compiled: the
    shipped GPU configs' `train.compile: true` under FSDP2, with the graphs of one process."""
    world = TinyWorld(tmp_path / "world")
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

        Trainer(one).train()
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), (step, a, b)
    # FSDP2 checkpoints are complete and the final export gathers the full model
    assert (tmp_path / "two" / "checkpoints" / "step-00000002").is_dir()
    from supernet.training.models import load_student

    m1, m2 = load_student(tmp_path / "one" / "final"), load_student(tmp_path / "two" / "final")
    p2 = dict(m2.named_parameters())
    for name, p in m1.named_parameters():
        assert torch.allclose(p, p2[name], atol=1e-5), name
