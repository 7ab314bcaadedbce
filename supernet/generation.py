"""Greedy generation, one home: the command line, the benchmarks, the pipeline and serving's tests call this.

Three engines, one contract (rows of new token ids, each cut after its first end-of-sequence token):

- eager (`static=False`): prefill, then one ordinary cached forward per token; the reference, and
  the CPU default.
- static (`static=True`, the CUDA default): the same steps on fixed-address caches
  (supernet/static_decode.py), replayed as a CUDA graph on CUDA.
- speculative (`draft=...`): a draft preset proposes k tokens, the target verifies them in one
  (k+1)-token step, batched over rows with ragged acceptance (supernet/speculative.py). Greedy
  output is the target's own; with `temperature > 0` the rejection step keeps the target's
  distribution.

`generate` picks one of them; `greedy_generate` and `speculative_generate` are the engines;
`greedy_tokens` and `speculative_tokens` are their one-sequence forms (token lists out), which the
tests, the benchmarks and the measurement code compare against.
"""
from __future__ import annotations

import torch

from supernet.cache import SupernetCache
from supernet.layout import PlacementLike
from supernet.speculative import SpecStats, check_draft_settings, pick, speculative_generate
from supernet.static_decode import StaticDecoder

__all__ = ["generate", "greedy_generate", "speculative_generate", "greedy_tokens", "speculative_tokens",
           "check_draft_settings", "SpecStats"]


def _cut_at_eos(rows: torch.Tensor, eos_token_id: int | None) -> list[list[int]]:
    out = []
    for row in rows.tolist():
        if eos_token_id is not None and eos_token_id in row:
            row = row[: row.index(eos_token_id) + 1]
        out.append(row)
    return out


@torch.no_grad()
def greedy_generate(model, input_ids: torch.Tensor, placement: PlacementLike, max_new_tokens: int,
                    eos_token_id: int | None = None, *, static: bool | None = None,
                    cuda_graph: bool | None = None, temperature: float = 0.0,
                    generator: torch.Generator | None = None) -> list[list[int]]:
    """The placement's greedy continuation of every row of input_ids [B, T] (or samples, temperature > 0).

    `static` defaults to True on CUDA (graph replay) and False elsewhere (the static step takes the
    argmax inside the graph, so sampling decodes eagerly); decoding stops early once every row has
    produced `eos_token_id`.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    device = input_ids.device
    static = device.type == "cuda" and temperature <= 0 if static is None else static
    if static and temperature > 0:
        raise ValueError("static decoding is greedy; sample with static=False")
    p = model.config.resolve(placement)
    cache = SupernetCache(model.config.num_hidden_layers)
    logits = model(input_ids, past_key_values=cache, use_cache=True, placement=p, logits_to_keep=1).logits
    token = pick(logits[:, -1:], temperature, generator)
    tokens = [token]
    finished = token[:, 0] == eos_token_id if eos_token_id is not None else None
    decoder = None
    if static and max_new_tokens > 1:
        decoder = StaticDecoder(model, p, cache, max_new_tokens=max_new_tokens - 1, cuda_graph=cuda_graph)
        decoder.start(token)
    for _ in range(max_new_tokens - 1):
        if finished is not None and bool(finished.all()):
            break
        if decoder is not None:
            token = decoder.step().clone()
        else:
            logits = model(token, past_key_values=cache, use_cache=True, placement=p).logits
            token = pick(logits[:, -1:], temperature, generator)
        tokens.append(token)
        if finished is not None:
            finished |= token[:, 0] == eos_token_id
    return _cut_at_eos(torch.cat(tokens, dim=1), eos_token_id)


def generate(model, input_ids: torch.Tensor, placement: PlacementLike, max_new_tokens: int,
             eos_token_id: int | None = None, *, draft: PlacementLike | None = None, k: int = 4,
             temperature: float = 0.0, generator: torch.Generator | None = None,
             static: bool | None = None, cuda_graph: bool | None = None) -> tuple[list[list[int]], SpecStats | None]:
    """New tokens per row and, when a draft is given, the speculative decoding statistics."""
    if draft is None:
        return greedy_generate(model, input_ids, placement, max_new_tokens, eos_token_id, static=static,
                               cuda_graph=cuda_graph, temperature=temperature, generator=generator), None
    return speculative_generate(model, input_ids, draft, placement, k, max_new_tokens, eos_token_id,
                                temperature=temperature, generator=generator, cuda_graph=cuda_graph)


def _one_row(input_ids: torch.Tensor, name: str) -> None:
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"{name} takes one sequence, input_ids [1, T]; got {tuple(input_ids.shape)} "
                         "(greedy_generate / speculative_generate take batches)")


def greedy_tokens(model, input_ids: torch.Tensor, placement: PlacementLike, max_new_tokens: int,
                  eos_token_id: int | None = None) -> list[int]:
    """The placement's greedy continuation of one sequence input_ids [1, T] (eager cached decoding)."""
    _one_row(input_ids, "greedy_tokens")
    return greedy_generate(model, input_ids, placement, max_new_tokens, eos_token_id, static=False)[0]


def speculative_tokens(model, input_ids: torch.Tensor, draft_placement: PlacementLike,
                       target_placement: PlacementLike, k: int = 4, max_new_tokens: int = 64,
                       eos_token_id: int | None = None) -> tuple[list[int], SpecStats]:
    """Greedy self-speculative decoding of one sequence: the target's own greedy continuation, and the stats."""
    _one_row(input_ids, "speculative_tokens")
    rows, stats = speculative_generate(model, input_ids, draft_placement, target_placement, k, max_new_tokens,
                                       eos_token_id)
    return rows[0], stats
