"""Self-speculative decoding: a fast preset of the same weights drafts, the target preset verifies.

Two halves:

- `speculative_generate` (no vLLM): the reference engine on our own model, CPU or GPU, batch 1,
  greedy. Output is the target preset's own greedy continuation: a draft token is kept only if it
  equals the target's argmax after the tokens before it, and the first disagreement is replaced
  by the target's token. `greedy_generate` is the target-only baseline with the same loop.
- `supernet.serving.drafter.SupernetDrafter` is the vLLM side (vLLM verifies; our drafter proposes), and
  reuses `snapshot` / `restore` from here.

Rolling back after a rejection: attention KV can be cut back to a length, recurrent (GDN/KDA) and
sliding-window states cannot, so `snapshot` keeps the FA lengths and clones every other state;
`restore` puts them back. The target then re-reads the accepted tokens (one forward of n+1
tokens) unless all its layers are FA, where cutting the KV back is enough.

Numerics: verification runs k+1 tokens in one forward, plain decoding one token per forward;
float32 results can differ in the last bits between those shapes, so "identical output" holds
unless two logits tie to within rounding (the tests check token equality).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from supernet.cache import SupernetCache
from supernet.layout import Placement, PlacementLike


# -- cache snapshots ------------------------------------------------------------------------------
def snapshot(cache: SupernetCache) -> tuple[int, list[dict[str, Any]]]:
    """What `restore` needs to undo any later tokens: FA lengths, copies of all other states."""
    layers = []
    for layer in cache.states:
        saved = {}
        for mixer, state in layer.items():
            if mixer == "fa" and "len" in state:
                saved[mixer] = ("len", state["len"])
            else:
                saved[mixer] = ("copy", {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()})
        layers.append(saved)
    return cache.seen_tokens, layers


def restore(cache: SupernetCache, snap: tuple[int, list[dict[str, Any]]]) -> None:
    seen, layers = snap
    cache.seen_tokens = seen
    for i, saved in enumerate(layers):
        for mixer in list(cache.states[i]):
            if mixer not in saved:
                del cache.states[i][mixer]
        for mixer, (kind, value) in saved.items():
            if kind == "len":
                cache.states[i][mixer]["len"] = value
            else:
                cache.states[i][mixer] = dict(value)


def _forward(model, tokens: torch.Tensor, cache: SupernetCache, placement: Placement) -> torch.Tensor:
    """Feed `tokens` [1, T] into `cache`; returns the logits of every fed position [T, vocab]."""
    out = model(input_ids=tokens, past_key_values=cache, use_cache=True, placement=placement)
    return out.logits[0]


@dataclass
class SpecStats:
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    target_forwards: int = 0
    draft_forwards: int = 0
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    accepted_per_round: list[int] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_round(self) -> float:
        return (self.accepted + self.rounds) / self.rounds if self.rounds else 0.0

    def as_dict(self) -> dict[str, float]:
        return {"rounds": self.rounds, "drafted": self.drafted, "accepted": self.accepted,
                "acceptance_rate": self.acceptance_rate, "tokens_per_round": self.tokens_per_round,
                "target_forwards": self.target_forwards, "draft_forwards": self.draft_forwards,
                "draft_seconds": self.draft_seconds, "verify_seconds": self.verify_seconds}


def _placement(model, value: PlacementLike) -> Placement:
    return model.config.resolve(value)


@torch.no_grad()
def greedy_generate(model, input_ids: torch.Tensor, placement: PlacementLike, max_new_tokens: int,
                    eos_token_id: int | None = None) -> list[int]:
    """Target-only greedy decoding with a SupernetCache: prefill, then one token per forward."""
    p = _placement(model, placement)
    cache = SupernetCache(model.config.num_hidden_layers)
    logits = _forward(model, input_ids, cache, p)[-1]
    out: list[int] = []
    while len(out) < max_new_tokens:
        token = int(logits.argmax())
        out.append(token)
        if token == eos_token_id or len(out) == max_new_tokens:
            break
        logits = _forward(model, torch.tensor([[token]], device=input_ids.device), cache, p)[-1]
    return out


@torch.no_grad()
def speculative_generate(
    model,
    input_ids: torch.Tensor,
    draft_placement: PlacementLike,
    target_placement: PlacementLike,
    k: int = 4,
    max_new_tokens: int = 64,
    eos_token_id: int | None = None,
) -> tuple[list[int], SpecStats]:
    """Greedy self-speculative decoding on one sequence (input_ids [1, T]).

    Returns (new token ids, stats); the tokens are the target placement's greedy continuation.
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"speculative_generate decodes one sequence; got input_ids of shape {tuple(input_ids.shape)}")
    if k < 1:
        raise ValueError(f"k (draft tokens per round) must be >= 1, got {k}")
    draft, target = _placement(model, draft_placement), _placement(model, target_placement)
    device = input_ids.device
    stats = SpecStats()
    layers = model.config.num_hidden_layers
    target_cache, draft_cache = SupernetCache(layers), SupernetCache(layers)
    target_only_fa = all(m == "fa" for m in target)

    t0 = time.perf_counter()
    logits = _forward(model, input_ids, target_cache, target)[-1]
    stats.target_forwards += 1
    stats.verify_seconds += time.perf_counter() - t0
    out = [int(logits.argmax())]
    # tokens the draft cache has yet to read (it lags the committed text)
    pending = input_ids[0].tolist()
    while len(out) < max_new_tokens and out[-1] != eos_token_id:
        last = out[-1]
        room = min(k, max_new_tokens - len(out))
        # -- draft: read pending + last, then propose `room` tokens ------------------------------
        t0 = time.perf_counter()
        feed = torch.tensor([pending + [last]], device=device)
        d_logits = _forward(model, feed, draft_cache, draft)[-1]
        stats.draft_forwards += 1
        draft_snap = snapshot(draft_cache)  # draft has read exactly the committed text
        proposals = [int(d_logits.argmax())]
        for _ in range(room - 1):
            d_logits = _forward(model, torch.tensor([[proposals[-1]]], device=device), draft_cache, draft)[-1]
            stats.draft_forwards += 1
            proposals.append(int(d_logits.argmax()))
        stats.draft_seconds += time.perf_counter() - t0
        # -- verify: the target reads last + proposals in one forward ----------------------------
        t0 = time.perf_counter()
        target_snap = None if target_only_fa else snapshot(target_cache)
        v_logits = _forward(model, torch.tensor([[last] + proposals], device=device), target_cache, target)
        stats.target_forwards += 1
        choice = v_logits.argmax(-1).tolist()  # target's token after last, d1, ..., d_room
        n = 0
        while n < room and proposals[n] == choice[n]:
            n += 1
        new = proposals[:n] + [choice[n]]  # accepted drafts + correction (or bonus)
        if n < room:  # the target read rejected drafts: take them back
            if target_only_fa:
                target_cache.seen_tokens -= room - n
                for state in target_cache.states:
                    if "fa" in state:
                        state["fa"]["len"] -= room - n
            else:
                restore(target_cache, target_snap)
                _forward(model, torch.tensor([[last] + proposals[:n]], device=device), target_cache, target)
                stats.target_forwards += 1
        stats.verify_seconds += time.perf_counter() - t0
        # -- bookkeeping ----------------------------------------------------------------------
        restore(draft_cache, draft_snap)
        pending = proposals[:n]  # committed drafts the draft cache has not read yet (after restore)
        stats.rounds += 1
        stats.drafted += room
        stats.accepted += n
        stats.accepted_per_round.append(n)
        for token in new:
            if len(out) >= max_new_tokens:
                break
            out.append(token)
            if token == eos_token_id:
                break
    return out[:max_new_tokens], stats
