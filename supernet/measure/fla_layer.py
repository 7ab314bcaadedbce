"""fla's own GDN/KDA layer (fla.layers) built with our mixer's shapes and weights: the second
reference of the linear-mixer benchmark (same work as our layer, unlike the raw op)."""
from __future__ import annotations

from typing import Any, Callable

import torch

from supernet.config import SupernetConfig


FLA_LAYER_CLASSES = {"gdn": "GatedDeltaNet", "kda": "KimiDeltaAttention"}
FLA_LAYER_OFF_CUDA = "not timed: fla's layers run only through Triton on CUDA"
FLA_CHECK_TOKENS = 64  # the cross-check's length: fused recurrent kernel in both layers, no chunk autotuning


def linear_dims(mixer: str, config: SupernetConfig) -> tuple[int, int, int, int]:
    """(q/k heads, v heads, key head dim, value head dim) of our mixer `mixer` under `config`."""
    if mixer == "gdn":
        return config.gdn_num_heads, config.gdn_num_v_heads, config.gdn_head_dim, config.gdn_v_head_dim
    if mixer == "kda":
        return config.kda_num_heads, config.kda_num_heads, config.kda_head_dim, config.kda_v_head_dim
    raise ValueError(f"no fla layer for mixer {mixer!r} (known: {', '.join(FLA_LAYER_CLASSES)})")


def fla_layer_kwargs(shape: dict, mixer: str, config: SupernetConfig) -> dict[str, Any]:
    """Constructor arguments of fla's own layer (fla.layers.GatedDeltaNet / KimiDeltaAttention) that
    reproduce our mixer built from `config` on the timing shape `shape` (hidden, heads, head_dim).

    mode "chunk": like our dispatch, fla's layer itself switches to the fused recurrent kernel for
    <= 64 tokens in inference, so one layer serves the prefill rows (chunk) and decode (fused recurrent).
    """
    H, HV, K, V = linear_dims(mixer, config)
    D = config.hidden_size
    if (D, H, K) != (shape["hidden"], shape["heads"], shape["head_dim"]):
        raise ValueError(f"config (hidden {D}, {mixer} heads {H} x {K}) does not match the shape "
                         f"(hidden {shape['hidden']}, heads {shape['heads']} x {shape['head_dim']})")
    kwargs: dict[str, Any] = dict(
        hidden_size=D, head_dim=K, expand_v=V // K if V % K == 0 else V / K, num_heads=H, num_v_heads=HV,
        mode="chunk", use_short_conv=True, conv_size=config.linear_conv_size, conv_bias=False,
        allow_neg_eigval=False, layer_idx=0, norm_eps=config.linear_norm_eps,
    )
    if mixer == "gdn":
        kwargs.update(use_gate=True, output_gate_activation="silu")  # our o_norm: silu gate
    else:
        kwargs.update(safe_gate=False, lower_bound=None)  # what our dispatch runs (fla's defaults)
    return kwargs


def fla_layer_differences(mixer: str, config: SupernetConfig) -> list[str]:
    """What fla's layer built from `fla_layer_kwargs` does differently from our mixer (for the JSON)."""
    H, HV, K, V = linear_dims(mixer, config)
    out = [
        "fla's layer runs the kernels with state_v_first=True (recurrent state [B, HV, V, K]); our dispatch "
        "and the raw-op timing use fla's default K-first state [B, HV, K, V]: the same kernels, another "
        "Triton specialization (compiled at the layer's first call, outside the timing)",
        "fla's layer goes through its Python Cache (fla.models.utils.Cache) and unpad/repad helpers "
        "(no-ops without a mask); ours through SupernetCache",
    ]
    if mixer == "gdn":
        out.append("with use_cache=False fla's GDN fuses the q/k/v convs into one call; it is timed with "
                   "use_cache=True and a fresh Cache (three convs, like ours with its fresh SupernetCache)")
    else:
        out.append(f"g_proj's second Linear ({V} -> {H * V}) has a bias in fla's KDA (ours has none): "
                   "one bias add more in fla's layer (loaded as zeros)")
        if K != V:
            out.append(f"low-rank gate projections: fla's f_proj rank is head_v_dim ({V}), ours head_dim ({K}): "
                       "different shapes, weights not transferable")
    return out


def fla_layer_state_dict(state: dict[str, torch.Tensor], mixer: str) -> dict[str, torch.Tensor]:
    """Our mixer's state dict under fla's layer's parameter names (KDA: g_proj's bias set to zero)."""
    if mixer == "gdn":
        return dict(state)
    names = {"f_a_proj.weight": "f_proj.0.weight", "f_b_proj.weight": "f_proj.1.weight",
             "g_a_proj.weight": "g_proj.0.weight", "g_b_proj.weight": "g_proj.1.weight"}
    out = {names.get(name, name): t for name, t in state.items()}
    g_b = state["g_b_proj.weight"]
    out["g_proj.1.bias"] = torch.zeros(g_b.shape[0], dtype=g_b.dtype, device=g_b.device)
    return out


def build_fla_layer(spec: dict, mixer: str, config: SupernetConfig, ours: torch.nn.Module | None = None,
                    device: str = "cpu", dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """fla's layer with our shapes (and, given `ours`, our mixer's weights), in eval mode."""
    import fla.layers

    layer = getattr(fla.layers, FLA_LAYER_CLASSES[mixer])(**fla_layer_kwargs(spec, mixer, config))
    if ours is not None:
        with torch.no_grad():
            layer.load_state_dict(fla_layer_state_dict(ours.state_dict(), mixer), strict=True)
    return layer.to(device=device, dtype=dtype).eval()


def fla_cache() -> Any:
    from fla.models.utils import Cache

    return Cache()


def fla_decode_fn(layer: torch.nn.Module, x: torch.Tensor) -> Callable[[], Any]:
    """One decode step of fla's layer with its Cache, from a random state (as `synthetic_state`): one
    untimed step creates the state tensors in fla's layout, which are then filled with random values."""
    cache = fla_cache()
    layer(x, past_key_values=cache, use_cache=True)
    state = cache[0]
    recurrent = state["recurrent_state"]
    recurrent.copy_(torch.randn_like(recurrent) * 0.1)
    for conv in state["conv_state"]:
        conv.copy_(torch.randn_like(conv))
    return lambda: layer(x, past_key_values=cache, use_cache=True)
