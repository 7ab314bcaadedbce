"""The choice of path per call: fla's Triton kernels on CUDA, else the torch paths (token loop for
a few tokens, chunks otherwise); raw gates computed in the kernel or in torch (see the package docstring)."""
from __future__ import annotations

import functools
from typing import Any

import torch

from supernet.ops.delta_rule.chunk import chunk_delta_rule
from supernet.ops.delta_rule.common import _check_gate, _check_shapes, gate_decay, l2_normalize
from supernet.ops.delta_rule.recurrent import recurrent_delta_rule
from supernet.ops.fla_backend import fla_function, use_fla

# Inference calls with at most this many tokens use fla's fused recurrent kernel on CUDA.
FLA_RECURRENT_MAX_T = 64
# On CPU, calls with at most this many tokens use the token-by-token loop (cheaper than a padded chunk).
TORCH_RECURRENT_MAX_T = 4
# Chunk sizes of the torch path: per-channel decays (KDA) make the intra-chunk work grow with the
# chunk, and 32 measured ~10-15% faster than 64 on CPU; for GDN 64 is as fast or faster.
TORCH_CHUNK_PER_HEAD = 64
TORCH_CHUNK_PER_CHANNEL = 32


def torch_delta_rule(
    q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The pure-torch choice: token loop for a handful of tokens, chunks otherwise.

    Autocast is switched off inside: the recurrence must accumulate in float32 even when the
    surrounding model runs its matmuls in bf16.
    """
    with torch.autocast(device_type=q.device.type, enabled=False):
        if q.shape[1] <= TORCH_RECURRENT_MAX_T:
            return recurrent_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state)
        chunk = TORCH_CHUNK_PER_CHANNEL if g.dim() == 4 else TORCH_CHUNK_PER_HEAD
        return chunk_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state, chunk_size=chunk)


@functools.lru_cache(maxsize=None)
def _fla_kernels() -> dict[str, Any] | None:
    """fla's Triton entry points, or None when fla (or triton) is not importable."""
    kernels = {
        "gdn_chunk": fla_function("ops.gated_delta_rule", "chunk_gated_delta_rule"),
        "gdn_recurrent": fla_function("ops.gated_delta_rule", "fused_recurrent_gated_delta_rule"),
        "kda_chunk": fla_function("ops.kda", "chunk_kda"),
        "kda_recurrent": fla_function("ops.kda", "fused_recurrent_kda"),
    }
    return None if any(k is None for k in kernels.values()) else kernels


def fla_available() -> bool:
    return _fla_kernels() is not None


def _fla_kernel(family: str, q: torch.Tensor, tensors: tuple) -> Any | None:
    """The fla kernel to use for this call, or None for the torch path."""
    if not q.is_cuda:
        return None
    kernels = _fla_kernels()
    if kernels is None:
        return None
    needs_grad = _needs_grad(tensors)
    short = q.shape[1] <= FLA_RECURRENT_MAX_T
    # the fused recurrent kernels have no backward
    return kernels[f"{family}_recurrent" if short and not needs_grad else f"{family}_chunk"]


@functools.lru_cache(maxsize=None)
def _gated_chunk_backward_broken(device_index: int) -> bool:
    """fla 0.6.0 refuses GDN's chunk backward on Hopper with Triton in [3.4, 3.7.1) (wrong results).

    KDA's chunk kernels have their own backward, and GDN is KDA with the per-head decay repeated over
    the key channels, so on such systems GDN trains through `chunk_kda` instead.
    """
    import triton

    numbers = [int(part) for part in triton.__version__.split("+")[0].split(".")[:3] if part.isdigit()]
    version = tuple(numbers + [0] * (3 - len(numbers)))
    return torch.cuda.get_device_capability(device_index) == (9, 0) and (3, 4, 0) <= version < (3, 7, 1)


def _needs_grad(tensors: tuple) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _gates_in_kernel(q: torch.Tensor, tensors: tuple) -> bool:
    """Whether fla will compute the raw gates: CUDA inference in eager mode, fla importable."""
    return use_fla(q) and not _needs_grad(tensors) and fla_available()


def _torch_gates(g, beta, A_log, dt_bias, beta_logits) -> tuple[torch.Tensor, torch.Tensor]:
    """(log decay, beta) computed in torch from what the caller passed."""
    if A_log is not None:
        g = gate_decay(g, A_log, dt_bias)
    if beta_logits:
        beta = torch.sigmoid(beta.float())
    return g, beta


# Kept out of torch.compile: the kernel choice (lru_cached lookups, a Triton version check) and the
# torch fallback's Python loop over chunks are not traceable work; a compiled layer gets one clean
# graph break around its delta-rule kernel, on the CPU as on CUDA.
@torch.compiler.disable
def _dispatch(family, q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm,
              A_log=None, dt_bias=None, beta_logits=False):
    _check_shapes(q, k, v, g, beta)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if initial_state is not None:
        initial_state = initial_state.float()
    kernel = _fla_kernel(family, q, (q, k, v, g, beta, initial_state, A_log, dt_bias))
    # raw gates reach here only where `_prepare_gates` chose fla's in-kernel gates
    gate_kwargs = {}
    if kernel is None:
        g, beta = _torch_gates(g, beta, A_log, dt_bias, beta_logits)
    else:
        if A_log is not None:
            gate_kwargs.update(use_gate_in_kernel=True, A_log=A_log, dt_bias=dt_bias)
        if beta_logits:
            gate_kwargs.update(use_beta_sigmoid_in_kernel=True)
    if (kernel is not None and kernel is _fla_kernels()["gdn_chunk"]
            and _gated_chunk_backward_broken(q.device.index or 0) and _needs_grad((q, k, v, g, beta))):
        kernel = _fla_kernels()["kda_chunk"]
        g = g.float()[..., None].expand(*g.shape, q.shape[-1]).contiguous()
    if kernel is not None:
        return kernel(
            q=q, k=k, v=v, g=g, beta=beta, scale=scale,
            initial_state=initial_state, output_final_state=output_final_state,
            use_qk_l2norm_in_kernel=use_qk_l2norm, **gate_kwargs,
        )
    if use_qk_l2norm:
        q, k = l2_normalize(q), l2_normalize(k)
    return torch_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state)


def _prepare_gates(q, k, v, g, beta, A_log, dt_bias, beta_logits):
    """Raw gates stay raw only when fla will compute them; otherwise they are computed here, outside
    the compiler-disabled `_dispatch`, so torch.compile fuses them into the layer's graph."""
    _check_gate(g, A_log, dt_bias)
    if (A_log is None and not beta_logits) or _gates_in_kernel(q, (q, k, v, g, beta, A_log, dt_bias)):
        return g, beta, A_log, dt_bias, beta_logits
    g, beta = _torch_gates(g, beta, A_log, dt_bias, beta_logits)
    return g, beta, None, None, False


def gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm: bool = False,
    A_log: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    beta_logits: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """GDN: scalar decay per value head, g [B, T, HV] (log space). Best kernel for the device.

    `use_qk_l2norm` L2-normalises q and k over K first (fused into the kernel on CUDA).
    With `A_log` ([HV]; `dt_bias` [HV] optional), g is the raw gate input instead of the log decay;
    with `beta_logits`, beta holds logits (see the module docstring).
    Returns (o [B, T, HV, V], final state [B, HV, K, V] fp32 or None).
    """
    if g.dim() != 3:
        raise ValueError(
            f"gated_delta_rule: g must be [B, T, HV]; got {list(g.shape)} (use kda_rule for per-channel g)"
        )
    g, beta, A_log, dt_bias, beta_logits = _prepare_gates(q, k, v, g, beta, A_log, dt_bias, beta_logits)
    return _dispatch("gdn", q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm,
                     A_log, dt_bias, beta_logits)


def kda_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm: bool = False,
    A_log: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    beta_logits: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """KDA: per-channel decay, g [B, T, HV, K] (log space). Best kernel for the device.

    Same contract as `gated_delta_rule`; raw gates take A_log [HV] and dt_bias [HV * K].
    """
    if g.dim() != 4:
        raise ValueError(
            f"kda_rule: g must be [B, T, HV, K]; got {list(g.shape)} (use gated_delta_rule for per-head g)"
        )
    g, beta, A_log, dt_bias, beta_logits = _prepare_gates(q, k, v, g, beta, A_log, dt_bias, beta_logits)
    return _dispatch("kda", q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm,
                     A_log, dt_bias, beta_logits)


def delta_rule_per_token_states(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    use_qk_l2norm: bool = False,
    A_log: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    beta_logits: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GDN (g [B, T, HV]) or KDA (g [B, T, HV, K]) keeping the state after every token.

    For speculative decoding's few tokens per step (a draft token, or the k + 1 tokens of a
    verification): the token loop computes each intermediate state anyway, so keeping them costs
    T state writes and no extra arithmetic, and any prefix can be committed exactly afterwards.
    Torch path on every device (fla's fused kernels return the final state only).
    Returns (o [B, T, HV, V], states [B, T, HV, K, V] fp32).
    """
    _check_gate(g, A_log, dt_bias)
    _check_shapes(q, k, v, g, beta)
    with torch.autocast(device_type=q.device.type, enabled=False):
        g, beta = _torch_gates(g, beta, A_log, dt_bias, beta_logits)
        if use_qk_l2norm:
            q, k = l2_normalize(q), l2_normalize(k)
        return recurrent_delta_rule(q, k, v, g, beta, scale, initial_state, output_all_states=True)
