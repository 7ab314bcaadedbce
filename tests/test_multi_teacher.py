"""Several teachers (`teacher.teachers`, training/teachers.py): mix == one teacher when the same
teacher is listed twice, alternation follows the weights, exact resume, one-line config errors."""
from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from typer.testing import CliRunner

from supernet.layout import Placement
from supernet.training.losses import TopKTargets, topk_from_logits
from supernet.training.teachers import active_teachers, alternate_teacher, merge_topk
from supernet.training.tiny import TinyWorld, tiny_teacher_dir
from tests.float_bounds import U32


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return TinyWorld(tmp_path_factory.mktemp("multi-teacher"))


@pytest.fixture(scope="module")
def caches(world, tmp_path_factory):
    """Full-vocabulary (float32) and top-8 caches of the tiny teacher over the first 24 documents."""
    from supernet.training.logit_cache import write_logit_cache
    from supernet.training.models import load_teacher_model

    root = tmp_path_factory.mktemp("caches")
    teacher, tok = load_teacher_model(str(world.teacher_dir))
    for name, k, dtype in (("full", teacher.config.vocab_size, "float32"), ("k8", 8, "float32")):
        write_logit_cache(teacher, tok, [str(world.train)], root / name, top_k=k, seq_len=32, values_dtype=dtype,
                          max_documents=24, progress=False)
    return root


def _trainer(cfg):
    from supernet.training.trainer import Trainer

    return Trainer(cfg)


def _step_loss(world, out, teacher, held_out=None, **extra):
    """One training step's record; with `held_out` (a list), also the held-out KL per placement."""
    cfg = world.config(out, teacher=teacher, train={"train_mixers": ["swa", "gdn", "kda"]},
                       data={"max_documents": 24, "eval": [str(world.eval)] if held_out is not None else []}, **extra)
    trainer = _trainer(cfg)
    if held_out is not None:
        held_out.append(trainer.evaluate())
    return trainer.train_step(Placement.parse("gdn,swa,kda,fa"))


def test_alternation_follows_the_weights_and_depends_only_on_the_step():
    for weights in ([3, 1], [1, 1, 2], [0.0, 2.5, 0.5]):
        p = [w / sum(weights) for w in weights]
        for n in (40, 1000):
            picks = [alternate_teacher(s, weights) for s in range(n)]
            counts = [picks.count(i) for i in range(len(weights))]
            # a golden-ratio Weyl sequence: each teacher's count is within a few of n * p_i
            assert all(abs(c - n * q) <= 3 for c, q in zip(counts, p)), (weights, n, counts)
        assert alternate_teacher(12345, weights) == alternate_teacher(12345, list(weights))
    assert 0 not in {alternate_teacher(s, [0, 1]) for s in range(200)}  # weight 0: never chosen
    assert active_teachers("mix", 7, [1, 3]) == [(0, 0.25), (1, 0.75)]
    assert active_teachers("alternate", 7, [1, 3]) == [(alternate_teacher(7, [1, 3]), 1.0)]


def test_merged_topk_is_the_normalised_log_probability_mixture():
    gen = torch.Generator().manual_seed(0)
    vocab, k = 50, 8
    a, b = topk_from_logits(torch.randn(6, vocab, generator=gen) * 3, k), topk_from_logits(
        torch.randn(6, vocab, generator=gen) * 3, k)
    merged = merge_topk([(a, 0.3), (b, 0.7)], vocab)

    def dense(tk):  # the completion: the tail spread evenly outside the top-K
        d = (tk.tail.clamp_min(1e-30) / (vocab - k)).log()[:, None].expand(-1, vocab).clone()
        return d.scatter(1, tk.ids, tk.logprobs)

    want = torch.log_softmax(0.3 * dense(a) + 0.7 * dense(b), -1)
    for r in range(6):
        ids = merged.ids[r][merged.valid[r]]
        assert sorted(ids.tolist()) == sorted(set(a.ids[r].tolist()) | set(b.ids[r].tolist()))
        got = merged.logprobs[r][merged.valid[r]]
        assert torch.allclose(got, want[r, ids], atol=1e-5)
        outside = torch.ones(vocab, dtype=torch.bool)
        outside[ids] = False
        assert float(merged.tail[r]) == pytest.approx(float(want[r, outside].exp().sum()), rel=1e-5)
    # the same cache twice gives back its own targets
    same = merge_topk([(a, 0.4), (a, 0.6)], vocab)
    v = same.valid
    assert v.sum(1).tolist() == [k] * 6
    for r in range(6):
        lookup = dict(zip(a.ids[r].tolist(), a.logprobs[r].tolist()))
        for i, lp in zip(same.ids[r][v[r]].tolist(), same.logprobs[r][v[r]].tolist()):
            assert lp == pytest.approx(lookup[i], abs=5e-6)
    assert torch.allclose(same.tail, a.tail, rtol=1e-5, atol=1e-7)


@pytest.mark.slow  # six trainers on the tiny world
def test_one_teacher_listed_twice_gives_the_single_teachers_loss(world, caches, tmp_path):
    t = str(world.teacher_dir)
    evals = []
    single = _step_loss(world, tmp_path / "single", {"source": "online", "path": t}, evals)
    twice = [{"path": t, "weight": 0.3}, {"path": t, "weight": 0.7}]
    mix = _step_loss(world, tmp_path / "mix", {"path": None, "teachers": twice, "mode": "mix"}, evals)
    alt = _step_loss(world, tmp_path / "alt", {"path": None, "teachers": twice, "mode": "alternate"})
    # 0.3 z + 0.7 z rounds each logit by <= 3 u |z| (|z| < 40 here); the KL moves by at most
    # 2 max|dz| per token (its gradient q - p has L1 norm <= 2), and the loss is a mean over tokens
    bound = 2 * 3 * U32 * 40
    assert abs(mix["loss"] - single["loss"]) <= bound and abs(mix["grad_norm"] - single["grad_norm"]) <= 1e-3 * single["grad_norm"]
    assert alt["loss"] == single["loss"] and alt["grad_norm"] == single["grad_norm"]  # the same computation
    assert evals[0].keys() == evals[1].keys() and len(evals[0]) == 4  # held-out KL: to the mix, per placement
    assert all(abs(evals[1][p] - evals[0][p]) <= bound for p in evals[0]), evals
    # an online teacher mixed with its own full-vocabulary cache: the dense mixed target
    full = {"source": "offline", "cache_dir": str(caches / "full")}
    both = _step_loss(world, tmp_path / "both", {"path": None, "teachers": [{"path": t, "weight": 1}, {**full, "weight": 3}]})
    assert both["loss"] == pytest.approx(single["loss"], rel=1e-5, abs=bound)
    # offline: the top-8 cache twice equals the top-8 cache once (float32 values, tail from them)
    k8 = {"source": "offline", "cache_dir": str(caches / "k8")}
    one = _step_loss(world, tmp_path / "k8", k8)
    two = _step_loss(world, tmp_path / "k8x2", {"path": None, "teachers": [{**k8, "weight": 1}, {**k8, "weight": 2}]})
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5, abs=1e-6)
    assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-4)


def test_a_cache_of_other_windows_is_refused_per_batch(world, caches, tmp_path):
    from supernet.training.data import PackedDataset, build_token_stream
    from supernet.training.logit_cache import CacheError, TopKCache
    from supernet.training.models import load_tokenizer
    from supernet.training.teachers import MultiTeacherData

    tok = load_tokenizer(str(world.teacher_dir))
    other = PackedDataset(build_token_stream([str(world.eval)], tok, tmp_path / "dc", progress=False), 32)
    data = MultiTeacherData(other, {1: TopKCache(caches / "k8")})
    with pytest.raises(CacheError, match="teacher 1's cache .* holds other windows than the training data"):
        data.get([0, 1])


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["mix", "alternate"])
def test_resume_is_exact_with_two_teachers(world, caches, tmp_path, mode):
    other = str(tiny_teacher_dir(steps=40, seed=1))  # another teacher with the same tokenizer
    teachers = [{"path": str(world.teacher_dir), "weight": 2.0}, {"path": other, "weight": 1.0}]
    sections = dict(teacher={"path": None, "teachers": teachers, "mode": mode}, train={"max_steps": 4},
                    checkpoint={"every": 2, "keep_last": 2}, sampling={"mixers": ["swa", "gdn"]})
    _trainer(world.config(tmp_path / "a", **sections)).train()
    crashed = _trainer(world.config(tmp_path / "b", **sections))
    crashed.train(stop_at_step=3)
    del crashed
    resumed = _trainer(world.config(tmp_path / "b", **sections))
    assert resumed.step == 2
    resumed.train()
    rows = {}
    for name in "ab":
        recs = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        rows[name] = {r["step"]: r for r in recs if "loss" in r}
    assert sorted(rows["a"]) == sorted(rows["b"]) == list(range(1, 5))
    for s in rows["a"]:
        assert rows["a"][s]["loss"] == rows["b"][s]["loss"], s
        assert rows["a"][s].get("teacher") == rows["b"][s].get("teacher")
    if mode == "alternate":
        picks = [rows["a"][s]["teacher"] for s in range(1, 5)]
        assert picks == [alternate_teacher(s, [2, 1]) for s in range(4)] == [0, 0, 1, 0]  # step 3 after the resume: 1
    # the teacher list is a resume key
    changed = dict(sections, teacher={"path": None, "teachers": teachers[::-1], "mode": mode})
    from supernet.training.config import ConfigError

    with pytest.raises(ConfigError, match="resume refused: teacher.teachers was"):
        _trainer(world.config(tmp_path / "b", **changed))


def _vocab_teacher(d, size=300):
    from transformers import LlamaConfig, LlamaForCausalLM

    from supernet.training.tiny import TINY_TEACHER, byte_tokenizer

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=size, **TINY_TEACHER)).save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    return d


BAD = [
    ({"teachers": [{"path": "T", "weight": -1}, {"path": "T", "weight": 2}]},
     "teacher.teachers weights must be >= 0 with a positive sum, got [-1.0, 2.0]"),
    ({"teachers": [{"path": "T", "weight": 0}, {"path": "T", "weight": 0}]},
     "teacher.teachers weights must be >= 0 with a positive sum, got [0.0, 0.0]"),
    ({"teachers": [{"path": "T"}], "mode": "blend"}, "config key 'teacher.mode' is 'blend'; choose one of mix, alternate"),
    ({"teachers": [{"path": "T"}, {"path": "V300"}]}, "the teacher's vocabulary (300 tokens, teacher "),
    ({"teachers": [{"source": "offline"}]}, "teacher.teachers[0] is offline but has no cache_dir"),
    ({"teachers": [{"path": "T"}], "path": "T"}, "teacher.teachers lists the teachers, so leave teacher.source/path"),
]


@pytest.mark.parametrize("teacher,message", BAD, ids=["negative", "zero-sum", "mode", "vocab", "no-cache", "both"])
def test_bad_teacher_lists_are_one_line_errors(world, tmp_path, teacher, message):
    from supernet.cli.main import app

    def fill(x):
        if isinstance(x, dict):
            return {k: fill(v) for k, v in x.items()}
        if isinstance(x, list):
            return [fill(v) for v in x]
        if x == "T":
            return str(world.teacher_dir)
        if x == "V300":
            return str(_vocab_teacher(tmp_path / "v300"))
        return x

    cfg = world.config(tmp_path / "run").to_dict()
    cfg["teacher"] = {"path": None, **fill(teacher)} if "path" not in teacher else fill(teacher)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = CliRunner().invoke(app, ["distill", str(path)])
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1], r.output
    assert "Traceback" not in r.output and not (tmp_path / "run" / "checkpoints").exists()
    if "vocabulary" in message:
        assert "transplant-vocab" in lines[-1] and "cache-logits" in lines[-1]
