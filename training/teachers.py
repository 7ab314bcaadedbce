"""Several teachers in one distillation run: `teacher.teachers` with weights, `teacher.mode` mix | alternate.

Each teacher is online (a frozen model run on the batch) or offline (its own top-K cache written by
`supernet cache-logits`); all share the student's tokenizer (training/README.md shows how to get
there from another vocabulary) and score the same windows.

mode `mix` distils toward the weighted mixture of the teachers' *log-probabilities*,
log p(v) = sum_i w_i log p_i(v) - log Z (weights normalised to sum 1; a product of experts). Why
log-probabilities and not probabilities: (1) for online teachers it is exactly one teacher whose
logits are the weighted mean of theirs (softmax's per-row constants cancel), so it runs through the
fused single-target kernels at the cost of one lm_head matmul per teacher, for every loss kind;
(2) a token that any teacher finds implausible stays implausible, while a probability mixture
keeps every teacher's modes and so asks a smaller student to cover all of them. (Summing the
per-teacher KLs instead would be the probability mixture: sum_i w_i KL(p_i || q) = CE(sum_i w_i p_i, q) + const.)
An offline teacher knows only its top-K; outside them its tail mass is spread evenly (the
maximum-entropy completion). When every teacher of a mix is offline, the mixture stays in top-K
form: the union of their ids (rows padded, `TopKTargets.valid`) plus one tail bucket, the same
K + 1-bucket KL as a single cache; a cache listed twice gives back its own targets. When any is
online, the target is dense over the vocabulary.

mode `alternate` uses one teacher per optimizer step (all its micro-batches), chosen by
`alternate_teacher(step, weights)`: a pure function of the step (a golden-ratio Weyl sequence in
64-bit integers), so a resumed run picks the same teachers, and over N consecutive steps teacher i gets
N w_i steps up to a few (the sequence's discrepancy). That step computes exactly the
single-teacher loss of the chosen one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from supernet.training.losses import TopKTargets

GOLDEN_64 = 0x9E3779B97F4A7C15  # round(2^64 / golden ratio): the Weyl sequence's step


def normalised(weights: Sequence[float]) -> list[float]:
    total = float(sum(weights))
    return [float(w) / total for w in weights]


def alternate_teacher(step: int, weights: Sequence[float]) -> int:
    """The teacher of optimizer step `step` under mode alternate (deterministic, weight-proportional)."""
    u = ((step + 1) * GOLDEN_64 % 2**64) / 2.0**64
    acc = 0.0
    probs = normalised(weights)
    for i, p in enumerate(probs):
        acc += p
        if u < acc and p > 0:
            return i
    return max(i for i, p in enumerate(probs) if p > 0)  # u within rounding of 1


def active_teachers(mode: str, step: int, weights: Sequence[float]) -> list[tuple[int, float]]:
    """(teacher index, weight) pairs that give this step's target; weights sum to 1."""
    if mode == "alternate":
        return [(alternate_teacher(step, weights), 1.0)]
    return [(i, w) for i, w in enumerate(normalised(weights)) if w > 0]


def _completion(tk: TopKTargets, vocab: int) -> Tensor:
    """log-probability of each id outside an offline teacher's top-K (its tail spread evenly) [N]."""
    outside = vocab - tk.ids.shape[1]
    return torch.log(tk.tail.clamp_min(1e-30)) - math.log(max(outside, 1))


def merge_topk(teachers: Sequence[tuple[TopKTargets, float]], vocab: int, chunk: int = 2048) -> TopKTargets:
    """The log-probability mixture of offline teachers, in top-K form (see the module docstring)."""
    ids = torch.cat([tk.ids for tk, _ in teachers], 1)
    ids, _ = ids.sort(1)
    dup = torch.zeros_like(ids, dtype=torch.bool)
    dup[:, 1:] = ids[:, 1:] == ids[:, :-1]
    valid = ~dup
    total = torch.zeros(ids.shape, dtype=torch.float32, device=ids.device)
    tail_log = torch.zeros(ids.shape[0], dtype=torch.float32, device=ids.device)
    for tk, w in teachers:
        base = _completion(tk, vocab)
        tail_log += w * base
        for s in range(0, ids.shape[0], chunk):  # [n, M, K] comparisons, a chunk of rows at a time
            match = ids[s: s + chunk, :, None] == tk.ids[s: s + chunk, None, :]
            value = (match * tk.logprobs[s: s + chunk, None, :].float()).sum(-1)
            total[s: s + chunk] += w * torch.where(match.any(-1), value, base[s: s + chunk, None])
    outside = vocab - valid.sum(-1)
    tail_mass_log = tail_log + torch.log(outside.float())  # -inf when the union covers the vocabulary
    log_z = torch.logsumexp(torch.cat([total.masked_fill(dup, -math.inf), tail_mass_log[:, None]], 1), 1)
    return TopKTargets(ids, total - log_z[:, None], torch.exp(tail_mass_log - log_z), valid)


@dataclass
class MixedTeacherLogits:
    """Dense target logits of a mix with at least one online teacher, one chunk of rows at a time.

    z_mix = sum_i w_i z_i (online: raw logits) + tau * sum_j w_j log p_j (offline, completed), so
    that log_softmax(z_mix / tau) is the normalised log-probability mixture at temperature tau."""

    online: list[tuple[Tensor, Tensor, float]]  # (final hidden [N, D_i], lm_head weight [V, D_i], w_i)
    offline: list[tuple[TopKTargets, float]]
    temperature: float
    vocab: int

    def prepare(self, compute_dtype: torch.dtype) -> None:
        self._cd = compute_dtype
        self._weights = [w.detach().to(compute_dtype) for _, w, _ in self.online]

    def logits(self, s: int, e: int) -> Tensor:
        out = None
        for (h, _, c), w in zip(self.online, self._weights):
            z = (h[s:e].to(self._cd) @ w.t()).float() * c
            out = z if out is None else out.add_(z)
        for tk, c in self.offline:
            dense = _completion(tk, self.vocab)[s:e, None].expand(e - s, self.vocab).clone()
            dense.scatter_(1, tk.ids[s:e], tk.logprobs[s:e].float())
            out.add_(dense, alpha=self.temperature * c)
        return out


class MultiTeacherData:
    """The training windows with every offline teacher's top-K for them (`extras["topks"]`).

    `base` gives the windows (the packed data.train when a teacher is online, else the first
    cache); every cache must hold the same windows, which each batch checks token by token."""

    def __init__(self, base: Any, caches: dict[int, Any]) -> None:
        self.base = base
        self.caches = caches
        self.num_windows = min([len(base)] + [len(c) for c in caches.values()])

    def __len__(self) -> int:
        return self.num_windows

    def target_counts(self, indices: Sequence[int]) -> int:
        return self.base.target_counts(indices)

    def get(self, indices: Sequence[int]):
        from supernet.training.data import Batch
        from supernet.training.logit_cache import CacheError

        batch = self.base.get(indices)
        topks = {}
        for slot, cache in self.caches.items():
            got = batch if cache is self.base else cache.get(indices)
            if not (torch.equal(got.input_ids, batch.input_ids) and torch.equal(got.mask, batch.mask)):
                raise CacheError(f"teacher {slot}'s cache {cache.path} holds other windows than the training data "
                                 f"(windows {list(indices)[:4]}); write every cache from the same data.train, "
                                 "data.seq_len and tokenizer")
            topks[slot] = {k: got.extras[k] for k in ("topk_ids", "topk_logprobs", "topk_tail")}
        return Batch(batch.input_ids, batch.labels, batch.mask, batch.index, {"topks": topks})
