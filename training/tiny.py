"""A tiny, deterministic world for smoke runs: byte tokenizer, synthetic corpus, teacher.

Library code, not a test fixture: the teacher `builtin:tiny-llama` of the smoke configs
(training/models.py), `benchmarks/bench_training.py --smoke` and the ready-made setup around it
(`TinyWorld`: teacher, converted student, corpora) that the tests and the recipe benchmark use.

The teacher is an HF `LlamaForCausalLM` (vocab 259, hidden 64, GQA 4/2 heads) briefly trained on
the synthetic corpus so that its next-token distributions are far from uniform — distilling a
random-init teacher would make every mixer look perfect. Everything is seeded; building it takes a
few seconds on a CPU and is cached on disk by its settings.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TINY_TEACHER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=1024, rope_theta=10000.0)


def byte_tokenizer() -> Any:
    """A byte-level tokenizer: 256 byte tokens + 3 specials, ChatML template, EOS = <|im_end|>."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for s in SPECIALS:
        vocab[s] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True) for s in SPECIALS])
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>")
    out.chat_template = CHATML
    return out


_NOUNS = "cat dog bird fish tree river stone cloud house garden road lamp book door".split()
_ADJS = "red quiet small bright old green heavy quick warm".split()
_VERBS = "sees finds likes moves holds follows paints opens".split()


def synthetic_documents(n: int, seed: int = 0) -> list[str]:
    """Documents with local grammar and long-range repetition (so context length matters)."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        name = rng.choice(_NOUNS)
        lines = [f"# notes on the {name}"]
        for _ in range(rng.randint(3, 8)):
            a, b = rng.choice(_NOUNS), rng.choice(_NOUNS)
            lines.append(f"the {rng.choice(_ADJS)} {a} {rng.choice(_VERBS)} the {b}.")
            if rng.random() < 0.4:
                start = rng.randint(0, 20)
                lines.append(" ".join(str(start + i) for i in range(rng.randint(4, 9))))
        lines.append(f"so ends the {name}.")
        docs.append("\n".join(lines))
    return docs


def synthetic_chats(n: int, seed: int = 0) -> list[list[dict[str, str]]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.choice(_NOUNS), rng.choice(_ADJS)
        out.append([
            {"role": "system", "content": "answer briefly."},
            {"role": "user", "content": f"what colour is the {a}?"},
            {"role": "assistant", "content": f"the {a} is {b}."},
            {"role": "user", "content": "and then?"},
            {"role": "assistant", "content": f"then the {a} {rng.choice(_VERBS)} the {rng.choice(_NOUNS)}."},
        ])
    return out


def write_jsonl(path: str | Path, records: list[dict[str, Any]]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_synthetic_corpus(dir_: str | Path, n_train: int = 200, n_eval: int = 20) -> tuple[Path, Path]:
    d = Path(dir_)
    tr = write_jsonl(d / "train.jsonl", [{"id": i, "text": t} for i, t in enumerate(synthetic_documents(n_train, 1))])
    ev = write_jsonl(d / "eval.jsonl", [{"id": i, "text": t} for i, t in enumerate(synthetic_documents(n_eval, 2))])
    return tr, ev


def train_tiny_teacher(tokenizer: Any, steps: int = 120, seed: int = 0, seq_len: int = 64, **overrides: Any):
    """A tiny Llama, trained with plain next-token loss on the synthetic corpus (a few seconds)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                      **{**TINY_TEACHER, **overrides})
    model = LlamaForCausalLM(cfg)
    ids: list[int] = []
    for doc in synthetic_documents(400, seed=99):
        ids += tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    data = torch.tensor(ids)
    n = (len(data) - 1) // seq_len
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        rows = torch.randint(0, n, (8,), generator=gen)
        x = torch.stack([data[r * seq_len: r * seq_len + seq_len + 1] for r in rows.tolist()])
        loss = model(input_ids=x[:, :-1], labels=x[:, :-1].clone()).loss  # HF shifts labels itself
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def tiny_teacher_dir(root: str | Path | None = None, steps: int = 120, seed: int = 0, **overrides: Any) -> Path:
    """Build (once) and return a folder holding the tiny teacher and its tokenizer."""
    key = hashlib.sha256(json.dumps([steps, seed, TINY_TEACHER, overrides], sort_keys=True).encode()).hexdigest()[:12]
    base = Path(root) if root is not None else Path(os.environ.get("SUPERNET_CACHE", Path.home() / ".cache" / "supernet"))
    out = base / f"tiny-llama-{key}"
    if (out / "config.json").exists():
        return out
    tok = byte_tokenizer()
    model = train_tiny_teacher(tok, steps=steps, seed=seed, **overrides)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tiny-"))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        os.replace(tmp, out)
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def tiny_student_overrides() -> dict[str, Any]:
    """Supernet settings for the tiny teacher: a short SWA window so SWA differs from FA."""
    return {"swa_window": 4}


class TinyWorld:
    """Paths of a ready tiny setup (tests and the recipe benchmark): teacher folder, converted student, text and chat corpora."""

    def __init__(self, root: str | Path, n_train: int = 120, n_eval: int = 16) -> None:
        from supernet.convert import save_checkpoint, supernet_from_teacher
        from supernet.training.models import load_teacher_model

        self.root = Path(root)
        self.train, self.eval = write_synthetic_corpus(self.root / "data", n_train, n_eval)
        self.chat = write_jsonl(self.root / "data" / "chat.jsonl", [{"messages": m} for m in synthetic_chats(40, 3)])
        self.teacher_dir = tiny_teacher_dir()
        self.student_dir = self.root / "student-init"
        if not (self.student_dir / "config.json").exists():
            teacher, tok = load_teacher_model(str(self.teacher_dir))
            torch.manual_seed(0)
            save_checkpoint(supernet_from_teacher(teacher, **tiny_student_overrides()), self.student_dir, tok)

    def config(self, out_dir: str | Path, **sections: dict[str, Any]):
        """A small CPU RunConfig for this world; `sections` update the defaults key by key."""
        from supernet.training.config import config_from_dict

        base: dict[str, Any] = {
            "out_dir": str(out_dir),
            "teacher": {"source": "online", "path": str(self.teacher_dir)},
            "student": {"path": str(self.student_dir)},
            "data": {"train": [str(self.train)], "eval": [str(self.eval)], "seq_len": 32,
                     "cache_dir": str(self.root / "data-cache")},
            "loss": {"chunk_tokens": 100},
            "train": {"micro_batch_size": 2, "grad_accum": 2, "max_steps": 6, "lr": 3e-3, "warmup_steps": 2,
                      "device": "cpu"},
            "eval": {"every": 0, "num_sequences": 4, "batch_size": 4, "at_start": False, "at_end": False},
            "checkpoint": {"every": 0, "keep_last": 3, "save_final": False},
            "log": {"progress": False},
        }
        for key, value in sections.items():
            base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
        return config_from_dict(base)


def train_byte_level_bpe(texts: list[str], size: int) -> Any:
    """A byte-level BPE of `size` tokens trained on `texts` with the `tokenizers` library (seconds),
    with the specials of `byte_tokenizer` (bos <|im_start|>, eos <|im_end|>, pad <|endoftext|>):
    a real tokenizer other than a model's own, for vocabulary-transplant tests and benchmarks."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=size, special_tokens=list(SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>")
    out.chat_template = CHATML
    return out
