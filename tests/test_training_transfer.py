"""Issue 17: the layer-local transfer stage, the stage-1 activation loss, KL mixtures, the
full_layout / targeted samplers and targeted SFT, on the tiny teacher (CPU, seconds each)."""
from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch

from supernet.layout import Placement
from supernet.threads import torch_threads
from supernet.training.tiny import TinyWorld
from tests.float_bounds import U64, gamma


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return TinyWorld(tmp_path_factory.mktemp("tiny-world-transfer"))


def _models(world, swa_window: int = 4, dtype=torch.float32):
    from supernet.convert import supernet_from_teacher
    from supernet.training.models import load_teacher_model

    teacher, _ = load_teacher_model(str(world.teacher_dir))
    torch.manual_seed(0)
    student = supernet_from_teacher(teacher, swa_window=swa_window)
    return teacher.to(dtype), student.to(dtype)


def _ids(world, b: int = 2, t: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (b, t), generator=g)


def _pair(student, teacher, mode, mixers, **kw):
    from supernet.training.losses import LossSpec
    from supernet.training.transfer import TransferPair

    return TransferPair(student, teacher, mode, LossSpec(), mixers, **kw)


# ---------------------------------------------------------------------------------------------
# the transfer loss
# ---------------------------------------------------------------------------------------------
def test_the_teachers_own_attention_has_exactly_zero_transfer_loss(world):
    """self-fa: the target *is* the fa mixer on the same input, so the loss is exactly 0.0."""
    from supernet.training.transfer import activation_loss

    from supernet.training.models import set_trainable

    _, student = _models(world)
    set_trainable(student, "mixers", ["swa"])
    pair = _pair(student, None, "self-fa", ["swa"])
    ids = _ids(world)
    xs, ys = pair.teacher_io(ids)
    pos = torch.arange(ids.shape[1]).unsqueeze(0).expand(ids.shape[0], -1)
    emb = student.model.rotary_emb(xs[0], pos)
    w = torch.full(ids.shape, 1.0 / ids.numel())
    for i, layer in enumerate(student.model.layers):
        assert activation_loss(layer.mixers["fa"](xs[i], emb, None), ys[i], w).item() == 0.0


@pytest.mark.parametrize("mixer", ["fa", "swa"])
def test_a_mixer_equal_to_the_hf_teachers_attention_has_zero_transfer_loss(world, mixer):
    """Online HF teacher, float64: FA and SWA with a window covering the sequence compute the
    teacher's attention by other kernels; the loss is rounding only.

    Bound: each output element is a chain of dot products (q/k/v projections over D terms, scores
    over the head dim, P V over T terms, o_proj over D terms), so its relative error is at most
    about gamma_{2D + hd + T} times the condition of the last sum (sum |W_o| |a| / |y|); both
    computations err, hence the factor 2, and a factor 8 covers the softmax's exp/normalise steps.
    The nmse is the squared relative error: a wrong mask, RoPE or window gives ~1e-2 instead.
    """
    from supernet.training.transfer import activation_loss, capture_io, teacher_attention_modules

    t = 32
    teacher, student = _models(world, swa_window=t, dtype=torch.float64)
    ids = _ids(world, t=t)
    with torch.no_grad(), capture_io(teacher_attention_modules(teacher, False)) as (xs, ys):
        teacher.model(input_ids=ids, use_cache=False)
    pos = torch.arange(t).unsqueeze(0).expand(ids.shape[0], -1)
    cfg = student.config
    d, hd = cfg.hidden_size, cfg.hidden_size // cfg.num_attention_heads
    w = torch.full(ids.shape, 1.0 / ids.numel(), dtype=torch.float64)
    with torch.no_grad():
        emb = student.model.rotary_emb(xs[0], pos)
        for i, layer in enumerate(student.model.layers):
            mod = layer.mixers[mixer]
            got = mod(xs[i], emb, None)
            # condition of the final projection, per token: sum_j |W_o,ij| |a_j| over |y_i|
            a = got  # the output itself; cond from the o_proj weights and pre-projection values
            o_proj = [m for n, m in mod.named_modules() if n.endswith("o_proj")][0]
            pre = {}
            h = o_proj.register_forward_hook(lambda m, inp, out: pre.setdefault("a", inp[0]))
            mod(xs[i], emb, None)
            h.remove()
            cond = ((pre["a"].abs() @ o_proj.weight.abs().t()).norm(dim=-1) / ys[i].norm(dim=-1)).max().item()
            rel = 2 * 8 * gamma(2 * d + hd + t, U64) * cond
            nmse = activation_loss(a, ys[i], w).item()  # mean over tokens of the squared relative error
            assert nmse <= rel**2, (i, nmse, rel**2)


def test_gradients_reach_only_the_trainable_mixers_of_every_layer(world):
    from supernet.training.models import set_trainable

    teacher, student = _models(world)
    teacher.requires_grad_(False)
    set_trainable(student, "mixers", ["gdn", "kda"])  # swa listed for transfer but frozen
    pair = _pair(student, teacher, "online", ["swa", "gdn", "kda"], layers_per_chunk=3, use_checkpoint=True)
    assert pair.pairs == [(i, m) for i in range(4) for m in ("gdn", "kda")]
    ids = _ids(world)
    loss, stats = pair(input_ids=ids, token_weight=torch.full(ids.shape, 1.0 / ids.numel()))
    assert loss.item() > 0 and stats["act"].item() == loss.item()
    loss.backward()
    for name, p in student.named_parameters():
        parts = name.split(".")
        mixer = parts[parts.index("mixers") + 1] if "mixers" in parts else None
        if mixer in ("gdn", "kda"):
            assert p.grad is not None, name
        else:
            assert p.grad is None, name
    assert all(p.grad is None for p in teacher.parameters())
    # every layer's trainable mixers receive a gradient (nothing routed through a placement)
    for i in range(4):
        for m in ("gdn", "kda"):
            g = sum(float(p.grad.abs().sum()) for p in student.model.layers[i].mixers[m].parameters()
                    if p.grad is not None)
            assert g > 0, (i, m)


def test_chunks_and_checkpointing_do_not_change_the_loss_or_gradients(world):
    from supernet.training.models import set_trainable

    teacher, student = _models(world)
    set_trainable(student, "mixers", ["swa", "gdn"])
    ids = _ids(world)
    w = torch.full(ids.shape, 1.0 / ids.numel())
    results = []
    for chunk, ckpt in ((0, False), (1, True), (3, True)):
        student.zero_grad(set_to_none=True)
        loss, _ = _pair(student, teacher, "online", ["swa", "gdn"], layers_per_chunk=chunk, use_checkpoint=ckpt)(
            input_ids=ids, token_weight=w)
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in student.parameters() if p.grad is not None]))
    ref_loss, ref_grads = results[0]
    for loss_v, grads in results[1:]:
        # the same ops on the same inputs; only the summation order over chunks differs (a few
        # float32 additions of 8 positive terms)
        assert math.isclose(loss_v, ref_loss, rel_tol=gamma(8))
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# the stage through the trainer
# ---------------------------------------------------------------------------------------------
def _transfer_cfg(world, out, **sections):
    base = dict(stage="transfer", train={"max_steps": 4, "grad_accum": 1, "train_mixers": ["gdn"]},
                transfer={"mixers": ["gdn"]},
                checkpoint={"every": 2, "keep_last": 2})
    for k, v in sections.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
    return world.config(out, **base)


def _metrics(out: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "loss" in r}


@pytest.mark.slow  # a few Trainer runs (about 10-20 s on an idle 2-core machine)
def test_transfer_kill_and_resume_reproduces_the_uninterrupted_run(world, tmp_path):
    from supernet.training.trainer import Trainer

    sections = dict(transfer={"layers_per_chunk": 2, "checkpoint": True})
    Trainer(_transfer_cfg(world, tmp_path / "a", **sections)).train()
    crashed = Trainer(_transfer_cfg(world, tmp_path / "b", **sections))
    crashed.train(stop_at_step=3)  # dies after step 3; the last checkpoint is step 2
    del crashed
    resumed = Trainer(_transfer_cfg(world, tmp_path / "b", **sections))
    assert resumed.step == 2
    resumed.train()
    a, b = _metrics(tmp_path / "a"), _metrics(tmp_path / "b")
    assert sorted(a) == sorted(b) == list(range(1, 5))
    for step in a:
        assert a[step]["loss"] == b[step]["loss"], step
        assert a[step]["act"] == a[step]["loss"]
    assert a[4]["loss"] < a[1]["loss"]  # it learns
    # a changed transfer key that alters the computation is refused on resume
    from supernet.training.config import ConfigError

    with pytest.raises(ConfigError, match="resume refused: transfer.loss"):
        Trainer(_transfer_cfg(world, tmp_path / "b", transfer={"loss": "mse"}, train={"max_steps": 6}))


@pytest.mark.slow  # a few Trainer runs (about 10-20 s on an idle 2-core machine)
def test_transfer_evaluates_held_out_kl_per_placement(world, tmp_path):
    from supernet.training.trainer import Trainer

    cfg = _transfer_cfg(world, tmp_path / "e", train={"max_steps": 1}, checkpoint={"every": 0},
                        eval={"at_start": True, "at_end": True, "placements": ["all-fa", "all-gdn"]})
    r = Trainer(cfg).train()
    assert set(r.evals[0]) == {"all-fa", "all-gdn"}
    assert r.evals[0]["all-fa"] < 1e-5 < r.evals[0]["all-gdn"]  # the converted fa is the teacher


@pytest.mark.parametrize("sections, message", [
    (dict(transfer={"mixers": ["fa", "gdn"]}), "transfer.mixers lists fa"),
    (dict(transfer={"mixers": ["swa"]}), "no mixer of transfer.mixers"),
    (dict(teacher={"source": "offline", "cache_dir": "x"}), "stage transfer needs the teacher's hidden states"),
    (dict(train={"trainable": "all"}), "train.trainable: mixers"),
    (dict(transfer={"layers_per_chunk": -1}), "transfer.layers_per_chunk must be >= 0"),
    (dict(transfer={"loss": "l1"}), "config key 'transfer.loss' is 'l1'"),
    (dict(transfer={"mixer": ["gdn"]}), "unknown config key 'transfer.mixer'"),
    (dict(loss={"kl_mix": 1.5}), "loss.kl_mix must lie in [0, 1]"),
    (dict(loss={"activation_weight": -1.0}), "loss.activation_weight must be >= 0"),
])
def test_bad_transfer_config_is_one_line(world, tmp_path, sections, message):
    from supernet.training.config import ConfigError

    with pytest.raises(ConfigError) as exc:
        _transfer_cfg(world, tmp_path / "x", **sections)
    assert message in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.slow
def test_transfer_sigterm_checkpoints_and_resume_gives_the_uninterrupted_losses(world, tmp_path):
    """The real CLI: SIGTERM after a step, exit 75, the same command resumes bit for bit."""
    import subprocess
    import sys

    import yaml

    from supernet.training.preemption import PREEMPTED_EXIT_CODE
    from tests.helpers.processes import sigterm_after_records

    def write(name):
        cfg = _transfer_cfg(world, tmp_path / name, train={"max_steps": 5}, checkpoint={"every": 0})
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg.to_dict()))
        return path

    ref, cut = write("ref"), write("cut")
    assert subprocess.run([sys.executable, "-m", "supernet.cli.main", "transfer", str(ref)],
                          capture_output=True).returncode == 0
    code, output = sigterm_after_records("transfer", cut, tmp_path / "cut" / "metrics.jsonl")
    assert code == PREEMPTED_EXIT_CODE, output
    assert "transfer: stopped by SIGTERM" in output and "Traceback" not in output
    r = subprocess.run([sys.executable, "-m", "supernet.cli.main", "transfer", str(cut)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    a, b = _metrics(tmp_path / "ref"), _metrics(tmp_path / "cut")
    assert sorted(a) == sorted(b) == list(range(1, 6))
    assert all(a[s]["loss"] == b[s]["loss"] for s in a)


# ---------------------------------------------------------------------------------------------
# stage 1: activation loss, KL mixtures, samplers; stage 2: targeted SFT
# ---------------------------------------------------------------------------------------------
def test_activation_loss_joins_the_logit_loss_and_trains_the_sampled_mixers(world):
    from supernet.training.engine import DistillPair
    from supernet.training.losses import LossSpec
    from supernet.training.models import set_trainable
    from supernet.training.transfer import activation_loss, capture_io, teacher_attention_modules

    teacher, student = _models(world)
    set_trainable(student, "mixers", ["gdn"])
    ids = _ids(world)
    w = torch.full(ids.shape, 1.0 / ids.numel())
    placement = Placement.parse("fa,gdn,fa,gdn", 4)
    plain = DistillPair(student, teacher, "online", LossSpec())
    with_act = DistillPair(student, teacher, "online", LossSpec(), activation_weight=0.8)
    l0, s0 = plain(input_ids=ids, token_weight=w, placement=placement)
    l1, s1 = with_act(input_ids=ids, token_weight=w, placement=placement)
    # the activation term, recomputed by hand: sampled mixer on the student's input vs teacher attention
    with torch.no_grad(), capture_io(teacher_attention_modules(teacher, False), want_inputs=False) as (_, ys):
        teacher.model(input_ids=ids, use_cache=False)
    with torch.no_grad(), capture_io([l.mixers[m] for l, m in zip(student.model.layers, placement)],
                                     want_inputs=False) as (_, outs):
        student.model(input_ids=ids, placement=placement, use_cache=False)
    want = sum(activation_loss(o, y, w) for o, y in zip(outs, ys)) / 4
    assert math.isclose(s1["act"].item(), want.item(), rel_tol=1e-6)
    assert math.isclose(l1.item(), l0.item() + 0.8 * want.item(), rel_tol=1e-6)
    assert s0["act"].item() == 0.0 and s1["act"].item() > 0
    # layers 0 and 2 run fa (exact copies of the teacher's input there: zero at layer 0)
    assert activation_loss(outs[0], ys[0], w).item() == pytest.approx(0.0, abs=1e-10)
    l1.backward()
    assert all(p.grad is not None for p in student.model.layers[1].mixers["gdn"].parameters())


def test_kl_mix_is_the_weighted_sum_of_forward_and_reverse_kl():
    from supernet.training.losses import LossSpec, fused_lm_head_loss, reference_logit_loss

    g = torch.Generator().manual_seed(0)
    h, th = torch.randn(20, 16, generator=g), torch.randn(20, 16, generator=g)
    w = torch.randn(50, 16, generator=g)
    tw = torch.full((20,), 1 / 20)
    vals = {}
    for kind, mix in (("fkl", 0.5), ("rkl", 0.5), ("mix", 0.3)):
        spec = LossSpec(kind, 1.5, 1.0, 0.0, 7, kl_mix=mix)
        hh = h.clone().requires_grad_(True)
        out = fused_lm_head_loss(hh, w, tw, spec, teacher_hidden=th, teacher_weight=w)
        ref = reference_logit_loss(hh @ w.t(), tw, spec, teacher_logits=th @ w.t())
        torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-7)
        (g1,) = torch.autograd.grad(out.loss, hh)
        (g2,) = torch.autograd.grad(ref, hh)
        torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-7)
        vals[kind] = out.loss.item()
    assert vals["mix"] == pytest.approx(0.7 * vals["fkl"] + 0.3 * vals["rkl"], rel=1e-5)


def test_full_layout_makes_every_split_of_counts_equally_likely():
    from supernet.training.sampling import PlacementSampler

    layers, mixers, n = 4, ["fa", "swa", "gdn"], 15000
    s = PlacementSampler(layers, mixers, "full_layout", seed=1)
    splits, arrangements = Counter(), Counter()
    for _ in range(n):
        p = s.sample()
        splits[tuple(list(p).count(m) for m in mixers)] += 1
        if splits and tuple(list(p).count(m) for m in mixers) == (1, 1, 2):
            arrangements[p] += 1
    k = math.comb(layers + len(mixers) - 1, len(mixers) - 1)  # 15 splits
    assert len(splits) == k
    # seeded, so deterministic; 5 binomial standard deviations around n / k
    sd = math.sqrt(n * (1 / k) * (1 - 1 / k))
    assert all(abs(c - n / k) < 5 * sd for c in splits.values()), splits
    # all-gdn is as likely as any split (uniform sampling: 3^-4 of the draws, about 185)
    assert splits[(0, 0, 4)] > n / k - 5 * sd
    # then the arrangement is uniform: the 12 orders of split (1, 1, 2)
    m = sum(arrangements.values())
    assert len(arrangements) == 12
    sd2 = math.sqrt(m * (1 / 12) * (11 / 12))
    assert all(abs(c - m / 12) < 5 * sd2 for c in arrangements.values()), arrangements


def test_full_layout_sampler_state_resumes_the_same_sequence():
    from supernet.training.sampling import PlacementSampler

    a = PlacementSampler(6, ["swa", "gdn", "kda"], "full_layout", seed=3)
    [a.sample() for _ in range(5)]
    b = PlacementSampler(6, ["swa", "gdn", "kda"], "full_layout", seed=99)
    b.load_state_dict(a.state_dict())
    assert [a.sample() for _ in range(20)] == [b.sample() for _ in range(20)]


def test_targeted_sampling_oversamples_the_presets_of_a_presets_file(tmp_path):
    from supernet.layout import save_presets
    from supernet.training.config import SamplingConfig
    from supernet.training.sampling import build_sampler

    presets = {"fast": Placement.parse("gdn,gdn,gdn,gdn", 4), "mid": Placement.parse("fa,gdn,swa,kda", 4),
               "slow": Placement.parse("fa,fa,fa,gdn", 4)}
    path = tmp_path / "presets.json"
    save_presets(path, presets)
    cfg = SamplingConfig(strategy="targeted", base="full_layout", presets_file=str(path), preset_prob=0.5)
    s = build_sampler(cfg, 4, seed=0)
    draws = [s.sample() for _ in range(4000)]
    hits = sum(d in presets.values() for d in draws)
    # P(preset) = 0.5 + 0.5 * P(base draws one of them) (about 3 of 256 placements x split weights)
    assert 0.46 * 4000 < hits < 0.6 * 4000
    # targeted SFT: name chosen presets of the file; only those are drawn with preset_prob 1
    chosen = build_sampler(SamplingConfig(strategy="targeted", presets=["fast", "mid"], presets_file=str(path),
                                          preset_prob=1.0), 4, seed=0)
    assert {chosen.sample() for _ in range(200)} == {presets["fast"], presets["mid"]}


def test_targeted_sampling_without_presets_is_one_line(world, tmp_path):
    from supernet.training.config import ConfigError

    with pytest.raises(ConfigError, match="sampling.strategy targeted needs"):
        world.config(tmp_path / "x", sampling={"strategy": "targeted"})


@pytest.mark.slow  # a few Trainer runs (about 10-20 s on an idle 2-core machine)
def test_targeted_sft_trains_only_the_chosen_presets_mixers(world, tmp_path):
    """Stage 2 on chat data, placements only from two named presets, mixer weights only."""
    from supernet.layout import save_presets
    from supernet.training.trainer import Trainer

    path = tmp_path / "presets.json"
    save_presets(path, {"fast": Placement.parse("gdn,gdn,gdn,gdn", 4),
                        "mid": Placement.parse("fa,gdn,swa,gdn", 4), "other": Placement.parse("kda,kda,kda,kda", 4)})
    cfg = world.config(tmp_path / "sft", stage="sft", data={"train": [str(world.chat)], "eval": [], "format": "chat"},
                       loss={"kl_weight": 0.0, "ce_weight": 1.0},
                       sampling={"strategy": "targeted", "presets": ["fast", "mid"], "presets_file": str(path),
                                 "preset_prob": 1.0},
                       train={"max_steps": 3, "trainable": "mixers", "train_mixers": ["swa", "gdn", "kda"]})
    tr = Trainer(cfg)
    before = {n: p.detach().clone() for n, p in tr.student.named_parameters()}
    tr.train()
    placements = {r["placement"] for r in _metrics(tmp_path / "sft").values()}
    assert placements <= {"gdn,gdn,gdn,gdn", "fa,gdn,swa,gdn"}
    for n, p in tr.student.named_parameters():
        changed = not torch.equal(before[n], p.detach())
        if ".mixers.kda." in n or ".mixers.fa." in n or ".mixers." not in n:
            assert not changed, n  # kda is in no chosen preset; fa and the shared weights are frozen


def test_the_cpu_ablation_result_is_committed_and_consistent():
    """benchmarks/results/distill_recipe_cpu.json (bench_distill_recipe.py): equal tokens per arm,
    held-out KL of all-swa/gdn/kda per arm, and the reported all-gdn change matches the arms."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "distill_recipe_cpu.json"
    data = json.loads(path.read_text())
    names = {"e2e", "transfer+e2e", "e2e+act", "transfer+e2e+act"}
    assert len(data["arms"]) == len(names) * len(data["seeds"])
    assert len({a["tokens"] for a in data["arms"]}) == 1  # equal token budget
    for a in data["arms"]:
        assert a["arm"] in names and a["transfer_steps"] + a["e2e_steps"] == data["steps_per_arm"]
        for p in ("all-swa", "all-gdn", "all-kda"):
            assert a["held_out_kl"][p] > 0 and 0 < a["retention"][p] < 1

    def mean(arm):
        vals = [a["held_out_kl"]["all-gdn"] for a in data["arms"] if a["arm"] == arm]
        return sum(vals) / len(vals)

    assert data["all_gdn_kl_change_transfer_vs_e2e"] == pytest.approx(mean("transfer+e2e") / mean("e2e") - 1)

@pytest.mark.slow
def test_transfer_under_two_process_fsdp2_matches_one_process(world, tmp_path):
    """torchrun, 2 CPU ranks (gloo), one FSDP2 unit per mixer, teacher sharded: the transfer losses
    equal one process's with the same global batch (2 ranks x 1 micro-batch vs 2 micro-batches).
    Tolerance as in tests/test_training_distributed.py: the per-token sums of one micro-batch are
    the same computation; only their order over ranks differs, plus GEMM blocking of dot products
    of at most 128 terms."""
    import os
    import subprocess
    import sys

    import yaml

    from supernet.training.trainer import Trainer

    repo = Path(__file__).resolve().parents[1]
    common = dict(checkpoint={"every": 0, "save_final": False}, distributed={"layers_per_unit": 0})
    two = _transfer_cfg(world, tmp_path / "two", train={"max_steps": 3, "grad_accum": 1}, **common)
    one = _transfer_cfg(world, tmp_path / "one", train={"max_steps": 3, "grad_accum": 2}, **common)
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(two.to_dict()))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29551",
           "-m", "supernet.cli.main", "transfer", str(path)]
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "FSDP2 over 2 ranks" in proc.stdout and "transfer: 3 steps" in proc.stdout
    with torch_threads(1):
        Trainer(one).train()
    a, b = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for s in a:
        assert b[s]["loss"] == pytest.approx(a[s]["loss"], rel=gamma(128 + 128 + 64), abs=1e-7), (s, a[s], b[s])


@pytest.mark.slow
def test_compiled_transfer_matches_eager(world, tmp_path):
    """train.compile in stage transfer compiles the trained mixer modules; the losses equal the
    eager run's to the tolerance of tests/test_training_compile.py (inductor fuses and reorders
    float32 sums; AdamW then carries those last-bit differences into later steps)."""
    from supernet.training.compile import compile_stats
    from supernet.training.trainer import Trainer

    runs = {}
    for comp in (False, True):
        cfg = _transfer_cfg(world, tmp_path / f"c{int(comp)}", train={"max_steps": 3, "compile": comp},
                            checkpoint={"every": 0})
        runs[comp] = Trainer(cfg).train().losses
    for s in runs[False]:
        assert math.isclose(runs[True][s], runs[False][s], rel_tol=2e-4, abs_tol=1e-6), (s, runs)
    assert compile_stats()["failed_frames"] == 0
