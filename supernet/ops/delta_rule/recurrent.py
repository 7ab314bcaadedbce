"""The token-by-token recurrence in torch: the reference every other path is checked against
(the role of fla's `naive.py`), and the cheapest path for a handful of tokens."""
from __future__ import annotations

import torch

from supernet.ops.delta_rule.common import _check_shapes, _expand_heads, _initial_state


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


def decode_step_vk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    scale: float | None = None,
    scratch: torch.Tensor | None = None,
) -> torch.Tensor:
    """One token per sequence on float32 states kept in vLLM's/fla's [B, HV, V, K] layout (the
    transpose of the reference's [B, HV, K, V]), updated in place.

    `scratch` (float32, the state's shape) holds the state-sized products of the two reads; a
    caller that passes the same one every step allocates nothing of state size (on the CPU a fresh
    multi-MB buffer per call costs its page faults again, more than the arithmetic at batch 32).

    Why beside the reference: a served decode step reads each sequence's state page, advances it
    one token and writes it back; in the pages' own layout that needs no transposed copies. Same arithmetic as `recurrent_delta_rule` for
    T = 1. q, k [B, H, K]; v [B, HV, V]; g [B, HV] (GDN) or [B, HV, K] (KDA); beta [B, HV].
    Returns o [B, HV, V] in v's dtype.
    """
    B, H, K = q.shape
    HV, V = v.shape[1], v.shape[2]
    if state.shape != (B, HV, V, K) or state.dtype != torch.float32:
        raise ValueError(f"state must be float32 [B, HV, V, K]={[B, HV, V, K]}; got {state.dtype} {list(state.shape)}")
    scale = K**-0.5 if scale is None else scale
    qf = _expand_heads(q.unsqueeze(1), HV)[:, 0].float() * scale  # [B, HV, K]
    kf = _expand_heads(k.unsqueeze(1), HV)[:, 0].float()
    decay = g.float().exp()
    state.mul_(decay.unsqueeze(-2) if g.dim() == 3 else decay[..., None, None])
    # matrix-vector products as multiply-and-reduce over K: on the CPU a few times faster than
    # bmm's batched [V, K] @ [K, 1] (measured 85 against 350 us for 72 heads of 64 x 64)
    if scratch is not None and (scratch.shape != state.shape or scratch.dtype != torch.float32):
        raise ValueError(f"scratch must be float32 {list(state.shape)}; got {scratch.dtype} {list(scratch.shape)}")
    err = v.float() - torch.mul(state, kf.unsqueeze(-2), out=scratch).sum(-1)  # v - S^T k
    state.addcmul_((beta.float().unsqueeze(-1) * err).unsqueeze(-1), kf.unsqueeze(-2))
    return torch.mul(state, qf.unsqueeze(-2), out=scratch).sum(-1).to(v.dtype)
