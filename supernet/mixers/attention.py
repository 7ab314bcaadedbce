"""Full attention (FA) and sliding-window attention (SWA): the teacher's attention, with decode caches.

Both have the teacher's projection shapes, so conversion copies the teacher's weights into each.
FA's cache grows with the context; SWA's never holds more than `config.swa_window` tokens.

Static decoding (`cache.static_position` set, see supernet/static_decode.py): a one-token step writes
its key/value at a slot given by a device tensor and attends over the whole fixed-size buffer with a
validity mask, so no Python int decides a shape or an index and the step can be replayed as a CUDA
graph.

Speculative decoding (supernet/speculative.py) uses the general form of the same static step: `t`
tokens per row and one position per row (`cache.static_position` of shape [B]), so rows may sit at
different lengths after ragged acceptance. FA's buffer is indexed by position, so taking back
rejected tokens is just moving the position back (slots after it are masked and later overwritten).
SWA keeps a ring of `window + lookahead` slots with the absolute position held in every slot
(`slot_pos`): writing `t <= lookahead + 1` tokens never overwrites a key some query of the step still
needs, and stale keys of rejected tokens are masked by their position until overwritten.
"""
from __future__ import annotations

import torch
from torch import nn

from supernet.cache import SupernetCache
from supernet.config import SupernetConfig
from supernet.mixers.rotary import apply_rotary, signed_sin
from supernet.ops.attention import causal_attention, decode_mask_bias, masked_decode_attention
from supernet.ops.norm import RMSNorm


class _GrowingKV:
    """Key/value buffer with doubling capacity, so a decode step appends in O(1) amortised copies."""

    @staticmethod
    def append(state: dict, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        length = state.get("len", 0)
        new_len = length + k.shape[2]
        buf_k = state.get("k")
        if buf_k is None or buf_k.shape[2] < new_len:
            capacity = max(new_len, 2 * (buf_k.shape[2] if buf_k is not None else 0), 16)
            shape = (k.shape[0], k.shape[1], capacity, k.shape[3])
            new_k, new_v = k.new_empty(shape), v.new_empty(shape)
            if length:
                new_k[:, :, :length] = state["k"][:, :, :length]
                new_v[:, :, :length] = state["v"][:, :, :length]
            state["k"], state["v"] = new_k, new_v
        state["k"][:, :, length:new_len] = k
        state["v"][:, :, length:new_len] = v
        state["len"] = new_len
        return state["k"][:, :, :new_len], state["v"][:, :, :new_len]

    @staticmethod
    def reserve(state: dict, capacity: int) -> None:
        """Grow the buffer to `capacity` slots once, zeroing the unused tail (masked keys must be finite)."""
        length, k = state["len"], state["k"]
        if k.shape[2] < capacity:
            shape = (k.shape[0], k.shape[1], capacity, k.shape[3])
            for name in ("k", "v"):
                grown = state[name].new_zeros(shape)
                grown[:, :, :length] = state[name][:, :, :length]
                state[name] = grown
        else:
            state["k"][:, :, length:].zero_()
            state["v"][:, :, length:].zero_()

    @staticmethod
    def write_at(state: dict, k: torch.Tensor, v: torch.Tensor, position: torch.Tensor):
        """Store one token at slot `position` ([1] long tensor); keys are valid up to and including it."""
        state["k"].index_copy_(2, position, k)
        state["v"].index_copy_(2, position, v)
        return state["k"], state["v"]


class _SlidingKV:
    """Ring buffer of the last `window` keys/values: token at absolute position p sits in slot p % window.

    Until the window fills, tokens are appended in place (like FA's buffer, capped at `window`). A
    one-token step into a full ring overwrites the oldest slot in place and attends over the whole
    ring: softmax attention does not care about key order (RoPE is already applied), so no copy of
    the window is made per decoded token. A longer step that crosses the window attends over
    (ordered tail + new tokens) and lays the ring out again.
    """

    @staticmethod
    def append(state: dict, k: torch.Tensor, v: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
        seen = state.get("len", 0)
        t = k.shape[2]
        if seen + t <= window:  # still filling: append in place
            if "k" not in state:
                shape = (k.shape[0], k.shape[1], window, k.shape[3])
                state["k"], state["v"] = k.new_empty(shape), v.new_empty(shape)
            state["k"][:, :, seen : seen + t] = k
            state["v"][:, :, seen : seen + t] = v
            state["len"] = seen + t
            return state["k"][:, :, : seen + t], state["v"][:, :, : seen + t]
        if t == 1 and seen >= window:
            slot = seen % window
            state["k"][:, :, slot : slot + 1] = k
            state["v"][:, :, slot : slot + 1] = v
            state["len"] = seen + 1
            return state["k"], state["v"]
        if seen:
            tail_k, tail_v = _SlidingKV.ordered(state, window)
            k, v = torch.cat([tail_k, k], dim=2), torch.cat([tail_v, v], dim=2)
        total = seen + t
        # Lay the last `window` tokens out so that absolute position p lands in slot p % window.
        shift = (total - window) % window
        state["k"] = torch.roll(k[:, :, -window:], shifts=shift, dims=2).contiguous()
        state["v"] = torch.roll(v[:, :, -window:], shifts=shift, dims=2).contiguous()
        state["len"] = total
        return k, v

    @staticmethod
    def reserve(state: dict, window: int) -> None:
        """The ring already has `window` slots; zero the ones not filled yet (masked keys must be finite)."""
        seen = state["len"]
        if seen < window:
            state["k"][:, :, seen:].zero_()
            state["v"][:, :, seen:].zero_()

    @staticmethod
    def write_at(state: dict, k: torch.Tensor, v: torch.Tensor, slot: torch.Tensor):
        """Store one token at `slot` (= position % window); slots are valid once written, i.e. slot
        s is valid when s <= position (key order is free)."""
        state["k"].index_copy_(2, slot, k)
        state["v"].index_copy_(2, slot, v)
        return state["k"], state["v"]

    @staticmethod
    def to_position_ring(state: dict, window: int, lookahead: int) -> None:
        """Lay the kept keys out in a ring of `window + lookahead` slots (position p in slot p % size)
        and record each slot's absolute position in `slot_pos` [B, size] (-1: empty)."""
        seen = state["len"]
        k, v = _SlidingKV.ordered(state, window)
        kept = k.shape[2]
        size = window + lookahead
        b, h, _, d = k.shape
        positions = torch.arange(seen - kept, seen, device=k.device)
        slots = positions % size
        ring_k, ring_v = k.new_zeros(b, h, size, d), v.new_zeros(b, h, size, d)
        ring_k[:, :, slots], ring_v[:, :, slots] = k, v
        slot_pos = torch.full((b, size), -1, dtype=torch.long, device=k.device)
        slot_pos[:, slots] = positions
        state["k"], state["v"], state["slot_pos"] = ring_k, ring_v, slot_pos

    @staticmethod
    def ordered(state: dict, window: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The kept keys/values in position order."""
        seen, k, v = state["len"], state["k"], state["v"]
        if seen <= window:
            return k[:, :, :seen], v[:, :, :seen]
        shift = seen % window
        return torch.roll(k, shifts=-shift, dims=2), torch.roll(v, shifts=-shift, dims=2)


def static_rows_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: dict, cache: SupernetCache,
                          window: int | None, scale: float) -> torch.Tensor:
    """Static step of `t` tokens per row (q [B, Hq, t, D], k/v [B, Hkv, t, D]), row b starting at
    position `cache.static_position[b]`: writes k/v into the fixed-address cache `state` (FA: slot =
    position; SWA: the position ring) and returns the attention output [B, Hq, t, D]. Shared by the
    reference mixer and serving's drafter, which feeds it q/k/v from vLLM's projections."""
    b, _, t, d = q.shape
    positions = (cache.static_position.view(-1, 1) + torch.arange(t, device=q.device)).expand(b, t)
    size = state["k"].shape[2]
    slots = positions if window is None else torch.remainder(positions, size)
    index = slots[:, None, :, None].expand(b, k.shape[1], t, d)
    state["k"].scatter_(2, index, k)
    state["v"].scatter_(2, index, v)
    if window is None:
        key_pos = torch.arange(size, device=q.device).expand(b, size)
    else:
        if t > size - window + 1:
            raise ValueError(f"a static SWA step of {t} tokens needs a ring of {window + t - 1} slots, "
                             f"this one has {size}; prepare with a larger lookahead")
        state["slot_pos"].scatter_(1, slots, positions)
        key_pos = state["slot_pos"]

    hq, hkv = q.shape[1], k.shape[1]
    group = hq // hkv

    def bias() -> torch.Tensor:
        kp, qp = key_pos[:, None, :], positions[:, :, None]  # [B, 1, S], [B, t, 1]
        live = (kp <= qp) & (kp >= 0)
        if window is not None:
            live &= kp > qp - window
        mask = torch.zeros(live.shape, dtype=q.dtype, device=q.device).masked_fill_(~live, float("-inf"))
        return mask.repeat(1, group, 1)[:, None]  # [B, 1, group * t, S]: rows (query head in group, token)

    # The query heads of each KV group are folded into the query-length axis (as in one-token
    # decoding, ops.attention.masked_decode_attention): SDPA with a mask and enable_gqa takes its
    # math path on CUDA, which expands the whole cache to every query head and made a
    # (k+1)-token verify step at batch 64, context 8k cost 5x a one-token step on an H200.
    # Every layer of a kind writes the same positions, so one mask serves them all.
    mask = cache.shared(("rows_bias", window, size, t, group, q.dtype), bias, source=cache.static_position)
    folded = q.reshape(b, hkv, group * t, d)
    out = torch.nn.functional.scaled_dot_product_attention(folded, state["k"], state["v"], attn_mask=mask,
                                                           scale=scale)
    return out.reshape(b, hq, t, d)


class AttentionMixer(nn.Module):
    """Causal GQA attention with RoPE; `window=None` is FA, an integer window is SWA.

    Follows the teacher's family: optional q/k RMSNorm before RoPE (`config.qk_norm`: per head, or
    over the whole projection as in OLMo 2), the score scale `query_pre_attn_scalar ** -0.5` when
    set (Gemma 3) else `head_dim ** -0.5`, and the RoPE of its layer's kind (given by the model).
    """

    name = "fa"

    def __init__(self, config: SupernetConfig, layer_idx: int, window: int | None = None) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.window = window
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = (config.query_pre_attn_scalar or self.head_dim) ** -0.5
        # layers of the teacher's two kinds (Gemma 3) get different (cos, sin): memo them apart
        self.rope_key = ("rope_signed_sin", config.uses_sliding_rope(layer_idx))
        d, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(d, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, d, bias=bias)
        self.qk_norm = config.qk_norm
        if self.qk_norm != "none":
            whole = self.qk_norm == "whole"
            self.q_norm = RMSNorm(self.num_heads * self.head_dim if whole else self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.num_kv_heads * self.head_dim if whole else self.head_dim, config.rms_norm_eps)

    def _project(self, x: torch.Tensor, proj: nn.Linear, norm_name: str, heads: int) -> torch.Tensor:
        """proj(x) as [B, H, T, Dh], q/k-normalised as the teacher does (before RoPE)."""
        b, t, _ = x.shape
        y = proj(x)
        if self.qk_norm == "whole":
            y = getattr(self, norm_name)(y)
        y = y.view(b, t, heads, self.head_dim)
        if self.qk_norm == "per_head":
            y = getattr(self, norm_name)(y)
        return y.transpose(1, 2)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: SupernetCache | None = None,
    ) -> torch.Tensor:
        b, t, _ = hidden_states.shape
        q = self._project(hidden_states, self.q_proj, "q_norm", self.num_heads)
        k = self._project(hidden_states, self.k_proj, "k_norm", self.num_kv_heads)
        v = self.v_proj(hidden_states).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if position_embeddings is None:
            raise ValueError("attention mixers need rotary position embeddings (cos, sin)")
        cos, sin = position_embeddings
        signed = cache.shared(self.rope_key, lambda: signed_sin(sin), source=sin) if cache is not None else None
        q, k = apply_rotary(q, k, cos, sin, signed)
        if cache is not None and cache.static_position is not None:
            state = cache.mixer_state(self.layer_idx, self.name)
            if t != 1 or cache.static_position.numel() != 1 or "slot_pos" in state:
                return self._static_rows(q, k, v, state, cache)
            state = cache.mixer_state(self.layer_idx, self.name)
            position = cache.static_position
            if self.window is None:
                k, v = _GrowingKV.write_at(state, k, v, position)
            else:
                slot = cache.shared(("ring_slot", self.window), lambda: torch.remainder(position, self.window),
                                    source=position)
                k, v = _SlidingKV.write_at(state, k, v, slot)
            size = k.shape[2]  # the fixed buffer (FA) or the ring (SWA): slot s is live when s <= position
            bias = cache.shared(("decode_bias", size, q.dtype),
                                lambda: decode_mask_bias(size, position, q.dtype), source=position)
            out = masked_decode_attention(q, k, v, bias, scale=self.scale)
            return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))
        if cache is not None:
            k, v = self._update_cache(cache.mixer_state(self.layer_idx, self.name), k, v, t)
        out = causal_attention(q, k, v, scale=self.scale, window=self.window)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))

    def _static_rows(self, q, k, v, state: dict, cache: SupernetCache) -> torch.Tensor:
        """Static step of `t` tokens per row, row b starting at position `cache.static_position[b]`."""
        b, _, t, _ = q.shape
        out = static_rows_attention(q, k, v, state, cache, self.window, self.scale)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))

    def _update_cache(self, state: dict, k: torch.Tensor, v: torch.Tensor, t: int):
        if self.window is None:
            return _GrowingKV.append(state, k, v)
        return _SlidingKV.append(state, k, v, self.window)

    def prepare_static(self, state: dict, capacity: int, lookahead: int = 0) -> None:
        """Make this mixer's cache fixed-size for static decoding up to `capacity` total tokens.

        `lookahead` > 0 (speculative steps of up to lookahead + 1 tokens): SWA moves to the
        position ring (`_SlidingKV.to_position_ring`); FA needs nothing more than the capacity.
        """
        if self.window is None:
            _GrowingKV.reserve(state, capacity)
        elif lookahead > 0:
            _SlidingKV.to_position_ring(state, self.window, lookahead)
        else:
            _SlidingKV.reserve(state, self.window)

    def prepare_history(self, state: dict, slots: int) -> None:
        """Attention needs no per-token history: rolling back is moving the position back."""

    def rollback(self, state: dict, index: torch.Tensor) -> None:
        """Nothing to undo in place (see `prepare_history`)."""

    @torch.no_grad()
    def init_from_attention(
        self, q_w: torch.Tensor, k_w: torch.Tensor, v_w: torch.Tensor, o_w: torch.Tensor,
        num_heads: int, num_kv_heads: int, head_dim: int,
        biases: dict[str, torch.Tensor] | None = None,
        norms: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Copy the teacher's attention projections (same shapes by construction); `biases` and
        `norms` ("q_norm"/"k_norm" weights) by module name, when the teacher has them."""
        if (num_heads, num_kv_heads, head_dim) != (self.num_heads, self.num_kv_heads, self.head_dim):
            raise ValueError(
                f"teacher attention has {num_heads}/{num_kv_heads} heads of {head_dim}, "
                f"mixer has {self.num_heads}/{self.num_kv_heads} of {self.head_dim}"
            )
        for proj, w in ((self.q_proj, q_w), (self.k_proj, k_w), (self.v_proj, v_w), (self.o_proj, o_w)):
            proj.weight.copy_(w)
        for name, b in (biases or {}).items():
            getattr(self, name).bias.copy_(b)
        if bool(norms) != (self.qk_norm != "none"):
            raise ValueError(f"teacher q/k norms {sorted(norms or {})} do not match qk_norm={self.qk_norm!r}")
        for name, w in (norms or {}).items():
            getattr(self, name).weight.copy_(w)


class SlidingWindowAttentionMixer(AttentionMixer):
    name = "swa"

    def __init__(self, config: SupernetConfig, layer_idx: int) -> None:
        super().__init__(config, layer_idx, window=config.swa_window)
