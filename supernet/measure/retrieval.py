"""Long-context retrieval tasks generated locally (RULER-style), as lm-eval jsonl rows {"context", "answer"}.

Three kinds, each at a given length in tokens of the model's tokenizer:
- `niah`: one needle ("The special magic number for KEY is NNNNNNN.") at a depth in real prose;
- `multikey`: four needles with different keys, the question asks for one of them;
- `vartrack`: variable tracking: `VAR A = 12345.` then a chain `VAR B = VAR A.` ... scattered through the
  text; the question asks for the value of the last variable of the chain (3 hops).

The answer is scored by log-likelihood: lm-eval's `acc` for a loglikelihood task is 1 when the answer's
tokens are the greedy ones, i.e. exact match of greedy decoding, for one forward instead of a decode loop.
Generation is deterministic (seeded by kind and length), so every placement sees the same documents.
"""
from __future__ import annotations

import random
from typing import Sequence

KINDS = ("niah", "multikey", "vartrack")
DEPTHS = (0.05, 0.15, 0.25, 0.35, 0.45, 0.55, 0.65, 0.75, 0.85, 0.95)
_KEYS = ["amber-falcon", "quiet-harbor", "red-juniper", "old-lantern", "wide-meadow", "cold-nickel", "tall-orchid",
         "hot-pepper", "pale-quartz", "dry-saffron", "dark-timber", "soft-velvet", "raw-walnut", "fast-zephyr"]
_VARS = ["QX", "MZ", "TR", "PL", "WK", "BN", "HD", "YC", "GF", "SJ", "VU", "EO"]


def filler_ids(tokenizer, texts: Sequence[str], need: int) -> list[int]:
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer.encode(text.strip() + "\n\n", add_special_tokens=False))
        if len(ids) >= need:
            return ids
    raise ValueError(f"the haystack corpus is too short: {len(ids)} tokens, {need} needed")


def _insert(tokenizer, filler: list[int], pieces: Sequence[tuple[float, str]], question: str, length: int) -> str:
    """Text of `length` tokens: filler with each (depth, sentence) inserted, then the question."""
    enc = [(d, tokenizer.encode(f"\n{s}\n", add_special_tokens=False)) for d, s in pieces]
    q = tokenizer.encode(question, add_special_tokens=False)
    budget = length - len(q) - sum(len(e) for _, e in enc)
    body, last = [], 0
    for depth, e in sorted(enc, key=lambda x: x[0]):
        cut = int(budget * depth)
        body += filler[last:cut] + e
        last = cut
    body += filler[last:budget] + q
    return tokenizer.decode(body)


def make_rows(kind: str, length: int, tokenizer, texts: Sequence[str], n: int = 10) -> list[dict]:
    """`n` documents of `kind` at about `length` tokens (depths spread evenly, shuffled)."""
    if kind not in KINDS:
        raise ValueError(f"unknown retrieval kind {kind!r}; one of {', '.join(KINDS)}")
    rng = random.Random(f"{kind}-{length}")
    filler = filler_ids(tokenizer, texts, length * 2)
    rows = []
    for k in range(n):
        depth = DEPTHS[k % len(DEPTHS)]
        start = rng.randrange(0, len(filler) - length)
        hay = filler[start:]
        if kind == "niah":
            key, value = rng.choice(_KEYS), str(rng.randrange(10**6, 10**7))
            pieces = [(depth, f"The special magic number for {key} is {value}.")]
            question = f"\n\nWhat is the special magic number for {key}? The special magic number for {key} is"
        elif kind == "multikey":
            keys = rng.sample(_KEYS, 4)
            values = [str(rng.randrange(10**6, 10**7)) for _ in keys]
            spots = [depth] + [rng.random() for _ in keys[1:]]
            pieces = [(d, f"The special magic number for {kk} is {v}.") for d, kk, v in zip(spots, keys, values)]
            key, value = keys[0], values[0]
            question = f"\n\nWhat is the special magic number for {key}? The special magic number for {key} is"
        else:
            names = rng.sample(_VARS, 4)
            value = str(rng.randrange(10**4, 10**5))
            spots = sorted([depth * 0.5, depth * 0.5 + 0.1, depth * 0.5 + 0.25, depth * 0.5 + 0.45])
            pieces = [(spots[0], f"VAR {names[0]} = {value}.")]
            pieces += [(spots[i], f"VAR {names[i]} = VAR {names[i - 1]}.") for i in range(1, 4)]
            question = (f"\n\nThe variables above are assigned in a chain. What number does VAR {names[3]} hold? "
                        f"VAR {names[3]} holds")
        rows.append({"context": _insert(tokenizer, hay, pieces, question, length), "answer": f" {value}",
                     "depth": depth})
    rng.shuffle(rows)
    return rows
