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
