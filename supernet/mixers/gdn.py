"""Gated DeltaNet mixer (`mixers.gdn.`): a delta-rule recurrence with one data-dependent decay per head.

Also home of what GDN and KDA share (both are "linear" mixers with q/k/v short convolutions, a
recurrent state and a gated RMSNorm): `LinearMixerBase` and the helpers that map a teacher's
attention weights onto them.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from supernet.cache import SupernetCache
from supernet.config import SupernetConfig
from supernet.ops.delta_rule import delta_rule_per_token_states, gated_delta_rule
from supernet.ops.gated_norm import GatedRMSNorm
from supernet.ops.short_conv import causal_conv1d_silu, tails_after_each_token

# Conversion from attention: the short conv starts as "pass the current token through", with a
# small tap so that SiLU(tap * x) ~ tap * x / 2 stays nearly linear (a tap of 1 would let SiLU
# squash the negative half of q, k and v). q and k are L2-normalised and the readout is
# RMS-normalised afterwards, so the small scale itself does not matter. Sized on SmolLM2-135M:
# q/k projections have RMS ~2 (p99 ~10), v RMS ~0.5-1.5 (p99 ~2-5); v's tap is larger so that
# the readout stays well above o_norm's eps.
CONV_TAP_QK = 0.05
CONV_TAP_V = 0.2
# Per-token decay rates -g = softplus(dt_bias) (A = 1) spread log-uniformly over this range at
# init: memories of ~10 to ~1000 tokens.
DT_RANGE = (1e-3, 1e-1)


def inverse_softplus(y: torch.Tensor) -> torch.Tensor:
    """x with softplus(x) = y (y > 0)."""
    return y + torch.log(-torch.expm1(-y))


def log_spaced_dt(n: int) -> torch.Tensor:
    """n decay rates, log-uniform over DT_RANGE, smallest (longest memory) last."""
    lo, hi = DT_RANGE
    return torch.exp(torch.linspace(math.log(hi), math.log(lo), n))


def expand_kv_rows(w: torch.Tensor, num_kv_heads: int, head_dim: int, num_heads: int) -> torch.Tensor:
    """[Hkv*Dh, D] projection -> [H*Dh, D]: head h gets teacher kv head h // (H // Hkv), as in GQA."""
    rows = w.reshape(num_kv_heads, head_dim, w.shape[-1])
    return rows.repeat_interleave(num_heads // num_kv_heads, dim=0).reshape(num_heads * head_dim, w.shape[-1])


def check_teacher_attention(
    mixer_name: str,
    hidden_size: int,
    mixer_heads: dict[str, int],
    mixer_dims: dict[str, int],
    q_w: torch.Tensor,
    k_w: torch.Tensor,
    v_w: torch.Tensor,
    o_w: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
) -> None:
    """Raise one clear ValueError when the teacher's attention cannot be mapped onto the mixer.

    Supported: every mixer head count equals the teacher's query heads and every head dim equals
    the teacher's head_dim (k/v heads are then repeated as in GQA).
    """
    teacher = f"teacher attention (heads={num_heads}, kv_heads={num_kv_heads}, head_dim={head_dim})"
    expected = {
        "q_w": (num_heads * head_dim, hidden_size),
        "k_w": (num_kv_heads * head_dim, hidden_size),
        "v_w": (num_kv_heads * head_dim, hidden_size),
        "o_w": (hidden_size, num_heads * head_dim),
    }
    for name, w in {"q_w": q_w, "k_w": k_w, "v_w": v_w, "o_w": o_w}.items():
        if tuple(w.shape) != expected[name]:
            raise ValueError(
                f"{mixer_name}.init_from_attention: {name} has shape {tuple(w.shape)}, expected "
                f"{expected[name]} for {teacher} and hidden_size={hidden_size}"
            )
    if num_kv_heads <= 0 or num_heads % num_kv_heads != 0:
        raise ValueError(f"{mixer_name}.init_from_attention: {teacher}: heads must be a multiple of kv_heads")
    bad = {k: v for k, v in mixer_heads.items() if v != num_heads}
    bad.update({k: v for k, v in mixer_dims.items() if v != head_dim})
    if bad:
        got = ", ".join(f"{k}={v}" for k, v in {**mixer_heads, **mixer_dims}.items())
        raise ValueError(
            f"cannot map {teacher} onto {mixer_name} ({got}): set the mixer's head counts to "
            f"{num_heads} and its head dims to {head_dim} in the config"
        )


def identity_conv_(weight: torch.Tensor, tap: float) -> None:
    """Depthwise causal conv weight [C, 1, W] that passes the current token through, times `tap`."""
    weight.zero_()
    weight[..., -1] = tap


class LinearMixerBase(nn.Module):
    """Shared plumbing of GDN and KDA: q/k/v projections with short convolutions, cache I/O."""

    cache_name: str = ""

    def __init__(self, config: SupernetConfig, layer_idx: int, key_dim: int, value_dim: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        D, W = config.hidden_size, config.linear_conv_size
        if W < 1:
            raise ValueError(f"linear_conv_size must be >= 1, got {W}")
        self.q_proj = nn.Linear(D, key_dim, bias=False)
        self.k_proj = nn.Linear(D, key_dim, bias=False)
        self.v_proj = nn.Linear(D, value_dim, bias=False)
        self.q_conv1d = nn.Conv1d(key_dim, key_dim, W, groups=key_dim, bias=False)
        self.k_conv1d = nn.Conv1d(key_dim, key_dim, W, groups=key_dim, bias=False)
        self.v_conv1d = nn.Conv1d(value_dim, value_dim, W, groups=value_dim, bias=False)

    def prepare_static(self, state: dict, capacity: int, lookahead: int = 0) -> None:
        """Conv tails and the recurrent matrix already have fixed sizes: nothing to do."""

    # -- speculative decoding: per-token history, rollback without recomputation ------------------
    # A recurrent state cannot be cut back like a KV cache. While `cache.history_slot` is set, every
    # fed token's state (recurrent matrix and conv tails after that token) is kept in `hist_<name>`
    # [B, slots, ...] at slot `history_slot + i`; slot 0 holds the state before the round. Taking
    # back rejected tokens is then one gather per row (`rollback`), no token is run twice.
    HISTORY = ("recurrent", "conv_q", "conv_k", "conv_v")

    def prepare_history(self, state: dict, slots: int) -> None:
        """Allocate `slots` history entries per row; slot 0 is the current state."""
        for name in self.HISTORY:
            live = state[name]
            hist = live.new_zeros(live.shape[0], slots, *live.shape[1:])
            hist[:, 0] = live
            state[f"hist_{name}"] = hist

    def rollback(self, state: dict, index: torch.Tensor) -> None:
        """Row b goes back to its history slot `index[b]` ([B] long), which also becomes slot 0.

        The live tensors are overwritten in place, so a captured CUDA graph keeps reading them."""
        rows = torch.arange(index.shape[0], device=index.device)
        for name in self.HISTORY:
            hist = state[f"hist_{name}"]
            hist[:, 0] = hist[rows, index]
            state[name].copy_(hist[:, 0])

    def _record(self, state: dict, name: str, per_token: torch.Tensor, slot: torch.Tensor) -> None:
        """Store per-token states [B, T, ...] at history slots slot .. slot + T - 1."""
        t = per_token.shape[1]
        state[f"hist_{name}"].index_copy_(1, slot + torch.arange(t, device=slot.device), per_token)

    def _delta_rule(self, rule, q, k, v, gate, beta_logits, state: dict | None,
                    history: torch.Tensor | None = None) -> torch.Tensor:
        """Run `rule` (gated_delta_rule / kda_rule) from the cached recurrent state, storing the new one.

        `gate` and `beta_logits` are the raw projections: the decay -exp(A_log) * softplus(gate +
        dt_bias) and sigmoid(beta_logits) are computed by the op (inside fla's kernel for CUDA
        inference, in torch otherwise).
        """
        if history is not None:
            o, states = delta_rule_per_token_states(
                q, k, v, gate, beta_logits, scale=self.scale, initial_state=state["recurrent"],
                use_qk_l2norm=True, A_log=self.A_log, dt_bias=self.dt_bias, beta_logits=True,
            )
            self._record(state, "recurrent", states, history)
            state["recurrent"] = states[:, -1]
            return o
        o, recurrent = rule(
            q, k, v, gate, beta_logits, scale=self.scale,
            initial_state=state.get("recurrent") if state is not None else None,
            output_final_state=state is not None,
            use_qk_l2norm=True,
            A_log=self.A_log, dt_bias=self.dt_bias, beta_logits=True,
        )
        if state is not None:
            state["recurrent"] = recurrent
        return o

    def _state(self, cache: SupernetCache | None) -> dict | None:
        return None if cache is None else cache.mixer_state(self.layer_idx, self.cache_name)

    @staticmethod
    def _history(cache: SupernetCache | None) -> torch.Tensor | None:
        return None if cache is None else cache.history_slot

    def _qkv(self, x: torch.Tensor, state: dict | None,
             history: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Projections -> causal conv -> SiLU, continuing from (and updating) the cached conv tails."""
        keep = state is not None
        out = []
        for name, proj, conv in (
            ("conv_q", self.q_proj, self.q_conv1d),
            ("conv_k", self.k_proj, self.k_conv1d),
            ("conv_v", self.v_proj, self.v_conv1d),
        ):
            inputs = proj(x)
            if history is not None:
                self._record(state, name, tails_after_each_token(state[name], inputs), history)
            y, tail = causal_conv1d_silu(inputs, conv.weight, state.get(name) if keep else None, return_tail=keep)
            if keep:
                state[name] = tail
            out.append(y)
        return out[0], out[1], out[2]

    def _reset_common(self) -> None:
        """Linear and conv weights N(0, initializer_range), o_norm 1: what the model's HF
        `_init_weights` does to these modules too, so a standalone mixer and one inside a fresh
        model start alike (HF leaves A_log / dt_bias alone; the subclasses set them)."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv1d)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
        self.o_norm.reset_parameters()
        for name in ("A_log", "dt_bias"):
            getattr(self, name)._no_weight_decay = True  # read by optimisers that honour the flag

    def _copy_attention(self, q_w, k_w, v_w, o_w, num_heads, num_kv_heads, head_dim) -> None:
        """q/o copied, k/v repeated per GQA group, convs near identity; shapes already checked."""
        self.q_proj.weight.copy_(q_w)
        self.k_proj.weight.copy_(expand_kv_rows(k_w, num_kv_heads, head_dim, num_heads))
        self.v_proj.weight.copy_(expand_kv_rows(v_w, num_kv_heads, head_dim, num_heads))
        self.o_proj.weight.copy_(o_w)
        identity_conv_(self.q_conv1d.weight, CONV_TAP_QK)
        identity_conv_(self.k_conv1d.weight, CONV_TAP_QK)
        identity_conv_(self.v_conv1d.weight, CONV_TAP_V)
        self.o_norm.reset_parameters()


class GatedDeltaNetMixer(LinearMixerBase):
    """GDN: S <- exp(g_t) S; S <- S + beta_t k_t (v_t - S^T k_t)^T; o_t = K^-0.5 S^T q_t, per head.

    Decode state (in `cache.mixer_state(layer_idx, "gdn")`): `conv_q`, `conv_k`, `conv_v`
    ([B, C, W-1], the last inputs of each short conv) and `recurrent` ([B, HV, K, V], fp32).
    """

    cache_name = "gdn"

    def __init__(self, config: SupernetConfig, layer_idx: int) -> None:
        self.num_heads = config.gdn_num_heads
        self.num_v_heads = config.gdn_num_v_heads
        self.head_dim = config.gdn_head_dim
        self.v_head_dim = config.gdn_v_head_dim
        if self.num_v_heads % self.num_heads != 0:
            raise ValueError(
                f"gdn_num_v_heads ({self.num_v_heads}) must be a multiple of gdn_num_heads ({self.num_heads})"
            )
        H, HV, K, V = self.num_heads, self.num_v_heads, self.head_dim, self.v_head_dim
        super().__init__(config, layer_idx, key_dim=H * K, value_dim=HV * V)
        D = config.hidden_size
        self.a_proj = nn.Linear(D, HV, bias=False)
        self.A_log = nn.Parameter(torch.zeros(HV))
        self.dt_bias = nn.Parameter(torch.zeros(HV))
        self.b_proj = nn.Linear(D, HV, bias=False)
        self.g_proj = nn.Linear(D, HV * V, bias=False)
        self.o_norm = GatedRMSNorm(V, eps=config.linear_norm_eps, activation="silu")
        self.o_proj = nn.Linear(HV * V, D, bias=False)
        self.scale = K**-0.5
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Default init without a teacher: small normal Linear weights, log-spread decays."""
        self._reset_common()
        self.A_log.zero_()
        self.dt_bias.copy_(inverse_softplus(log_spaced_dt(self.num_v_heads)))

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: SupernetCache | None = None,
    ) -> torch.Tensor:
        B, T, _ = hidden_states.shape
        H, HV, K, V = self.num_heads, self.num_v_heads, self.head_dim, self.v_head_dim
        x = hidden_states
        state, history = self._state(cache), self._history(cache)
        q, k, v = self._qkv(x, state, history)
        o = self._delta_rule(
            gated_delta_rule, q.view(B, T, H, K), k.view(B, T, H, K), v.view(B, T, HV, V),
            self.a_proj(x), self.b_proj(x), state, history,
        )
        o = self.o_norm(o, self.g_proj(x).view(B, T, HV, V))
        return self.o_proj(o.reshape(B, T, HV * V).to(x.dtype))

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

        Gates: decays log-spread over DT_RANGE; convs pass the current token; o_norm weight 1;
        g_proj = 0, so the output gate silu(0) = 0 and the mixer starts silent (the residual
        stream passes unchanged). SiLU has no bias to hold it open, and a random gate would add
        noise instead; g_proj's gradient is non-zero, so training opens the gate where it helps.
        """
        check_teacher_attention(
            "GatedDeltaNetMixer", self.config.hidden_size,
            {"gdn_num_heads": self.num_heads, "gdn_num_v_heads": self.num_v_heads},
            {"gdn_head_dim": self.head_dim, "gdn_v_head_dim": self.v_head_dim},
            q_w, k_w, v_w, o_w, num_heads, num_kv_heads, head_dim,
        )
        self._copy_attention(q_w, k_w, v_w, o_w, num_heads, num_kv_heads, head_dim)
        self.A_log.zero_()
        self.dt_bias.copy_(inverse_softplus(log_spaced_dt(self.num_v_heads)))
        self.g_proj.weight.zero_()
