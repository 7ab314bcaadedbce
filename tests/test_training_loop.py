"""Stage-1/2 loops on a tiny teacher: learning, offline == online, exact resume, NaN guard, CLI."""
from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from supernet.layout import Placement
from supernet.training.tiny import TinyWorld

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return TinyWorld(tmp_path_factory.mktemp("tiny-world"))


def _trainer(cfg):
    from supernet.training.trainer import Trainer

    return Trainer(cfg)


def _losses(out_dir):
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "loss" in r}  # later lines (a resumed run) win


def test_distillation_lowers_held_out_kl_for_every_mixer(world, tmp_path):
    # SWA starts as a copy of the teacher's attention (window 4 here): it needs small steps
    cfg = world.config(tmp_path / "run",
                       train={"max_steps": 16, "micro_batch_size": 4, "grad_accum": 1, "lr": 5e-3,
                              "train_mixers": ["swa", "gdn", "kda"], "mixer_lr_scale": {"swa": 0.05}},
                       sampling={"presets": ["all-swa", "all-gdn", "all-kda"], "preset_prob": 0.5},
                       loss={"hidden_weight": 0.05},
                       eval={"num_sequences": 8, "at_start": True, "at_end": True})
    t = _trainer(cfg)
    res = t.train()
    before, after = res.evals[0], res.evals[16]
    assert set(before) == {"all-fa", "all-swa", "all-gdn", "all-kda"}
    # all-fa is the converted teacher, frozen: exactly the teacher before and after
    assert before["all-fa"] < 1e-6 and after["all-fa"] < 1e-6
    for m in ("swa", "gdn", "kda"):
        assert before[f"all-{m}"] > 1e-2, before
    assert after["all-swa"] < 0.99 * before["all-swa"], (before, after)  # little to gain in 16 steps
    for m in ("gdn", "kda"):
        assert after[f"all-{m}"] < 0.7 * before[f"all-{m}"], (m, before, after)
    # sampled placements are logged, and the hidden-matching term is active
    rows = _losses(tmp_path / "run")
    assert all(len(Placement.parse(r["placement"])) == 4 for r in rows.values())
    assert all(r["hidden"] > 0 for r in rows.values())
    # only mixer weights moved; the shared weights are the teacher's
    from supernet.training.models import load_student

    init, final = load_student(world.student_dir), t.student
    for name, p in init.named_parameters():
        same = torch.equal(p, dict(final.named_parameters())[name].detach())
        assert same == (".mixers.swa." not in name and ".mixers.gdn." not in name and ".mixers.kda." not in name), name


def test_offline_topk_cache_gives_the_online_loss(world, tmp_path):
    from supernet.training.logit_cache import TopKCache, write_logit_cache
    from supernet.training.models import load_teacher_model

    teacher, tok = load_teacher_model(str(world.teacher_dir))
    vocab = teacher.config.vocab_size
    docs = 24  # the caches and the online runs read the same documents, hence the same windows
    full = write_logit_cache(teacher, tok, [str(world.train)], tmp_path / "full", top_k=vocab, seq_len=32,
                             values_dtype="float32", shard_sequences=64, max_documents=docs, progress=False)
    small = write_logit_cache(teacher, tok, [str(world.train)], tmp_path / "k8", top_k=8, seq_len=32,
                              shard_sequences=64, max_documents=docs, progress=False)
    assert full["num_sequences"] == small["num_sequences"] > 128  # several shards
    assert small["bytes_per_token"] == 8 * (2 + 2) + 9
    # the cache stores the same windows as the training data
    cache = TopKCache(tmp_path / "k8")
    from supernet.training.data import PackedDataset, build_token_stream

    ds = PackedDataset(build_token_stream([str(world.train)], tok, tmp_path / "dc", max_documents=docs,
                                          progress=False), 32)
    a, b = ds.get([0, 17, 5]), cache.get([0, 17, 5])
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.mask, b.mask)

    placement = Placement.parse("gdn,swa,kda,fa")
    losses = {}
    for name, teacher_cfg in {
        "online": {"source": "online"},
        "self-fa": {"source": "self-fa"},
        "full": {"source": "offline", "cache_dir": str(tmp_path / "full")},
        "k8": {"source": "offline", "cache_dir": str(tmp_path / "k8")},
    }.items():
        cfg = world.config(tmp_path / name, teacher=teacher_cfg, train={"train_mixers": ["swa", "gdn", "kda"]},
                           data={"max_documents": docs})
        losses[name] = _trainer(cfg).train_step(placement)["loss"]
    assert losses["full"] == pytest.approx(losses["online"], rel=1e-5, abs=1e-6)
    assert losses["self-fa"] == pytest.approx(losses["online"], rel=1e-5, abs=1e-6)
    # top-8 of 259: the bucketed KL is a lower bound that keeps most of the divergence
    assert 0.5 * losses["online"] < losses["k8"] <= losses["online"] * (1 + 1e-4)


def test_kill_and_resume_reproduces_the_uninterrupted_losses(world, tmp_path):
    # cheap mixers per layer plus an all-gdn preset: exercises the sampler state and optimizer
    # state of mixers first used after the restart
    sections = dict(train={"max_steps": 7}, checkpoint={"every": 2, "keep_last": 2},
                    sampling={"mixers": ["fa", "swa"], "presets": ["all-gdn"], "preset_prob": 0.3})
    _trainer(world.config(tmp_path / "a", **sections)).train()
    crashed = _trainer(world.config(tmp_path / "b", **sections))
    crashed.train(stop_at_step=3)  # dies after step 3; the last checkpoint is step 2
    del crashed
    resumed = _trainer(world.config(tmp_path / "b", **sections))
    assert resumed.step == 2
    resumed.train()
    a, b = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert sorted(a) == sorted(b) == list(range(1, 8))
    for step in a:
        assert a[step]["loss"] == b[step]["loss"], step
        assert a[step]["placement"] == b[step]["placement"]
    assert any(a[s]["placement"] == "gdn,gdn,gdn,gdn" for s in range(3, 8))
    ckpts = sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir())
    assert ckpts == ["step-00000006", "step-00000007"]  # keep_last = 2, no temp folders left


@pytest.mark.parametrize("fused", ["false", "true"])
def test_nan_loss_stops_before_the_update_and_keeps_the_last_good_checkpoint(world, tmp_path, fused):
    """fused: AdamW's fused kernel is enqueued before the host sees the loss and skips the update
    on the device (found_inf); for-each: the host checks first. Either way nothing changes."""
    from supernet.training.trainer import TrainingDiverged

    t = _trainer(world.config(tmp_path / "r", train={"max_steps": 6, "fused_adamw": fused}, checkpoint={"every": 1},
                              sampling={"mixers": ["fa", "swa"]}))
    assert t.skip_on_device == (fused == "true")
    real_forward = t.module.forward

    def poisoned(*args, **kwargs):
        loss, stats = real_forward(*args, **kwargs)
        return (loss * float("nan") if t.step == 2 else loss), stats

    t.module.forward = poisoned
    with pytest.raises(TrainingDiverged, match=r"loss became nan .* at step 2 .*step-00000002"):
        t.train()
    assert t.step == 2
    names = sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir())
    assert names[-1] == "step-00000002"
    assert all(torch.isfinite(p).all() for p in t.student.parameters())
    # the weights and AdamW's state are those of the last good step: a fresh run to step 2 has them
    t2 = _trainer(world.config(tmp_path / "r2", train={"max_steps": 2, "fused_adamw": fused},
                               sampling={"mixers": ["fa", "swa"]}))
    t2.train()
    for (name, a), b in zip(t.student.named_parameters(), t2.student.parameters()):
        assert torch.equal(a, b), name
    for a, b in zip(t.optimizer.state.values(), t2.optimizer.state.values()):
        assert all(torch.equal(a[k], b[k]) for k in ("step", "exp_avg", "exp_avg_sq"))


def test_sft_on_chat_data_learns_the_assistant_replies(world, tmp_path):
    cfg = world.config(tmp_path / "sft", stage="sft",
                       data={"train": [str(world.chat)], "eval": [str(world.chat)], "format": "chat"},
                       loss={"kl_weight": 0.0, "ce_weight": 1.0},
                       train={"trainable": "all", "max_steps": 12, "lr": 3e-3, "micro_batch_size": 4,
                              "grad_accum": 1},
                       eval={"at_start": True, "at_end": True, "placements": ["all-fa", "all-gdn"]},
                       checkpoint={"save_final": True})
    res = _trainer(cfg).train()
    assert res.evals[12]["all-fa"] < res.evals[0]["all-fa"]
    assert res.evals[12]["all-gdn"] < res.evals[0]["all-gdn"]
    # the result is a supernet checkpoint the rest of the system can load
    from supernet.training.models import load_student

    model = load_student(res.final_dir)
    assert model(torch.tensor([[1, 2, 3]]), placement="all-kda", use_cache=False).logits.shape[-1] == 259


def test_cli_distill_and_cache_logits(world, tmp_path):
    from typer.testing import CliRunner

    from supernet.cli.main import app

    cfg = world.config(tmp_path / "cli", train={"max_steps": 2}, eval={"at_end": True})
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    runner = CliRunner()
    r = runner.invoke(app, ["distill", str(path), "--set", "train.max_steps=3"])
    assert r.exit_code == 0, r.output
    assert "distill: 3 steps" in r.output and "held-out KL" in r.output
    assert (tmp_path / "cli" / "checkpoints" / "step-00000003").is_dir()

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**cfg.to_dict(), "loss": {"kl_wieght": 1.0}}))
    r = runner.invoke(app, ["distill", str(bad)])
    assert r.exit_code == 2 and "unknown config key 'loss.kl_wieght'" in r.output
    assert "Traceback" not in r.output

    r = runner.invoke(app, ["cache-logits", str(world.teacher_dir), str(world.eval), str(tmp_path / "c"),
                            "--top-k", "4", "--seq-len", "32", "--max-sequences", "5"])
    assert r.exit_code == 0, r.output
    index = json.loads((tmp_path / "c" / "index.json").read_text())
    assert index["num_sequences"] == 5 and index["top_k"] == 4 and "bytes/token" in r.output
    r = runner.invoke(app, ["cache-logits", str(world.teacher_dir), str(world.eval), str(tmp_path / "c"),
                            "--top-k", "0"])
    assert r.exit_code == 2 and "--top-k" in r.output


def test_placements_without_a_trainable_mixer_are_skipped(world, tmp_path):
    cfg = world.config(tmp_path / "skip", train={"train_mixers": ["gdn"], "max_steps": 2},
                       sampling={"mixers": ["fa", "gdn"], "presets": ["all-fa"], "preset_prob": 0.8})
    t = _trainer(cfg)
    drawn = [t.next_placement() for _ in range(20)]
    assert all("gdn" in p for p in drawn)
    t.train()  # an all-fa draw would have nothing to back-propagate into
    assert t.step == 2


def test_bf16_teacher_keeps_fp32_rope_frequencies(world, tmp_path):
    t = _trainer(world.config(tmp_path / "bf16", train={"frozen_bf16": "true"}))
    teacher = t.pair.teacher
    assert teacher.lm_head.weight.dtype == torch.bfloat16
    assert teacher.model.rotary_emb.inv_freq.dtype == torch.float32  # rounding it moves RoPE angles
    assert math.isfinite(t.train_step(Placement.parse("gdn,swa,kda,swa"))["loss"])
