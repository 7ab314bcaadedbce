"""Training that survives preemption and bad input: signals, resume checks, one-line errors,
pickle-free checkpoints, run plots. Everything runs the real `supernet` CLI on a tiny CPU setup."""
from __future__ import annotations

import json
import os
import pickle
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from supernet.cli.main import app
from supernet.training.preemption import PREEMPTED_EXIT_CODE
from tests.helpers.processes import sigterm_after_records

# `lr: 3e-3` is written the way users write it: YAML 1.1 reads it as a string
CONFIG = """\
stage: distill
out_dir: {out}
seed: 0
teacher: {{source: online, path: "builtin:tiny-llama"}}
student: {{path: {student}, overrides: {{swa_window: 4}}}}
data: {{train: [{data}/train.jsonl], eval: [{data}/eval.jsonl], seq_len: 32, cache_dir: {data}/cache}}
loss: {{chunk_tokens: 64, hidden_weight: 0.05}}
sampling: {{mixers: [fa, swa, gdn, kda], presets: [all-gdn], preset_prob: 0.3}}
train:
  train_mixers: [swa, gdn, kda]
  micro_batch_size: 2
  grad_accum: 1
  max_steps: {steps}
  lr: 3e-3
  warmup_steps: 2
  device: cpu
eval: {{every: {eval_every}, num_sequences: 2, batch_size: 2, at_start: {at_start}, at_end: false}}
checkpoint: {{every: {ckpt_every}, keep_last: 3, save_final: false}}
log: {{progress: false}}
"""


def _corpus(d: Path) -> Path:
    rng = random.Random(0)
    words = "the cat dog river stone sees finds holds red quiet small one two three".split()
    d.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", 24), ("eval", 4)):
        (d / f"{name}.jsonl").write_text("".join(
            json.dumps({"text": " ".join(rng.choice(words) for _ in range(60))}) + "\n" for _ in range(n)))
    return d


def _config(tmp: Path, name: str, out: Path, steps: int, student: str = "null", eval_every: int = 0,
            at_start: str = "false", ckpt_every: int = 0) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(CONFIG.format(out=out, student=student, data=tmp / "data", steps=steps, eval_every=eval_every,
                                  at_start=at_start, ckpt_every=ckpt_every))
    return path


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _losses(out: Path) -> dict[int, tuple[float, str]]:
    rows = [r for r in _records(out) if "loss" in r]
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), f"metrics.jsonl repeats steps: {steps}"
    return {r["step"]: (r["loss"], r["placement"]) for r in rows}


def _cli(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """One 4-step run with evaluations and checkpoints at steps 2 and 4 (shared by several tests)."""
    tmp = tmp_path_factory.mktemp("reliability")
    _corpus(tmp / "data")
    out = tmp / "base"
    cfg = _config(tmp, "base", out, steps=4, eval_every=2, at_start="true", ckpt_every=2)
    r = _cli("distill", cfg)
    assert r.exit_code == 0, r.output
    return tmp, cfg, out


def test_scientific_notation_is_a_number(tmp_path):
    from supernet.training.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text("teacher: {path: t}\ndata: {train: [x.jsonl]}\n"
                    "train: {lr: 1e-3, betas: [0.9, 1e-1], mixer_lr_scale: {swa: 5e-2}}\nloss: {temperature: 2E0}\n")
    cfg = load_config(path, ["train.lr=3e-4", "train.weight_decay=1e-2"])
    assert cfg.train.lr == 3e-4 and cfg.train.weight_decay == 1e-2 and cfg.loss.temperature == 2.0
    assert cfg.train.betas == [0.9, 0.1] and cfg.train.mixer_lr_scale == {"swa": 0.05}
    assert load_config(path).train.lr == 1e-3


@pytest.mark.slow
def test_sigterm_checkpoints_and_resume_gives_the_uninterrupted_losses(tmp_path):
    tmp = tmp_path
    _corpus(tmp / "data")
    steps = 8
    ref, cut = tmp / "ref", tmp / "cut"
    r = _cli("distill", _config(tmp, "ref", ref, steps))
    assert r.exit_code == 0, r.output
    cfg = _config(tmp, "cut", cut, steps)  # no periodic checkpoints: the signal's is the only one
    code, output = sigterm_after_records("distill", cfg, cut / "metrics.jsonl")
    assert code == PREEMPTED_EXIT_CODE, output
    assert "Traceback" not in output
    done = max(_losses(cut))
    assert 2 <= done < steps
    line = next(ln for ln in output.splitlines() if ln.startswith("distill: stopped by SIGTERM"))
    assert f"after step {done};" in line and "exit code 75" in line
    assert [p.name for p in (cut / "checkpoints").iterdir()] == [f"step-{done:08d}"]
    r = _cli("distill", cfg)  # the same command resumes
    assert r.exit_code == 0, r.output
    assert f"resumed from {cut / 'checkpoints' / f'step-{done:08d}'} at step {done}" in r.output
    assert _losses(cut) == _losses(ref)  # bit for bit, placements included
    assert sorted(_losses(ref)) == list(range(1, steps + 1))


@pytest.mark.slow  # needs the shared 4-step run (fixture `base`)
def test_resume_refuses_a_changed_seq_len_and_cuts_metrics_back(base):
    tmp, cfg, out = base
    step2 = out / "checkpoints" / "step-00000002"
    r = _cli("distill", cfg, "--resume", step2, "--set", "data.seq_len=16")
    assert r.exit_code == 2 and r.exception.__class__ is SystemExit, r.output
    msg = r.output.strip().splitlines()[-1]
    assert msg.startswith("error: resume refused: data.seq_len was 32, now 16 since the checkpoint")
    assert "--resume-force" in msg and "Traceback" not in r.output
    r = _cli("distill", cfg, "--resume", step2, "--set", "loss.kind=rkl", "--set", "data.seq_len=16")
    assert "error: resume refused: data.seq_len was 32, now 16 (and 1 more: loss.kind)" in r.output
    # allowed changes (the eval schedule) and the same computation: steps 3-4 again, exactly
    before = _losses(out)
    r = _cli("distill", cfg, "--resume", step2, "--set", "eval.every=0")
    assert r.exit_code == 0, r.output
    assert "dropped 2 metrics.jsonl records after it" in r.output  # steps 3 and 4
    assert _losses(out) == before
    assert [r["step"] for r in _records(out) if "eval_kl" in r] == [0, 2]
    # --resume-force goes ahead with the change, and says so
    r = _cli("distill", cfg, "--resume", step2, "--set", "data.seq_len=16", "--resume-force",
             "--set", f"out_dir={tmp / 'forced'}")
    assert r.exit_code == 0, r.output
    assert "warning: resuming with a changed run config (--resume-force): data.seq_len was 32, now 16" in r.output


def _vocab_300_teacher(d: Path, tokenizer_from: Path) -> Path:
    """A random tiny Llama with 300 tokens (the student has 259) and the student's tokenizer files."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(d)
    for f in tokenizer_from.glob("tokenizer*"):
        shutil.copy(f, d / f.name)
    return d


BAD_INPUTS = [
    (["--set", "sampling.strategy=weighted"], "sampling.strategy weighted needs sampling.weights"),
    (["--set", "loss.hidden_layers=[99]"], "loss.hidden_layers lists layer 99, but the student has 4 layers"),
    ("vocab", "the teacher's vocabulary (300 tokens"),
    (["--set", "train.train_mixers=[]"], "train.train_mixers is empty"),
    (["--set", "train.lr=-1"], "train.lr must be a positive number, got -1.0"),
    (["--set", "train.betas=[0.9]"], "train.betas must be two numbers in [0, 1), got [0.9]"),
    (["--set", "train.device=cuda"], "train.device is cuda but this host has no CUDA device"),
]


@pytest.mark.slow
@pytest.mark.parametrize("args,message", BAD_INPUTS, ids=[m.split()[0] for _, m in BAD_INPUTS])
def test_bad_input_is_one_line(base, tmp_path, args, message):
    tmp, cfg, out = base
    if "cuda" in message and torch.cuda.is_available():
        pytest.skip("this host has CUDA")
    if args == "vocab":  # the base run's converted student against a teacher with another vocabulary
        teacher = _vocab_300_teacher(tmp_path / "teacher-300", out / "student-init")
        args = ["--set", f"teacher.path={teacher}", "--set", f"student.path={out / 'student-init'}"]
    r = _cli("distill", cfg, "--out-dir", tmp_path / "run", *args)
    assert r.exit_code == 2 and r.exception.__class__ is SystemExit, (r.output, r.exception)
    last = r.output.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, r.output
    assert "Traceback" not in r.output and not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow  # needs the shared 4-step run (fixture `base`)
def test_a_bad_input_in_a_real_process_prints_one_line(base):
    tmp, cfg, _ = base
    p = subprocess.run([sys.executable, "-m", "supernet.cli.main", "distill", str(cfg), "--set", "train.lr=-1"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == ["error: train.lr must be a positive number, got -1.0; e.g. train.lr=3e-4"]


@pytest.mark.slow  # needs the shared 4-step run (fixture `base`)
def test_checkpoints_load_without_pickle(base, monkeypatch):
    """Every torch.load runs with weights_only=True; DCP's metadata passes the restricted unpickler."""
    from supernet.training import checkpoint as ckpt
    from supernet.training.trainer import Trainer
    from supernet.training.config import load_config

    tmp, cfg, out = base
    trainer = Trainer(load_config(cfg, ["checkpoint.resume=none"]))
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    state = ckpt.load_checkpoint(out / "checkpoints" / "step-00000004", trainer.student, trainer.optimizer)
    assert state["step"] == 4 and len(calls) >= 3  # trainer.pt, rng-rank0.pt, the optimizer's param groups
    assert all(w is True for w in calls), calls
    assert trainer.optimizer.param_groups[0]["betas"] == (0.9, 0.95)
    # the RNG states round-trip through weights_only files
    rng = real_load(out / "checkpoints" / "step-00000004" / "rng-rank0.pt", weights_only=True)
    ckpt.set_rng_state(rng)
    draws = (random.random(), __import__("numpy").random.rand(), torch.rand(1).item())
    ckpt.set_rng_state(rng)
    assert draws == (random.random(), __import__("numpy").random.rand(), torch.rand(1).item())
    # a metadata file naming anything outside DCP's record types is refused
    evil = pickle.dumps(os.system)
    with pytest.raises(pickle.UnpicklingError, match="posix.system"):
        ckpt._MetadataUnpickler(__import__("io").BytesIO(evil)).load()


def test_resave_keeps_the_old_copy_until_the_new_one_is_in_and_stale_folders_go(tmp_path):
    from supernet.training import checkpoint as ckpt

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    first = ckpt.save_checkpoint(tmp_path, 5, model, opt, {"step": 5}, "a: 1\n")
    with torch.no_grad():
        model.weight.add_(1.0)
    again = ckpt.save_checkpoint(tmp_path, 5, model, opt, {"step": 5}, "a: 2\n")
    assert again == first and (again / "config.yaml").read_text() == "a: 2\n"
    root = ckpt.checkpoint_root(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == ["step-00000005"]
    # an interrupted save and an interrupted re-save (old copy moved aside, new one never renamed)
    (root / ".tmp-step-00000007" / "state").mkdir(parents=True)
    os.replace(again, root / ".old-step-00000005")
    assert ckpt.find_latest(tmp_path) is None
    notes = ckpt.clean_stale(tmp_path)
    assert any("removed the unfinished save" in n for n in notes) and any("restored" in n for n in notes)
    assert sorted(p.name for p in root.iterdir()) == ["step-00000005"]
    fresh = torch.nn.Linear(3, 2)
    ckpt.load_checkpoint(ckpt.find_latest(tmp_path), fresh, torch.optim.AdamW(fresh.parameters()))
    assert torch.equal(fresh.weight, model.weight)


@pytest.mark.slow  # needs the shared 4-step run (fixture `base`)
def test_plot_run_writes_a_png(base):
    tmp, _, out = base
    r = _cli("plot-run", out, "--out", tmp / "plot.png")
    assert r.exit_code == 0, r.output
    png = (tmp / "plot.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    import matplotlib.image

    img = matplotlib.image.imread(tmp / "plot.png")
    assert img.shape[:2] == (800, 1200) and img.std() > 0.05  # drawn, not blank
    r = _cli("plot-run", tmp / "nowhere")
    assert r.exit_code == 2 and "metrics.jsonl does not exist" in r.output


@pytest.mark.slow  # needs the shared 4-step run (fixture `base`)
def test_tensorboard_is_used_when_enabled(base, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    tmp, cfg, _ = base
    r = _cli("distill", cfg, "--out-dir", tmp_path / "tb", "--max-steps", "2", "--set", "log.tensorboard=true",
             "--set", "eval.at_start=false")
    assert r.exit_code == 0, r.output
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    acc.Reload()
    assert {"loss", "kl", "lr", "tokens_per_s"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("loss")] == [1, 2]
    # enabled but not installed: one line naming the extra
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    r = _cli("distill", cfg, "--out-dir", tmp_path / "tb2", "--set", "log.tensorboard=true")
    assert r.exit_code == 2 and "pip install 'supernet[tensorboard]'" in r.output.strip().splitlines()[-1]
