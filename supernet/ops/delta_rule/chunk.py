"""The chunked delta rule in torch (WY / UT transform): inside a chunk of C tokens the writes are
solved at once with one unit-lower-triangular inverse, so the only sequential loop is over T / C
chunks and the rest is batched matmuls: what makes CPU training affordable."""
from __future__ import annotations

import torch

from supernet.ops.delta_rule.common import _check_shapes, _expand_heads, _initial_state
from supernet.ops.delta_rule.recurrent import recurrent_delta_rule

# Sub-block size for the per-channel (KDA) intra-chunk scores; see `_per_channel_scores`.
_SUB_BLOCK = 8
# Arguments of exp are clamped here; see `_exp`.
_EXP_FLOOR = -80.0



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
