"""Kimi Delta Attention mixer (`mixers.kda.`): the delta rule with one data-dependent decay per key channel."""
from __future__ import annotations

import math

import torch
from torch import nn

from supernet.cache import SupernetCache
from supernet.config import SupernetConfig
from supernet.mixers.gdn import (
    DT_RANGE,
    LinearMixerBase,
    check_teacher_attention,
    inverse_softplus,
)
from supernet.ops.delta_rule import kda_rule
from supernet.ops.gated_norm import GatedRMSNorm


def channel_dt(num_heads: int, head_dim: int) -> torch.Tensor:
    """[H*K] per-channel decay rates at init, log-spread over DT_RANGE within every head.

    Channels c and c + K/2 (a RoPE pair in the teacher) share a rate, and the rate falls with the
    pair index: in Llama's RoPE low pair indices rotate fast (position-sensitive, local) and high
    ones slowly (content, long range), so fast-rotating channels forget fast. A heuristic start;
    training moves it.
    """
    half = (head_dim + 1) // 2
    lo, hi = DT_RANGE
    rates = torch.exp(torch.linspace(math.log(hi), math.log(lo), half))
    per_head = rates[torch.arange(head_dim) % half]
    return per_head.repeat(num_heads)


class KimiDeltaAttentionMixer(LinearMixerBase):
    """KDA: S <- diag(exp(g_t)) S; S <- S + beta_t k_t (v_t - S^T k_t)^T; o_t = K^-0.5 S^T q_t.

    Decode state (in `cache.mixer_state(layer_idx, "kda")`): `conv_q`, `conv_k`, `conv_v`
    ([B, C, W-1]) and `recurrent` ([B, H, K, V], fp32).
    """

    cache_name = "kda"

    def __init__(self, config: SupernetConfig, layer_idx: int) -> None:
        self.num_heads = config.kda_num_heads
        self.head_dim = config.kda_head_dim
        self.v_head_dim = config.kda_v_head_dim
        H, K, V = self.num_heads, self.head_dim, self.v_head_dim
        super().__init__(config, layer_idx, key_dim=H * K, value_dim=H * V)
        D = config.hidden_size
        self.f_a_proj = nn.Linear(D, K, bias=False)
        self.f_b_proj = nn.Linear(K, H * K, bias=False)
        self.A_log = nn.Parameter(torch.zeros(H))
        self.dt_bias = nn.Parameter(torch.zeros(H * K))
        self.b_proj = nn.Linear(D, H, bias=False)
        self.g_a_proj = nn.Linear(D, V, bias=False)
        self.g_b_proj = nn.Linear(V, H * V, bias=False)
        self.o_norm = GatedRMSNorm(V, eps=config.linear_norm_eps, activation="sigmoid")
        self.o_proj = nn.Linear(H * V, D, bias=False)
        self.scale = K**-0.5
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Default init without a teacher: small normal Linear weights, log-spread decays."""
        self._reset_common()
        self.A_log.zero_()
        self.dt_bias.copy_(inverse_softplus(channel_dt(self.num_heads, self.head_dim)))

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: SupernetCache | None = None,
    ) -> torch.Tensor:
        B, T, _ = hidden_states.shape
        H, K, V = self.num_heads, self.head_dim, self.v_head_dim
        x = hidden_states
        state, history = self._state(cache), self._history(cache)
        q, k, v = self._qkv(x, state, history)
        o = self._delta_rule(
            kda_rule, q.view(B, T, H, K), k.view(B, T, H, K), v.view(B, T, H, V),
            self.f_b_proj(self.f_a_proj(x)).view(B, T, H, K), self.b_proj(x), state, history,
        )
        o = self.o_norm(o, self.g_b_proj(self.g_a_proj(x)).view(B, T, H, V))
        return self.o_proj(o.reshape(B, T, H * V).to(x.dtype))

    @torch.no_grad()
    def init_from_attention(
        self,
        q_w: torch.Tensor,
        k_w: torch.Tensor,
        v_w: torch.Tensor,
        o_w: torch.Tensor,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
    ) -> None:
        """Start from a teacher attention: q/k/v/o copied (k/v repeated per GQA group).

        Gates: per-channel decays from `channel_dt`; convs pass the current token; o_norm weight 1;
        g_b_proj = 0, so the output gate is sigmoid(0) = 1/2 for every token: the output starts
        as half the RMS-normalised state readout (g_a_proj keeps its random init so that g_b_proj
        gets gradients).
        """
        check_teacher_attention(
            "KimiDeltaAttentionMixer", self.config.hidden_size,
            {"kda_num_heads": self.num_heads},
            {"kda_head_dim": self.head_dim, "kda_v_head_dim": self.v_head_dim},
            q_w, k_w, v_w, o_w, num_heads, num_kv_heads, head_dim,
        )
        self._copy_attention(q_w, k_w, v_w, o_w, num_heads, num_kv_heads, head_dim)
        self.A_log.zero_()
        self.dt_bias.copy_(inverse_softplus(channel_dt(self.num_heads, self.head_dim)))
        self.g_b_proj.weight.zero_()
