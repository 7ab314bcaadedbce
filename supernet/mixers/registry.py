"""One description per mixer: what it weighs, what it keeps per sequence, what a token costs.

Everything here is computed from config attributes alone (no torch, no transformers), so the cost
model in supernet.placement stays pure numpy, and adding a mixer means adding one `MixerSpec` here
(plus its module). Any object with SupernetConfig's attribute names works as `config`.

Each spec declares:
- `parameter_shapes(config)`: its checkpoint parameters (names relative to
  `model.layers.<i>.mixers.<name>.`) with their shapes; `params()` splits them into matmul weights
  (2-D projections) and the rest (convolutions, gates, norms, biases).
- `state_shapes(config, batch, context)`: the live decode state after `context` tokens, one entry per
  tensor the mixer keeps in its SupernetCache state dict (FA grows, SWA stops at the window, GDN/KDA
  keep three short-conv tails and a float32 recurrent matrix).
- `cache_bytes` (held per sequence), `decode_bytes` (moved per sequence per decode step: the cache
  read plus what the step writes), `decode_flops` / `prefill_flops` (per token).
- `class_path` (the torch module, read by supernet.mixers.mixer_class), `vllm_layer` (the serving
  class, "module:Class", imported only by serving), `family` ("attention" or "linear").
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import Any

from supernet.layout import MIXERS

CHUNK = 64  # chunk size of the chunked delta rule, for its FLOP count
MODEL_DTYPE, FLOAT32 = "model", "float32"  # state tensor dtypes: the model's own, or always fp32


@dataclass(frozen=True)
class StateShape:
    """One tensor of a mixer's decode state: its shape and whether it is kept in the model dtype or fp32."""

    shape: tuple[int, ...]
    dtype: str = MODEL_DTYPE

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def nbytes(self, dtype_bytes: int, state_bytes: int = 4) -> int:
        return self.numel * (state_bytes if self.dtype == FLOAT32 else dtype_bytes)


def mean_visible_keys(context: int, window: int | None) -> float:
    """Average number of keys a causal query sees over a prompt of `context` tokens."""
    n = context
    if window is None or window >= n:
        return (n + 1) / 2
    w = window
    return (w * (w + 1) / 2 + (n - w) * w) / n


@dataclass(frozen=True)
class MixerSpec:
    """What the rest of the project needs to know about one mixer without building it."""

    name: str
    family: str
    class_path: str  # "module:Class" of the torch module
    vllm_layer: str  # "module:Class" of the vLLM serving layer (imported by serving only)

    # -- subclasses fill these -------------------------------------------------------------------
    def parameter_shapes(self, config: Any) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    def state_shapes(self, config: Any, batch: int, context: int) -> dict[str, StateShape]:
        raise NotImplementedError

    def decode_flops(self, config: Any, context: int) -> float:
        raise NotImplementedError

    def prefill_flops(self, config: Any, context: int) -> float:
        raise NotImplementedError

    # -- derived ---------------------------------------------------------------------------------
    def checkpoint_names(self, config: Any) -> list[str]:
        return sorted(self.parameter_shapes(config))

    def params(self, config: Any) -> dict[str, int]:
        """Parameter counts split into matmul weights (2-D) and the rest."""
        matmul = other = 0
        for shape in self.parameter_shapes(config).values():
            if len(shape) == 2:
                matmul += math.prod(shape)
            else:
                other += math.prod(shape)
        return {"matmul": matmul, "other": other}

    def num_params(self, config: Any) -> int:
        return sum(self.params(config).values())

    def weight_bytes(self, config: Any, dtype_bytes: int = 2) -> int:
        return self.num_params(config) * dtype_bytes

    def cache_bytes(self, config: Any, context: int, dtype_bytes: int = 2, state_bytes: int = 4) -> int:
        """Bytes one sequence's decode state holds after `context` tokens."""
        return sum(s.nbytes(dtype_bytes, state_bytes) for s in self.state_shapes(config, 1, context).values())

    def decode_bytes(self, config: Any, context: int, dtype_bytes: int = 2, state_bytes: int = 4) -> float:
        """Bytes one sequence moves per decode step at `context` (cache or state; weights excluded)."""
        raise NotImplementedError

    def module_class(self) -> type:
        module, _, cls = self.class_path.partition(":")
        return getattr(importlib.import_module(module), cls)

    def vllm_layer_class(self) -> type:
        """The serving layer (imports vLLM: call it from supernet.serving only)."""
        module, _, cls = self.vllm_layer.partition(":")
        return getattr(importlib.import_module(module), cls)

    def window(self, config: Any) -> int | None:
        return None


def _proj_flops(spec: MixerSpec, config: Any) -> float:
    return 2.0 * spec.params(config)["matmul"]


@dataclass(frozen=True)
class AttentionSpec(MixerSpec):
    """GQA attention with RoPE; `windowed` = SWA (a ring of `config.swa_window` tokens)."""

    windowed: bool = False

    def window(self, config: Any) -> int | None:
        return int(config.swa_window) if self.windowed else None

    def parameter_shapes(self, config: Any) -> dict[str, tuple[int, ...]]:
        D, hq, hkv, dh = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        shapes = {"q_proj.weight": (hq * dh, D), "k_proj.weight": (hkv * dh, D),
                  "v_proj.weight": (hkv * dh, D), "o_proj.weight": (D, hq * dh)}
        if config.attention_bias:
            shapes.update({"q_proj.bias": (hq * dh,), "k_proj.bias": (hkv * dh,), "v_proj.bias": (hkv * dh,),
                           "o_proj.bias": (D,)})
        return shapes

    def kept_tokens(self, config: Any, context: int) -> int:
        w = self.window(config)
        return context if w is None else min(context, w)

    def state_shapes(self, config: Any, batch: int, context: int) -> dict[str, StateShape]:
        shape = (batch, config.num_key_value_heads, self.kept_tokens(config, context), config.head_dim)
        return {"k": StateShape(shape), "v": StateShape(shape)}

    def decode_bytes(self, config: Any, context: int, dtype_bytes: int = 2, state_bytes: int = 4) -> float:
        per_token = 2 * config.num_key_value_heads * config.head_dim * dtype_bytes
        return self.kept_tokens(config, context) * per_token + per_token  # read the cache, append this token

    def decode_flops(self, config: Any, context: int) -> float:
        keys = self.kept_tokens(config, context) + 1
        return _proj_flops(self, config) + 4.0 * config.num_attention_heads * config.head_dim * keys

    def prefill_flops(self, config: Any, context: int) -> float:
        keys = mean_visible_keys(context, self.window(config))
        return _proj_flops(self, config) + 4.0 * config.num_attention_heads * config.head_dim * keys  # QK^T, PV


@dataclass(frozen=True)
class LinearSpec(MixerSpec):
    """Delta-rule mixers (GDN, KDA): q/k/v short convolutions, a recurrent [HV, K, V] state, gated norm.

    Beyond sizes, what a serving layer needs to build and shard the mixer without knowing its name:
    `decay` ("head": one log decay per value head; "channel": one per key channel), `gate` (the
    output gate's activation), `hidden_projections` (the projections that read the hidden state,
    q/k/v first: the serving layer merges them into one GEMM whose first C columns feed the
    convolution) and `head_axis` (which axis of each checkpoint tensor runs over heads, so tensor
    parallelism splits it; None for tensors every head shares).
    """

    decay: str = "head"
    gate: str = "silu"
    hidden_projections: tuple[str, ...] = ()
    shared_parameters: tuple[str, ...] = ("o_norm.weight",)  # no head axis: replicated across ranks

    def dims(self, config: Any) -> dict[str, int]:
        """Head counts and sizes in the spec's names: H, HV, K, V, W and C (conv channels)."""
        if self.name == "gdn":
            h, hv, k, v = config.gdn_num_heads, config.gdn_num_v_heads, config.gdn_head_dim, config.gdn_v_head_dim
        else:
            h = hv = config.kda_num_heads
            k, v = config.kda_head_dim, config.kda_v_head_dim
        return {"H": h, "HV": hv, "K": k, "V": v, "W": config.linear_conv_size, "C": 2 * h * k + hv * v}

    def parameter_shapes(self, config: Any) -> dict[str, tuple[int, ...]]:
        d, D = self.dims(config), config.hidden_size
        H, HV, K, V, W = d["H"], d["HV"], d["K"], d["V"], d["W"]
        shapes = {"q_proj.weight": (H * K, D), "k_proj.weight": (H * K, D), "v_proj.weight": (HV * V, D),
                  "q_conv1d.weight": (H * K, 1, W), "k_conv1d.weight": (H * K, 1, W),
                  "v_conv1d.weight": (HV * V, 1, W), "b_proj.weight": (HV, D), "A_log": (HV,),
                  "o_norm.weight": (V,), "o_proj.weight": (D, HV * V)}
        if self.name == "gdn":  # one decay per head, full-rank output gate
            shapes.update({"a_proj.weight": (HV, D), "dt_bias": (HV,), "g_proj.weight": (HV * V, D)})
        else:  # KDA: one decay per key channel and the output gate through low-rank projections
            shapes.update({"f_a_proj.weight": (K, D), "f_b_proj.weight": (H * K, K), "dt_bias": (H * K,),
                           "g_a_proj.weight": (V, D), "g_b_proj.weight": (H * V, V)})
        return shapes

    def head_axis(self, name: str) -> int | None:
        """Axis of checkpoint tensor `name` that runs over heads (output rows; o_proj's input
        columns), None for a tensor every head shares."""
        if name in self.shared_parameters:
            return None
        return 1 if name == "o_proj.weight" else 0

    def state_shapes(self, config: Any, batch: int, context: int) -> dict[str, StateShape]:
        d = self.dims(config)
        tail = d["W"] - 1
        return {"conv_q": StateShape((batch, d["H"] * d["K"], tail)),
                "conv_k": StateShape((batch, d["H"] * d["K"], tail)),
                "conv_v": StateShape((batch, d["HV"] * d["V"], tail)),
                "recurrent": StateShape((batch, d["HV"], d["K"], d["V"]), FLOAT32)}

    def decode_bytes(self, config: Any, context: int, dtype_bytes: int = 2, state_bytes: int = 4) -> float:
        return 2.0 * self.cache_bytes(config, context, dtype_bytes, state_bytes)  # read + write, any context

    def decode_flops(self, config: Any, context: int) -> float:
        d = self.dims(config)
        # per head: decay, S^T k, rank-1 update and readout, each ~2KV; the convs 2W per channel
        return _proj_flops(self, config) + 8.0 * d["HV"] * d["K"] * d["V"] + 2.0 * d["W"] * d["C"]

    def prefill_flops(self, config: Any, context: int) -> float:
        d = self.dims(config)
        k, v = d["K"], d["V"]
        extra = CHUNK * k if self.name == "kda" else 0  # per-channel decay inside the chunk
        c = min(CHUNK, context)
        # chunked delta rule per head: state in/out (4KV) + intra-chunk scores and outputs (2C(K+V))
        mixing = d["HV"] * (4 * k * v + 2 * c * (k + v) + extra)
        return _proj_flops(self, config) + mixing + 2.0 * d["W"] * d["C"]


_ATTENTION_LAYER = "supernet.serving.vllm_model:SupernetAttention"
_LINEAR_LAYER = "supernet.serving.linear_layers:SupernetLinearAttention"

REGISTRY: dict[str, MixerSpec] = {
    "fa": AttentionSpec("fa", "attention", "supernet.mixers.attention:AttentionMixer", _ATTENTION_LAYER),
    "swa": AttentionSpec("swa", "attention", "supernet.mixers.attention:SlidingWindowAttentionMixer",
                         _ATTENTION_LAYER, windowed=True),
    "gdn": LinearSpec("gdn", "linear", "supernet.mixers.gdn:GatedDeltaNetMixer", _LINEAR_LAYER,
                      decay="head", gate="silu",
                      hidden_projections=("q_proj", "k_proj", "v_proj", "g_proj", "a_proj", "b_proj")),
    "kda": LinearSpec("kda", "linear", "supernet.mixers.kda:KimiDeltaAttentionMixer", _LINEAR_LAYER,
                      decay="channel", gate="sigmoid",
                      hidden_projections=("q_proj", "k_proj", "v_proj", "f_a_proj", "b_proj", "g_a_proj"),
                      # the low-rank factors that read the hidden state are shared by all heads
                      shared_parameters=("o_norm.weight", "f_a_proj.weight", "g_a_proj.weight")),
}
assert tuple(REGISTRY) == MIXERS, "the registry must list every mixer of supernet.layout.MIXERS, in order"


def spec(name: str) -> MixerSpec:
    """The spec of mixer `name`; a one-line ValueError naming the known ones otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown mixer {name!r}; choose one of {', '.join(MIXERS)}") from None


def mixers_of_family(family: str) -> tuple[str, ...]:
    """The mixers of one family ("attention" or "linear"), in MIXERS order."""
    return tuple(name for name, s in REGISTRY.items() if s.family == family)


def shared_parameter_counts(config: Any) -> dict[str, int]:
    """Placement-independent parameters: per-layer MLP + norms, and the embeddings / lm_head."""
    D, F, V = config.hidden_size, config.intermediate_size, config.vocab_size
    mlp = 3 * D * F + (2 * F + D if getattr(config, "mlp_bias", False) else 0)
    return {"layer_matmul": mlp, "layer_other": 2 * D, "lm_head": V * D, "final_norm": D}
