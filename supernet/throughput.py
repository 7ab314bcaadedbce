"""Decode throughput of a placement with our own engine: prefill a context, then time greedy steps.

Used for the speed column of the results table (ratios against all-fa measured in the same run).
Only the last position's logits are computed, so a long prefill never materialises vocab x context.
"""
from __future__ import annotations

import time

import torch

from supernet.cache import SupernetCache
from supernet.model import SupernetForCausalLM
from supernet.placement import PlacementLike


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure_decode(
    model: SupernetForCausalLM,
    placement: PlacementLike,
    *,
    batch: int,
    context: int,
    new_tokens: int,
    warmup: int = 3,
    prefill_chunk: int = 2048,
    seed: int = 0,
) -> dict:
    """Tokens/s of greedy decoding after a `context`-token prefill (random tokens), batch `batch`."""
    device = next(model.parameters()).device
    g = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, context), generator=g).to(device)
    cache = SupernetCache(model.config.num_hidden_layers)
    t0 = time.perf_counter()
    for start in range(0, context, prefill_chunk):  # chunked prefill bounds activation memory
        out = model(ids[:, start : start + prefill_chunk], past_key_values=cache, use_cache=True,
                    placement=placement, logits_to_keep=1)
    _sync(device)
    prefill_s = time.perf_counter() - t0
    token = out.logits[:, -1:].argmax(-1)
    for _ in range(warmup):
        token = model(token, past_key_values=cache, use_cache=True, placement=placement).logits.argmax(-1)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        token = model(token, past_key_values=cache, use_cache=True, placement=placement).logits.argmax(-1)
    _sync(device)
    elapsed = time.perf_counter() - t0
    return {
        "batch": batch,
        "context": context,
        "new_tokens": new_tokens,
        "prefill_s": prefill_s,
        "ms_per_step": 1e3 * elapsed / new_tokens,
        "tokens_per_s": batch * new_tokens / elapsed,
    }


def compare_decode(
    model: SupernetForCausalLM,
    placements: dict[str, PlacementLike],
    *,
    batch: int,
    context: int,
    new_tokens: int,
) -> dict[str, dict]:
    """Decode speed of several placements side by side: a warm-up pass over all, then a timed pass.

    The first pass pays for allocator growth and kernel compilation, which once made the first
    placement measured look three times slower than the same placement measured later.
    """
    results: dict[str, dict] = {}
    device = next(model.parameters()).device
    for timed in (False, True):
        for name, placement in placements.items():
            results[name] = measure_decode(model, placement, batch=batch, context=context,
                                           new_tokens=new_tokens if timed else 2)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return results
