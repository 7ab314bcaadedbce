"""`supernet transplant-vocab`: byte keys, matching pursuit, the identity, one-line errors, and the
real SmolLM2 moved to a tokenizer trained here on the corpus (bits per byte)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from supernet.cli.main import app
from supernet.vocab_transplant import SPECIAL, _piece_bytes, omp, transplant_matrices, vocabulary
from tests.conftest import DATA_DIR, eval_texts


def _cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _tiny_teacher_dir():
    from supernet.training.tiny import tiny_teacher_dir

    return tiny_teacher_dir()


def _untied_teacher(d: Path) -> Path:
    """A random tiny Llama with untied lm_head and the byte tokenizer of training/tiny.py."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from supernet.training.tiny import TINY_TEACHER, byte_tokenizer

    tok = byte_tokenizer()
    torch.manual_seed(1)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                 **TINY_TEACHER)).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _bpe(texts: list[str], size: int, folder: Path):
    """A byte-level BPE of `size` tokens trained on `texts`, saved in `folder`."""
    from supernet.training.tiny import train_byte_level_bpe

    tok = train_byte_level_bpe(texts, size)
    tok.save_pretrained(str(folder))
    return tok


def _state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_byte_keys_read_each_spelling():
    assert _piece_bytes("\u0120the", "byte_level") == b" the"  # GPT-2's space marker
    assert _piece_bytes("\u010a", "byte_level") == b"\n"
    assert _piece_bytes("\u00c3\u00a9", "byte_level") == "é".encode()
    assert _piece_bytes("\u2581the", "metaspace") == b" the"  # SentencePiece's space marker
    assert _piece_bytes("<0x0A>", "metaspace") == b"\n"  # byte fallback
    from supernet.training.tiny import byte_tokenizer

    v = vocabulary(byte_tokenizer())
    assert sorted(k for k in v.keys if len(k) == 1) == [bytes([b]) for b in range(256)]
    assert v.keys[v.roles["eos"]] == SPECIAL + b"<|im_end|>"  # specials live in their own namespace


def test_omp_recovers_a_planted_sparse_combination():
    gen = torch.Generator().manual_seed(0)
    atoms = torch.randn(200, 64, generator=gen, dtype=torch.float64)  # float64 targets: no float32 rounding
    support = torch.tensor([[3, 50, 120], [7, 8, 199]])
    coef = torch.tensor([[1.0, -0.5, 0.25], [2.0, 0.3, -1.0]], dtype=torch.float64)
    targets = torch.einsum("nk,nkd->nd", coef, atoms[support])
    idx, got = omp(targets, atoms, k=3)
    for row in range(2):
        found = dict(zip(idx[row].tolist(), got[row].tolist()))
        want = dict(zip(support[row].tolist(), coef[row].tolist()))
        assert set(found) == set(want)
        # float64 least squares on a well-conditioned 3-column system: error ~1e-15
        assert all(abs(found[j] - want[j]) < 1e-9 for j in want)


def test_shared_rows_are_copied_and_new_ones_come_from_the_old_pieces():
    from supernet.training.tiny import byte_tokenizer, synthetic_documents

    old = byte_tokenizer()
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        new = _bpe(synthetic_documents(200, 1), 400, Path(tmp))
    gen = torch.Generator().manual_seed(0)
    embed = torch.randn(len(old), 32, generator=gen)
    head = torch.randn(len(old), 32, generator=gen)
    e, h, report = transplant_matrices(embed, head, old, new, k=4)
    assert report.copied + report.approximated + report.mean_init + report.by_role == len(new) == e.shape[0]
    ov = old.get_vocab()
    for piece, j in new.get_vocab().items():
        if piece in ov:  # single bytes and the three specials: copied, both matrices
            assert torch.equal(e[j], embed[ov[piece]]) and torch.equal(h[j], head[ov[piece]])
    # a merged token ("Ġthe") is approximated from its bytes' mean through <= 4 shared rows
    j = new.get_vocab()["\u0120the"]
    pieces = [ov[c] for c in ["\u0120", "t", "h", "e"]]
    guess = embed[pieces].mean(0)
    nearest = min(float((guess - embed[i] * (guess @ embed[i]) / (embed[i] @ embed[i])).norm()) for i in range(256))
    assert float((e[j] - guess).norm()) < nearest  # better than the best single shared row
    assert report.approximated > 100 and report.examples


def test_unmatched_special_tokens_take_the_rows_of_their_roles(tmp_path):
    from supernet.training.tiny import byte_tokenizer
    from tests.helpers.checkpoints import save_byte_tokenizer
    from transformers import AutoTokenizer

    old = byte_tokenizer()  # bos <|im_start|>, eos <|im_end|>, pad <|endoftext|>
    save_byte_tokenizer(tmp_path)
    new = AutoTokenizer.from_pretrained(tmp_path)  # bos <s>, eos </s>, pad <pad>: other strings, same roles
    embed = torch.randn(len(old), 16, generator=torch.Generator().manual_seed(0))
    e, _, report = transplant_matrices(embed, None, old, new, k=4)
    assert report.by_role == 3 and report.copied == 256 and report.approximated == report.mean_init == 0
    for role in ("bos", "eos", "pad"):
        assert torch.equal(e[getattr(new, f"{role}_token_id")], embed[getattr(old, f"{role}_token_id")])


@pytest.mark.parametrize("kind", ["supernet-tied", "supernet-untied", "hf"])
def test_same_tokenizer_is_the_identity(tmp_path, kind):
    from supernet.convert import convert_teacher

    teacher = _tiny_teacher_dir() if kind != "supernet-untied" else _untied_teacher(tmp_path / "untied")
    src = teacher if kind == "hf" else convert_teacher(teacher, tmp_path / "ckpt")
    r = _cli("transplant-vocab", src, "--tokenizer", src, "--out", tmp_path / "out")
    assert r.exit_code == 0, r.output
    assert "259 -> 259 tokens: 259 copied" in r.output
    before, after = _state(Path(src)), _state(tmp_path / "out")
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit for bit
    cfg_a, cfg_b = (json.loads((p / "config.json").read_text()) for p in (Path(src), tmp_path / "out"))
    for key in ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings", "model_type"):
        assert cfg_a.get(key) == cfg_b.get(key), key
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    assert json.loads((tmp_path / "out" / "transplant.json").read_text())["copied"] == 259


def test_a_smaller_tokenizer_updates_the_config_and_runs(tmp_path):
    from supernet.convert import convert_teacher
    from supernet.training.tiny import synthetic_documents

    src = convert_teacher(_untied_teacher(tmp_path / "untied"), tmp_path / "ckpt")
    _bpe(synthetic_documents(200, 1), 320, tmp_path / "tok")
    r = _cli("transplant-vocab", src, "--tokenizer", tmp_path / "tok", "--out", tmp_path / "out", "--pad-to", 64)
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert cfg["vocab_size"] == 320 and len(tok) == 320  # already a multiple of 64
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 2, 0)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 0)
    from supernet.model import SupernetForCausalLM

    model = SupernetForCausalLM.from_pretrained(tmp_path / "out")
    assert not cfg["tie_word_embeddings"] and model.lm_head.weight.shape == (320, 64)
    ids = torch.tensor([tok("the red cat sees the dog.")["input_ids"]])
    assert torch.isfinite(model(input_ids=ids).logits).all()


BAD = [
    (["nowhere", "--tokenizer", "{tok}", "--out", "{out}"], "nowhere"),
    (["{ckpt}", "--tokenizer", "nowhere", "--out", "{out}"], "--tokenizer nowhere is neither a tokenizer folder"),
    (["{ckpt}", "--tokenizer", "{tok}", "--out", "{out}", "--k", "-1"], "--k must be >= 0"),
    (["{ckpt}", "--tokenizer", "{tok}", "--out", "{out}", "--pad-to", "0"], "--pad-to must be >= 1"),
]


@pytest.mark.parametrize("args,message", BAD, ids=["ckpt", "tokenizer", "k", "pad"])
def test_bad_input_is_one_line(tmp_path, args, message):
    teacher = _tiny_teacher_dir()
    args = [a.format(ckpt=teacher, tok=teacher, out=tmp_path / "out") for a in args]
    r = _cli("transplant-vocab", *args)
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.output
    assert not (tmp_path / "out").exists()


@pytest.mark.teacher
@pytest.mark.slow
def test_smollm2_on_a_corpus_tokenizer_keeps_its_bits_per_byte(tmp_path, smollm2_dir):
    """SmolLM2 (49152 tokens) moved to a 4096-token BPE trained here on the training corpus, scored
    in bits per byte on held-out text (tokenizers differ, so per-token loss would not compare).

    Stated factor: bpb_transplanted <= 1.5 x bpb_original. Why 1.5: no training happens, ~16% of
    the new tokens are approximations, and the model reads a segmentation it never saw (4% more
    tokens per byte here, split at other places), so some loss is expected; a transplant that loses
    more than half again is no longer a good start for distillation. Measured 1.23x on this text
    (0.879 -> 1.078; 1.30x on 4 x 3000 characters), so the bound has room for another BPE trainer
    version; rounding moves the statistic by ~1e-6, so this is a quality bound, not a float one.
    Against the random embedding (same model, embeddings drawn with the original's std): at
    least 4x lower (measured ~12x), i.e. the copied and approximated rows carry the model.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from supernet.bits_per_byte import bits_per_byte

    train = DATA_DIR / "pydocs-train.jsonl"
    docs = [json.loads(line)["text"] for line in train.read_text().splitlines()[:200]]
    _bpe(docs, 4096, tmp_path / "tok")
    r = _cli("transplant-vocab", smollm2_dir, "--tokenizer", tmp_path / "tok", "--out", tmp_path / "out")
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "out" / "transplant.json").read_text())
    assert report["new_vocab"] == 4096 and report["copied"] > 3000 and report["approximated"] > 300
    texts = [t[:1500] for t in eval_texts(2, 1500)]
    torch.manual_seed(0)
    orig = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    b0 = bits_per_byte(orig, AutoTokenizer.from_pretrained(smollm2_dir), texts)
    std = float(orig.get_input_embeddings().weight.detach().std())
    del orig
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    bt = bits_per_byte(model, tok, texts)
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0.0, std, generator=torch.Generator().manual_seed(0))
    b_rand = bits_per_byte(model, tok, texts)
    print(f"bits per byte: original {b0:.3f}, transplanted {bt:.3f} ({bt / b0:.2f}x), random embedding {b_rand:.3f}")
    assert bt <= 1.5 * b0, (b0, bt, b_rand)
    assert bt <= b_rand / 4, (b0, bt, b_rand)


@pytest.mark.slow
def test_cross_vocabulary_distillation_end_to_end(tmp_path):
    """A byte-vocabulary student and a teacher with a BPE vocabulary: distil refuses and names the
    path; transplant the student, cache the teacher's top-K, distil from the cache: held-out KL drops."""
    import yaml

    from supernet.training.tiny import TinyWorld, synthetic_documents, train_tiny_teacher

    world = TinyWorld(tmp_path / "world", n_train=60, n_eval=8)
    bpe = _bpe(synthetic_documents(200, 1), 320, tmp_path / "bpe")
    teacher = train_tiny_teacher(bpe, steps=60, seed=3)
    teacher.save_pretrained(tmp_path / "teacher")
    bpe.save_pretrained(tmp_path / "teacher")

    cfg = world.config(tmp_path / "run", teacher={"source": "online", "path": str(tmp_path / "teacher")},
                       train={"trainable": "all", "max_steps": 8}, eval={"at_start": True, "at_end": True,
                                                                         "placements": ["all-fa", "all-gdn"]})
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    r = _cli("distill", path)
    assert r.exit_code == 2, r.output
    line = r.output.strip().splitlines()[-1]
    assert line.startswith("error: the teacher's vocabulary (320 tokens") and "transplant-vocab" in line, r.output

    r = _cli("transplant-vocab", world.student_dir, "--tokenizer", tmp_path / "teacher", "--out", tmp_path / "s2")
    assert r.exit_code == 0 and "259 -> 320 tokens" in r.output, r.output
    for split, src in (("train", world.train), ("eval", world.eval)):
        r = _cli("cache-logits", tmp_path / "teacher", src, tmp_path / f"cache-{split}", "--top-k", "16",
                 "--seq-len", "32", "--dtype", "float32")
        assert r.exit_code == 0, r.output
    data = cfg.to_dict()
    data["student"] = {"path": str(tmp_path / "s2")}
    data["teacher"] = {"source": "offline", "cache_dir": str(tmp_path / "cache-train"),
                       "eval_cache_dir": str(tmp_path / "cache-eval")}
    path.write_text(yaml.safe_dump(data))
    r = _cli("distill", path)
    assert r.exit_code == 0, r.output
    evals = [json.loads(x)["eval_kl"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if "eval_kl" in x]
    first, last = evals[0], evals[-1]
    assert all(last[p] < 0.9 * first[p] for p in first), evals
