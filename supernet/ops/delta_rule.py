"""The gated delta rule (GDN: one decay per head; KDA: one decay per key channel) in pure torch,
and the dispatch that picks fla's Triton kernels on CUDA.

Layout follows fla: q, k [B, T, H, K]; v [B, T, HV, V] with HV a multiple of H (value head j reads
q/k head j // (HV // H)); beta [B, T, HV]; g (log-space decay, <= 0) [B, T, HV] for GDN or
[B, T, HV, K] for KDA; states [B, HV, K, V] in fp32. Per head and token:

    S <- diag(exp(g_t)) S                         (decay)
    S <- S + beta_t k_t (v_t - S^T k_t)^T         (delta-rule write)
    o_t = scale * S^T q_t                         (read)

Two torch implementations:
- `recurrent_delta_rule`: token by token; the reference, and the cheapest path for a few tokens.
- `chunk_delta_rule`: chunks of C tokens. Inside a chunk the writes are solved all at once with the
  WY/UT form (one unit-lower-triangular inverse), so the only sequential loop is over T/C chunks
  and everything inside a chunk is batched matmuls: what makes CPU training affordable.
Both accumulate in fp32 and return `o` in v's dtype.

Dispatch (`gated_delta_rule`, `kda_rule`): on CUDA with fla importable, fla's `chunk_*` kernels
(training, prefill) or `fused_recurrent_*` (short inference calls); otherwise the torch paths.

Raw gates: with `A_log` given, `g` holds the raw gate input and the log decay is
-exp(A_log) * softplus(g + dt_bias) (`gate_decay`); with `beta_logits`, beta holds logits and goes
through a sigmoid. For CUDA inference fla computes both inside its kernels (no fp32 gate tensors in
memory, no separate elementwise kernels); elsewhere (CPU, training, torch.compile, or the fused paths
switched off: supernet.ops.fla_backend) they are computed in torch before the kernel, where
torch.compile fuses them into the layer's graph.
"""
from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F

from supernet.ops.fla_backend import fla_function, use_fla

# Inference calls with at most this many tokens use fla's fused recurrent kernel on CUDA.
FLA_RECURRENT_MAX_T = 64
# On CPU, calls with at most this many tokens use the token-by-token loop (cheaper than a padded chunk).
TORCH_RECURRENT_MAX_T = 4
# Chunk sizes of the torch path: per-channel decays (KDA) make the intra-chunk work grow with the
# chunk, and 32 measured ~10-15% faster than 64 on CPU; for GDN 64 is as fast or faster.
TORCH_CHUNK_PER_HEAD = 64
TORCH_CHUNK_PER_CHANNEL = 32
# Sub-block size for the per-channel (KDA) intra-chunk scores; see `_per_channel_scores`.
_SUB_BLOCK = 8
# Arguments of exp are clamped here; see `_exp`.
_EXP_FLOOR = -80.0


# --------------------------------------------------------------------------------------------
# helpers


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dim (the same formula as fla's in-kernel L2 norm)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) + eps)).to(x.dtype)


def gate_decay(g: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Log decay -exp(A_log) * softplus(g + dt_bias) in fp32, from a raw gate input.

    GDN: g [..., HV], A_log and dt_bias [HV]. KDA: g [..., HV, K], A_log [HV] (one rate per head),
    dt_bias [HV * K]. The same formula as fla's in-kernel gate (`use_gate_in_kernel`).
    """
    per_channel = g.dim() == 4
    x = g.float().flatten(-2) if per_channel else g.float()  # KDA: [..., HV * K], dt_bias's layout
    if dt_bias is not None:
        x = x + dt_bias.float()
    A = A_log.float().exp()
    if per_channel:
        A = A.repeat_interleave(g.shape[-1])  # A_log[h] for every channel of head h
    return (-A * F.softplus(x)).view(g.shape)


def _check_gate(g: torch.Tensor, A_log: torch.Tensor | None, dt_bias: torch.Tensor | None) -> None:
    if A_log is None:
        if dt_bias is not None:
            raise ValueError("dt_bias is only used with A_log (a raw gate input)")
        return
    heads = g.shape[2]
    if A_log.numel() != heads:
        raise ValueError(f"A_log must have one value per value head ({heads}); got {list(A_log.shape)}")
    per_channel = heads * g.shape[3] if g.dim() == 4 else heads
    if dt_bias is not None and dt_bias.numel() != per_channel:
        raise ValueError(f"dt_bias must have {per_channel} values for g of shape {list(g.shape)}; "
                         f"got {list(dt_bias.shape)}")


def _check_shapes(q, k, v, g, beta) -> tuple[int, int, int, int, int, int]:
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must both be [B, T, H, K]; got q {tuple(q.shape)}, k {tuple(k.shape)}")
    B, T, H, K = q.shape
    if v.dim() != 4 or v.shape[:2] != (B, T):
        raise ValueError(f"v must be [B, T, HV, V] with B={B}, T={T}; got {tuple(v.shape)}")
    HV, V = v.shape[2], v.shape[3]
    if HV % H != 0:
        raise ValueError(f"value heads HV={HV} must be a multiple of q/k heads H={H}")
    if beta.shape != (B, T, HV):
        raise ValueError(f"beta must be [B, T, HV]={[B, T, HV]}; got {list(beta.shape)}")
    if g.shape not in ((B, T, HV), (B, T, HV, K)):
        raise ValueError(f"g must be [B, T, HV] (GDN) or [B, T, HV, K] (KDA); got {list(g.shape)}")
    return B, T, H, K, HV, V


def _expand_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, T, H, K] -> [B, T, HV, K]: each q/k head serves HV // H consecutive value heads (GVA)."""
    groups = num_heads // x.shape[2]
    return x if groups == 1 else x.repeat_interleave(groups, dim=2)


def _initial_state(initial_state, B, HV, K, V, device) -> torch.Tensor:
    if initial_state is None:
        return torch.zeros(B, HV, K, V, dtype=torch.float32, device=device)
    if initial_state.shape != (B, HV, K, V):
        raise ValueError(f"initial_state must be [B, HV, K, V]={[B, HV, K, V]}; got {list(initial_state.shape)}")
    return initial_state.float()


# --------------------------------------------------------------------------------------------
# token-by-token


def recurrent_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    output_all_states: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated delta rule one token at a time. g [B,T,HV] (per head) or [B,T,HV,K] (per channel).

    Returns (o [B, T, HV, V] in v.dtype, final state [B, HV, K, V] fp32 or None); with
    `output_all_states` the second item is the state after every token, [B, T, HV, K, V].
    """
    B, T, H, K, HV, V = _check_shapes(q, k, v, g, beta)
    scale = K**-0.5 if scale is None else scale
    qf = _expand_heads(q, HV).float() * scale
    kf = _expand_heads(k, HV).float()
    vf, bf = v.float(), beta.float()
    decay = g.float().exp()
    per_channel = g.dim() == 4
    S = _initial_state(initial_state, B, HV, K, V, q.device)
    outs, states = [], []
    for t in range(T):
        d = decay[:, t]
        S = S * (d.unsqueeze(-1) if per_channel else d[..., None, None])
        k_t = kf[:, t].unsqueeze(-2)  # [B, HV, 1, K]
        err = vf[:, t] - (k_t @ S).squeeze(-2)  # v_t - S^T k_t
        S = S + k_t.transpose(-1, -2) * (bf[:, t, :, None] * err).unsqueeze(-2)
        outs.append((qf[:, t].unsqueeze(-2) @ S).squeeze(-2))
        if output_all_states:
            states.append(S)
    o = torch.stack(outs, dim=1) if outs else vf.new_zeros(B, 0, HV, V)
    if output_all_states:
        return o.to(v.dtype), torch.stack(states, dim=1)
    return o.to(v.dtype), (S if output_final_state else None)


# --------------------------------------------------------------------------------------------
# chunked (WY / UT transform)


def _exp(x: torch.Tensor) -> torch.Tensor:
    """exp of a log decay, with the argument clamped to [-80, 0].

    - exp(-80) ~ 2e-35 is zero for every sum it enters, and torch's vectorised exp takes a slow
      path (5-10x) for arguments that underflow; decays in a chunk easily go past -88.
    - Every decay that is used is <= 0 (g <= 0 is checked); the positive arguments are entries
      above the causal diagonal, which are masked out afterwards: clamping them to 0 keeps them
      finite (no inf * 0 = NaN, in the forward or the backward) without a separate where().
    """
    return x.clamp(_EXP_FLOOR, 0.0).exp()


def _per_head_scores(q: torch.Tensor, k: torch.Tensor, G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Decayed causal scores for GDN (one decay per head).

    Returns (P, A) with P[r, s] = (q_r . k_s) e^(G_r - G_s) and A[r, s] = (k_r . k_s) e^(G_r - G_s)
    for s <= r, else 0.  q, k [..., C, K]; G [..., C] cumulative log decay.
    """
    C = G.shape[-1]
    lower = torch.ones(C, C, dtype=torch.bool, device=G.device).tril()
    decay = _exp(G.unsqueeze(-1) - G.unsqueeze(-2)) * lower
    return (q @ k.transpose(-1, -2)) * decay, (k @ k.transpose(-1, -2)) * decay


def _per_channel_scores(
    q: torch.Tensor, k: torch.Tensor, G: torch.Tensor, sub: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decayed causal scores for KDA (one decay per key channel).

    Returns (P, A) with P[r, s] = sum_c q_r[c] k_s[c] e^(G_r[c] - G_s[c]) and A the same with k_r
    in place of q_r, for s <= r, else 0.  q, k, G [..., C, K].

    The decay does not factor into one matmul without overflow (e^-G_s explodes once the chunk's
    cumulative decay passes ~88 nats), so the chunk is cut into sub-blocks of `sub` tokens:
    - block pairs I > J: with the reference R = G at the last token before block I, both
      e^(G_r - R) (r in I) and e^(R - G_s) (s before I) are <= 1, so the block is one matmul;
    - diagonal blocks: the exact [sub, sub, K] product, masked before exp.
    """
    *lead, C, K = q.shape
    sub = sub if C % sub == 0 else C
    n = C // sub
    q_, k_, G_ = (x.reshape(*lead, n, sub, K) for x in (q, k, G))

    lower = torch.ones(sub, sub, dtype=torch.bool, device=q.device).tril().unsqueeze(-1)  # [r, s, 1]
    decay = _exp(G_.unsqueeze(-2) - G_.unsqueeze(-3))  # [..., n, r, s, K]; masked after the matmul
    both = torch.stack([q_, k_], dim=-1)  # [..., n, r, K, 2]
    diag = ((decay * k_.unsqueeze(-3)) @ both) * lower  # [..., n, r, s, 2]
    eye = torch.eye(n, dtype=q.dtype, device=q.device)
    M = (diag.movedim(-1, 0).unsqueeze(-2) * eye[:, None, :, None]).reshape(2, *lead, C, C)
    if n > 1:
        ref = G_[..., :-1, -1:, :]  # [..., n-1, 1, K]: reference of row blocks 1..n-1
        to_ref = _exp(G_[..., 1:, :, :] - ref)  # <= 1
        rows = torch.cat([q_[..., 1:, :, :] * to_ref, k_[..., 1:, :, :] * to_ref], dim=-2)  # [..., n-1, 2sub, K]
        starts = torch.arange(1, n, device=q.device) * sub
        before = (torch.arange(C, device=q.device).unsqueeze(0) < starts.unsqueeze(1)).unsqueeze(-1)  # [n-1, C, 1]
        cols = k.unsqueeze(-3) * _exp(ref - G.unsqueeze(-3))  # [..., n-1, C, K]; masked after the matmul
        off = (rows @ cols.transpose(-1, -2)) * before.transpose(-1, -2)  # [..., n-1, 2sub, C]
        off = torch.stack(off.split(sub, dim=-2), dim=0)  # [2, ..., n-1, sub, C]
        off = torch.cat([off.new_zeros(2, *lead, 1, sub, C), off], dim=-3).reshape(2, *lead, C, C)
        M = M + off
    return M[0], M[1]


class _UnitLowerInverse(torch.autograd.Function):
    """(I + tril(A, -1))^-1 with a matmul-only backward.

    torch's own backward of `solve_triangular` solves with the transposed matrix, which on CPU
    runs several times slower than the forward; here the backward is two batched matmuls:
    dA = -tril(T^T dT T^T, -1).
    """

    @staticmethod
    def forward(ctx, A: torch.Tensor) -> torch.Tensor:
        eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device).expand_as(A)
        T = torch.linalg.solve_triangular(A, eye, upper=False, unitriangular=True)
        ctx.save_for_backward(T)
        return T

    @staticmethod
    def backward(ctx, dT: torch.Tensor) -> torch.Tensor:
        (T,) = ctx.saved_tensors
        Tt = T.transpose(-1, -2)
        return -(Tt @ dT @ Tt).tril(-1)


def _to_chunks(x: torch.Tensor, pad: int, chunk: int) -> torch.Tensor:
    """[B, T, HV, ...] -> fp32 [B, HV, N, C, ...], zero-padded at the end of time.

    Zero padding is harmless: k = 0 and beta = 0 write nothing and g = 0 does not decay, so the
    final state is the state after the last real token.
    """
    x = x.float()
    if pad:
        x = torch.cat([x, x.new_zeros(x.shape[0], pad, *x.shape[2:])], dim=1)
    x = x.transpose(1, 2)
    return x.reshape(x.shape[0], x.shape[1], -1, chunk, *x.shape[3:])


def chunk_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated delta rule over chunks; same contract and results as `recurrent_delta_rule`.

    Inside a chunk (cumulative log decay Gam_r from its start, state S0 at its start), the values
    actually written, u_r = beta_r (v_r - S_{r-1}'^T k_r), satisfy (I + A) u = beta (v - (k e^Gam) S0)
    with A[r, s] = beta_r k_r^T diag(e^(Gam_r - Gam_s)) k_s for s < r (unit lower triangular), so
        u = (I + A)^-1 beta (v - (k e^Gam) S0)
        o = (q e^Gam) S0 + P u            (P[r, s] = q_r^T diag(e^(Gam_r - Gam_s)) k_s, s <= r)
        S = e^Gam_C S0 + (k e^(Gam_C - Gam))^T u.
    """
    B, T, H, K, HV, V = _check_shapes(q, k, v, g, beta)
    if (g > 0).any():
        raise ValueError("chunk_delta_rule: g must be a log decay (<= 0); use recurrent_delta_rule for growth")
    if T == 0:
        return recurrent_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state)
    scale = K**-0.5 if scale is None else scale
    per_channel = g.dim() == 4
    # a chunk never needs to be longer than the sequence (rounded up to whole sub-blocks)
    chunk = max(1, min(chunk_size, -(-T // _SUB_BLOCK) * _SUB_BLOCK))
    pad = (-T) % chunk
    qc = _to_chunks(_expand_heads(q, HV), pad, chunk) * scale  # [B, HV, N, C, K]
    kc = _to_chunks(_expand_heads(k, HV), pad, chunk)
    vc = _to_chunks(v, pad, chunk)  # [B, HV, N, C, V]
    bc = _to_chunks(beta, pad, chunk).unsqueeze(-1)  # [B, HV, N, C, 1]
    G = _to_chunks(g, pad, chunk).cumsum(dim=3)  # [B, HV, N, C(, K)]: cumulative decay inside each chunk
    num_chunks = qc.shape[2]

    # One chunk at a time, vectorised inside it: the per-chunk tensors stay cache-sized, which on
    # CPU is up to 2x faster than materialising the intra-chunk terms of all chunks at once.
    S = _initial_state(initial_state, B, HV, K, V, q.device)
    outs = []
    for n in range(num_chunks):
        q_n, k_n, v_n, b_n, G_n = qc[:, :, n], kc[:, :, n], vc[:, :, n], bc[:, :, n], G[:, :, n]
        if per_channel:
            scores_qk, scores_kk = _per_channel_scores(q_n, k_n, G_n, _SUB_BLOCK)
            G_last = G_n[..., -1:, :]  # [B, HV, 1, K]
            to_start, to_end = _exp(G_n), _exp(G_last - G_n)
            state_decay = _exp(G_last).transpose(-1, -2)  # [B, HV, K, 1]
        else:
            scores_qk, scores_kk = _per_head_scores(q_n, k_n, G_n)
            G_last = G_n[..., -1:]  # [B, HV, 1]
            to_start, to_end = _exp(G_n).unsqueeze(-1), _exp(G_last - G_n).unsqueeze(-1)
            state_decay = _exp(G_last).unsqueeze(-1)  # [B, HV, 1, 1]
        # (I + A)^-1 with A the strictly lower part of beta_r * scores_kk
        T_inv = _UnitLowerInverse.apply(scores_kk * b_n)
        u = T_inv @ (b_n * (v_n - (k_n * to_start) @ S))
        outs.append((q_n * to_start) @ S + scores_qk @ u)
        S = S * state_decay + (k_n * to_end).transpose(-1, -2) @ u
    o = torch.stack(outs, dim=2).reshape(B, HV, num_chunks * chunk, V)[:, :, :T]
    return o.transpose(1, 2).to(v.dtype), (S if output_final_state else None)


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


# --------------------------------------------------------------------------------------------
# dispatch


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
