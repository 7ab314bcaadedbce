"""GDN and KDA mixers as vLLM `MambaBase` layers: vLLM owns their recurrent-state cache.

Why our own layer and not vLLM's: vLLM's Qwen3-Next GDN layer runs on CPU only in bf16 (we serve
float32 too, to match the reference model token for token) and its Kimi KDA layer is Triton-only.
Both of ours use vLLM's GDN metadata (`MambaAttentionBackendEnum.GDN_ATTN`): vLLM allocates one
state page per sequence (plus one per draft token when speculative decoding is on), sorts decodes
before prefills, and tells us which page holds each sequence's state; the math is `supernet/ops/delta_rule/`.

State page of one sequence: the short-conv tail [C, W-1] (model dtype) and the recurrent matrix
[H, K, V] (float32). With speculative decoding each of the k+1 pages holds a full (tail, matrix)
pair: the state after draft token j goes to page j, and the next step starts from the page of the
last accepted token (`num_accepted_tokens - 1`), so rejected drafts leave no trace.

vLLM runs a forward over the flattened tokens of all sequences; we loop over the sequences that
prefill (and over draft-verifying sequences) and run all plain decodes of the batch as one batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from vllm.config import get_current_vllm_config
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.linear import ReplicatedLinear
from vllm.model_executor.layers.mamba.abstract import MambaBase
from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum

from supernet.ops.delta_rule import gated_delta_rule, kda_rule
from supernet.ops.gated_norm import gated_rms_norm
from supernet.ops.short_conv import causal_conv1d_silu


def linear_mixer_dims(config, kind: str) -> dict[str, int]:
    """Head counts and sizes of a GDN or KDA mixer (the spec's names: H, HV, K, V, W)."""
    if kind == "gdn":
        h, hv = config.gdn_num_heads, config.gdn_num_v_heads
        k, v = config.gdn_head_dim, config.gdn_v_head_dim
    elif kind == "kda":
        h = hv = config.kda_num_heads
        k, v = config.kda_head_dim, config.kda_v_head_dim
    else:
        raise ValueError(f"{kind!r} is not a linear mixer")
    w = config.linear_conv_size
    return {"H": h, "HV": hv, "K": k, "V": v, "W": w, "C": 2 * h * k + hv * v}


def linear_state_shapes(config, kind: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    d = linear_mixer_dims(config, kind)
    return (d["C"], d["W"] - 1), (d["HV"], d["K"], d["V"])


def linear_state_dtypes(model_dtype: torch.dtype) -> tuple[torch.dtype, torch.dtype]:
    return model_dtype, torch.float32


class SupernetLinearAttention(nn.Module, MambaBase):
    """One GDN or KDA mixer (`kind`), reading and writing its state in vLLM's cache pages.

    The input projections that read the hidden state are merged into one GEMM (`in_proj`); the
    q/k/v convolutions into one depthwise conv over the concatenated channels. Weights are
    replicated across tensor-parallel ranks (these mixers are small next to the MLP).
    """

    def __init__(self, config, kind: str, prefix: str) -> None:
        super().__init__()
        self.kind = kind
        self.prefix = prefix
        dims = linear_mixer_dims(config, kind)
        self.h, self.hv, self.k_dim, self.v_dim, self.width = dims["H"], dims["HV"], dims["K"], dims["V"], dims["W"]
        self.conv_dim = dims["C"]
        self.scale = self.k_dim**-0.5
        self.norm_eps = config.linear_norm_eps
        d = config.hidden_size
        hk, hvv = self.h * self.k_dim, self.hv * self.v_dim
        if kind == "gdn":
            # q, k, v, output gate, decay input a, beta input b
            self.sections = {"q_proj": hk, "k_proj": hk, "v_proj": hvv, "g_proj": hvv, "a_proj": self.hv, "b_proj": self.hv}
            self.dt_bias = nn.Parameter(torch.zeros(self.hv), requires_grad=False)
        else:
            # q, k, v, low-rank decay input f_a, beta input b, low-rank output gate g_a
            self.sections = {"q_proj": hk, "k_proj": hk, "v_proj": hvv, "f_a_proj": self.k_dim, "b_proj": self.h, "g_a_proj": self.v_dim}
            self.f_b_proj = ReplicatedLinear(self.k_dim, hk, bias=False, return_bias=False, prefix=f"{prefix}.f_b_proj")
            self.g_b_proj = ReplicatedLinear(self.v_dim, hvv, bias=False, return_bias=False, prefix=f"{prefix}.g_b_proj")
            self.dt_bias = nn.Parameter(torch.zeros(hk), requires_grad=False)
        self.in_proj = ReplicatedLinear(d, sum(self.sections.values()), bias=False, return_bias=False, prefix=f"{prefix}.in_proj")
        self.conv_weight = nn.Parameter(torch.zeros(self.conv_dim, self.width), requires_grad=False)
        self.A_log = nn.Parameter(torch.zeros(self.hv), requires_grad=False)
        self.o_norm_weight = nn.Parameter(torch.ones(self.v_dim), requires_grad=False)
        self.o_proj = ReplicatedLinear(hvv, d, bias=False, return_bias=False, prefix=f"{prefix}.o_proj")

        vllm_config = get_current_vllm_config()
        self.model_dtype = vllm_config.model_config.dtype
        context = vllm_config.compilation_config.static_forward_context
        if prefix in context:
            raise ValueError(f"duplicate layer name {prefix}")
        context[prefix] = self
        self.kv_cache = (torch.tensor([]), torch.tensor([]))

    # -- MambaBase -----------------------------------------------------------------------------
    @property
    def mamba_type(self) -> MambaAttentionBackendEnum:
        return MambaAttentionBackendEnum.GDN_ATTN

    def get_state_shape(self):
        return (self.conv_dim, self.width - 1), (self.hv, self.k_dim, self.v_dim)

    def get_state_dtype(self):
        return linear_state_dtypes(self.model_dtype)

    # -- checkpoint loading --------------------------------------------------------------------
    def load_checkpoint_tensor(self, name: str, tensor: torch.Tensor) -> str | None:
        """Copy one checkpoint tensor (name relative to `mixers.<kind>.`) into place.

        Returns the name of the parameter it went to, or None if the name is unknown."""
        proj = name.rsplit(".", 1)[0]
        if proj in self.sections and name.endswith(".weight"):
            offset = 0
            for key, size in self.sections.items():
                if key == proj:
                    break
                offset += size
            self.in_proj.weight.data[offset : offset + self.sections[proj]].copy_(tensor)
            return "in_proj.weight"
        if name in ("q_conv1d.weight", "k_conv1d.weight", "v_conv1d.weight"):
            hk = self.h * self.k_dim
            start = {"q": 0, "k": hk, "v": 2 * hk}[name[0]]
            self.conv_weight.data[start : start + tensor.shape[0]].copy_(tensor.reshape(tensor.shape[0], -1))
            return "conv_weight"
        simple = {"A_log": "A_log", "dt_bias": "dt_bias", "o_norm.weight": "o_norm_weight",
                  "o_proj.weight": "o_proj.weight"}
        if self.kind == "kda":
            simple.update({"f_b_proj.weight": "f_b_proj.weight", "g_b_proj.weight": "g_b_proj.weight"})
        if name in simple:
            param = self.get_parameter(simple[name])
            param.data.copy_(tensor.reshape(param.shape))
            return simple[name]
        return None

    # -- forward -------------------------------------------------------------------------------
    def _decay_and_beta(self, parts: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Log decay g ([N, HV] for GDN, [N, H, K] for KDA) and beta [N, HV], in float32."""
        beta = torch.sigmoid(parts["b_proj"].float())
        if self.kind == "gdn":
            g = -self.A_log.float().exp() * F.softplus(parts["a_proj"].float() + self.dt_bias.float())
        else:
            f = self.f_b_proj(parts["f_a_proj"]).float().view(-1, self.h, self.k_dim)
            g = -self.A_log.float().exp()[:, None] * F.softplus(f + self.dt_bias.float().view(self.h, self.k_dim))
        return g, beta

    def _project(self, hidden_states: torch.Tensor):
        """Conv input [N, C], log decay, beta, output-gate pre-activation and its activation."""
        proj = self.in_proj(hidden_states)
        parts = dict(zip(self.sections, proj.split(list(self.sections.values()), dim=-1)))
        g, beta = self._decay_and_beta(parts)
        if self.kind == "gdn":
            gate, activation = parts["g_proj"], "silu"
        else:
            gate, activation = self.g_b_proj(parts["g_a_proj"]), "sigmoid"
        return proj[:, : self.conv_dim], g, beta, gate, activation

    def _readout(self, o: torch.Tensor, gate: torch.Tensor, activation: str) -> torch.Tensor:
        n = o.shape[0]
        out = gated_rms_norm(o, gate.reshape(n, self.hv, self.v_dim), self.o_norm_weight, self.norm_eps, activation)
        return self.o_proj(out.reshape(n, -1))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        raw, g, beta, gate, activation = self._project(hidden_states)
        o = hidden_states.new_zeros(hidden_states.shape[0], self.hv, self.v_dim)
        meta = get_forward_context().attn_metadata
        meta = meta.get(self.prefix) if isinstance(meta, dict) else None
        if meta is not None and meta.num_actual_tokens > 0:
            self._mix(meta, raw, g, beta, o)
        return self._readout(o, gate, activation)

    def forward_with_state(self, hidden_states: torch.Tensor, state: dict) -> torch.Tensor:
        """One sequence [T, D] with a private state dict (`conv`, `recurrent`) instead of vLLM's
        pages: the self-speculative drafter runs served mixers this way."""
        raw, g, beta, gate, activation = self._project(hidden_states)
        o, state["conv"], state["recurrent"] = self._rule(raw[None], g[None], beta[None], state.get("conv"), state.get("recurrent"))
        return self._readout(o[0].to(hidden_states.dtype), gate, activation)

    def _rule(self, raw: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, tail, state):
        """Conv + delta rule for B sequences of T tokens: raw [B, T, C]; tail/state None = fresh.

        Returns (o [B, T, HV, V], new tail [B, C, W-1], new state [B, HV, K, V])."""
        x, new_tail = causal_conv1d_silu(raw, self.conv_weight, tail, return_tail=True)
        b, t, hk = x.shape[0], x.shape[1], self.h * self.k_dim
        q = x[..., :hk].reshape(b, t, self.h, self.k_dim)
        k = x[..., hk : 2 * hk].reshape(b, t, self.h, self.k_dim)
        v = x[..., 2 * hk :].reshape(b, t, self.hv, self.v_dim)
        rule = gated_delta_rule if self.kind == "gdn" else kda_rule
        o, new_state = rule(q, k, v, g, beta, initial_state=state, output_final_state=True, use_qk_l2norm=True)
        return o, new_tail, new_state

    def _mix(self, meta, raw, g, beta, o) -> None:
        """Run the convolution and the recurrence for every sequence of the batch, into o."""
        if meta.spec_sequence_masks is None:
            qsl = meta.non_spec_query_start_loc.tolist()
            slots = meta.non_spec_state_indices_tensor
            nd = meta.num_decodes
            if nd:  # all one-token decodes of the batch at once (they come first)
                self._decode_batch(torch.arange(nd, device=raw.device), slots[:nd].long(), raw, g, beta, o)
            for r in range(nd, nd + meta.num_prefills):
                tokens = torch.arange(qsl[r], qsl[r + 1], device=raw.device)
                self._prefill_one(tokens, int(slots[r]), bool(meta.has_initial_state[r]), raw, g, beta, o)
            return
        # speculative batch: draft-verifying rows keep one state page per token
        spec_qsl = meta.spec_query_start_loc.tolist()
        accepted = meta.num_accepted_tokens.tolist()
        for r in range(meta.num_spec_decodes):
            tokens = meta.spec_token_indx[spec_qsl[r] : spec_qsl[r + 1]].long()
            pages = meta.spec_state_indices_tensor[r].tolist()
            self._verify_one(tokens, pages, accepted[r], raw, g, beta, o)
        if meta.num_prefills:
            qsl = meta.non_spec_query_start_loc.tolist()
            slots = meta.non_spec_state_indices_tensor
            for r in range(meta.num_prefills):
                tokens = meta.non_spec_token_indx[qsl[r] : qsl[r + 1]].long()
                self._prefill_one(tokens, int(slots[r]), bool(meta.has_initial_state[r]), raw, g, beta, o)

    def _decode_batch(self, tokens, slots, raw, g, beta, o) -> None:
        conv_cache, ssm_cache = self.kv_cache
        out, tail, state = self._rule(
            raw[tokens][:, None], g[tokens][:, None], beta[tokens][:, None], conv_cache[slots], ssm_cache[slots]
        )
        conv_cache[slots] = tail.to(conv_cache.dtype)
        ssm_cache[slots] = state
        o[tokens] = out[:, 0].to(o.dtype)

    def _prefill_one(self, tokens, slot: int, has_init: bool, raw, g, beta, o) -> None:
        conv_cache, ssm_cache = self.kv_cache
        tail = conv_cache[slot][None] if has_init else None
        state = ssm_cache[slot][None] if has_init else None
        out, new_tail, new_state = self._rule(raw[tokens][None], g[tokens][None], beta[tokens][None], tail, state)
        conv_cache[slot] = new_tail[0].to(conv_cache.dtype)
        ssm_cache[slot] = new_state[0]
        o[tokens] = out[0].to(o.dtype)

    def _verify_one(self, tokens, pages: list[int], accepted: int, raw, g, beta, o) -> None:
        """Draft verification: token by token (as plain decoding would), state after token j -> page j."""
        conv_cache, ssm_cache = self.kv_cache
        start = pages[accepted - 1]
        tail, state = conv_cache[start][None].clone(), ssm_cache[start][None].clone()
        for j, t in enumerate(tokens.tolist()):
            out, tail, state = self._rule(raw[t : t + 1][None], g[t : t + 1][None], beta[t : t + 1][None], tail, state)
            o[t] = out[0, 0].to(o.dtype)
            conv_cache[pages[j]] = tail[0].to(conv_cache.dtype)
            ssm_cache[pages[j]] = state[0]
