"""Decode caches for a supernet: one small state dict per (layer, mixer).

Each mixer owns the layout of its own state (FA/SWA: key/value tensors, SWA trimmed to its window;
GDN/KDA: convolution tails and the recurrent matrix), so the model never needs to know which mixer
is active. Several caches can live side by side, e.g. one per placement in self-speculative decoding.
"""
from __future__ import annotations

from typing import Any, Callable

import torch


class SupernetCache:
    """Per-layer mixer states plus the number of tokens already consumed."""

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self.states: list[dict[str, dict[str, Any]]] = [dict() for _ in range(num_layers)]
        self.seen_tokens = 0
        # Set by static decoding (supernet/static_decode.py): the [1] long device tensor holding the
        # position of the token being decoded; attention mixers then write and mask by tensor index.
        self.static_position: torch.Tensor | None = None
        # Set by speculative decoding (supernet/speculative.py): a [1] long device tensor, the history
        # slot of this step's first token. Recurrent mixers then keep their state after every token
        # there, so rejected tokens are taken back by `rollback` instead of being recomputed.
        self.history_slot: torch.Tensor | None = None
        # Tensors that every layer of one forward would otherwise rebuild (RoPE's sign flip, the
        # static decode mask); cleared when a forward or a static step begins (`shared`).
        self.forward_memo: dict[Any, tuple[torch.Tensor | None, torch.Tensor]] = {}

    def shared(self, key: Any, make: Callable[[], torch.Tensor], source: torch.Tensor | None = None) -> torch.Tensor:
        """`make()` once per forward, for all layers: a decode step of a small model is bound by
        kernel launches, and these few kernels per layer add up over 30 layers.

        `source`: the tensor the value is made from; the memo keeps it and reuses the value only for
        that very tensor, so callers that run mixers without a model forward (which clears the memo),
        such as serving's drafter, never get a value made from another step's tensor.
        """
        entry = self.forward_memo.get(key)
        if entry is None or entry[0] is not source:
            entry = self.forward_memo[key] = (source, make())
        return entry[1]

    def mixer_state(self, layer_idx: int, mixer: str) -> dict[str, Any]:
        """The mutable state dict of `mixer` in layer `layer_idx`, created empty on first use."""
        return self.states[layer_idx].setdefault(mixer, {})

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def advance(self, num_tokens: int) -> None:
        self.seen_tokens += num_tokens

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "SupernetCache":
        out = SupernetCache(self.num_layers)
        out.seen_tokens = self.seen_tokens
        for i, layer in enumerate(self.states):
            out.states[i] = {
                m: {k: fn(v) if isinstance(v, torch.Tensor) else v for k, v in st.items()}
                for m, st in layer.items()
            }
        return out

    def clone(self) -> "SupernetCache":
        """A deep copy, so a speculative step can be undone by restoring it."""
        return self._map(lambda t: t.clone())

    def reorder_cache(self, beam_idx: torch.LongTensor) -> "SupernetCache":
        """Select batch rows (beam search); every state tensor has the batch first."""
        mapped = self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))
        self.states = mapped.states
        return self

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.states = self._map(lambda t: t.repeat_interleave(repeats, dim=0)).states

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.states = self._map(lambda t: t[indices]).states

    # transformers' generate() reads these attributes on any cache object
    is_compileable = False

    def __len__(self) -> int:
        return self.num_layers
