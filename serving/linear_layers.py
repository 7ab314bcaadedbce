"""GDN and KDA mixers as vLLM `MambaBase` layers: vLLM owns their recurrent-state pages.

Why our own layer and not vLLM's: vLLM's Qwen3-Next GDN layer runs on CPU only in bf16 (we serve
float32 too, to match the reference model token for token) and its Kimi KDA layer is Triton-only.
Both of ours use vLLM's GDN metadata (`MambaAttentionBackendEnum.GDN_ATTN`): vLLM allocates one
state page per sequence (plus one per draft token with speculative decoding), sorts decodes before
prefills and says which page holds each sequence's state; the math is `supernet.ops`.

State page of one sequence: the short-conv tail [C, W-1] (model dtype) and the recurrent matrix
[HV, V, K] (float32; vLLM's/fla's layout, the transpose of our reference [HV, K, V], so that the
Triton kernels update pages in place). With speculative decoding each of the k+1 pages of a
sequence holds a full (tail, matrix) pair: the state after draft token j goes to page j and the
next step starts from page `num_accepted_tokens - 1`, so rejected drafts leave no trace.

How a step runs (the vLLM way): projections, gates and the readout are ordinary layers that
torch.compile sees; the convolution and the recurrence are one custom op,
`torch.ops.vllm.supernet_linear_core`, which vLLM treats as a splitting op (the plugin adds it to
`splitting_ops`), so piecewise CUDA graphs run it eagerly between graph pieces and full decode
graphs capture it. Inside the op every group of rows is one batched call, never a Python loop over
sequences: all one-token decodes of the step, all prefills of the step (varlen: `cu_seqlens` from
the metadata), all draft-verifying rows. Pages are read with `index_select` and written with
`index_copy_` by slot (a page-0 write for rows vLLM padded: page 0 is vLLM's null block). The
convolution gathers each token's window from the flat tokens and the gathered tails (no padding,
no host read); the recurrence runs on CUDA through vLLM's bundled fla Triton kernels (chunked for
prefills with `cu_seqlens`, fused recurrent for decodes and draft verification with
`ssm_state_indices` / `num_accepted_tokens`, states updated in place) and on the CPU through our
torch delta rule over the rows padded to the longest one (the CPU reads that length from the
CPU-resident `query_start_loc`: no device synchronisation). Draft verification loops over the
k+1 time steps of the recurrence, batched over rows.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from vllm.config import get_current_vllm_config
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.linear import ReplicatedLinear
from vllm.model_executor.layers.mamba.abstract import MambaBase
from vllm.utils.torch_utils import LayerNameType, _encode_layer_name, _resolve_layer_name, direct_register_custom_op
from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum
from vllm.v1.attention.backends.utils import NULL_BLOCK_ID

from supernet.ops.delta_rule import gated_delta_rule, kda_rule
from supernet.ops.gated_norm import gated_rms_norm
from supernet.ops.short_conv import causal_conv1d_silu

CORE_OP = "vllm::supernet_linear_core"


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
    """(conv tail [C, W-1], recurrent matrix [HV, V, K]) of one state page."""
    d = linear_mixer_dims(config, kind)
    return (d["C"], d["W"] - 1), (d["HV"], d["V"], d["K"])


def linear_state_dtypes(model_dtype: torch.dtype) -> tuple[torch.dtype, torch.dtype]:
    return model_dtype, torch.float32


class SupernetLinearAttention(nn.Module, MambaBase):
    """One GDN or KDA mixer (`kind`), reading and writing its state in vLLM's cache pages.

    The input projections that read the hidden state are merged into one GEMM (`in_proj`); the
    q/k/v convolutions into one depthwise conv over the concatenated channels. Weights are
    replicated across tensor-parallel ranks (these mixers are small next to the MLP).
    """

    # set by SupernetModel in switchable mode: restricts the op to the rows of this step whose
    # preset uses this mixer (None = every row)
    row_filter: "RowFilter | None" = None

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
        return (self.conv_dim, self.width - 1), (self.hv, self.v_dim, self.k_dim)

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
        torch.ops.vllm.supernet_linear_core(raw, g, beta, o, _encode_layer_name(self.prefix))
        return self._readout(o, gate, activation)

    def forward_rows(self, hidden_states: torch.Tensor, tokens: torch.Tensor, keep_rows: torch.Tensor) -> torch.Tensor:
        """Switchable mode: run only the `tokens` ([M] flat indices) of the request rows kept in
        `keep_rows`; returns [M, D]. Projections and readout see only those tokens; the op works
        on the step's flat layout (its metadata is the whole step's), so the projected inputs are
        scattered into it and only the kept rows' pages are touched."""
        n = hidden_states.shape[0]
        raw_s, g_s, beta_s, gate, activation = self._project(hidden_states.index_select(0, tokens))
        raw = raw_s.new_zeros(n, raw_s.shape[1]).index_copy_(0, tokens, raw_s)
        g = g_s.new_zeros(n, *g_s.shape[1:]).index_copy_(0, tokens, g_s)
        beta = beta_s.new_zeros(n, *beta_s.shape[1:]).index_copy_(0, tokens, beta_s)
        o = hidden_states.new_zeros(n, self.hv, self.v_dim)
        self.row_filter = RowFilter(keep_rows)
        try:
            torch.ops.vllm.supernet_linear_core(raw, g, beta, o, _encode_layer_name(self.prefix))
        finally:
            self.row_filter = None
        return self._readout(o.index_select(0, tokens), gate, activation)

    def forward_with_state(self, hidden_states: torch.Tensor, state: dict) -> torch.Tensor:
        """One sequence [T, D] with a private state dict (`conv`, `recurrent` [1, HV, K, V]) instead
        of vLLM's pages: the self-speculative drafter runs served mixers this way."""
        raw, g, beta, gate, activation = self._project(hidden_states)
        o, state["conv"], state["recurrent"] = self._rule(raw[None], g[None], beta[None], state.get("conv"), state.get("recurrent"))
        return self._readout(o[0].to(hidden_states.dtype), gate, activation)

    def _rule(self, raw: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, tail, state):
        """Conv + delta rule for B sequences of T tokens: raw [B, T, C]; tail/state None = fresh.

        Returns (o [B, T, HV, V], new tail [B, C, W-1], new state [B, HV, K, V])."""
        x, new_tail = causal_conv1d_silu(raw, self.conv_weight, tail, return_tail=True)
        q, k, v = self._split_qkv(x)
        rule = gated_delta_rule if self.kind == "gdn" else kda_rule
        o, new_state = rule(q, k, v, g, beta, initial_state=state, output_final_state=True, use_qk_l2norm=True)
        return o, new_tail, new_state

    def _split_qkv(self, x: torch.Tensor):
        """[..., C] conv output -> q, k [..., H, K] and v [..., HV, V]."""
        hk = self.h * self.k_dim
        lead = x.shape[:-1]
        return (x[..., :hk].reshape(*lead, self.h, self.k_dim), x[..., hk : 2 * hk].reshape(*lead, self.h, self.k_dim),
                x[..., 2 * hk :].reshape(*lead, self.hv, self.v_dim))

    # -- the custom op's body: conv + recurrence on vLLM's pages -------------------------------
    def core(self, raw: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, out: torch.Tensor) -> None:
        """Fill `out` [N, HV, V] for every token of the step; read and write the state pages."""
        meta = get_forward_context().attn_metadata
        meta = meta.get(self.prefix) if isinstance(meta, dict) else None
        if meta is None or meta.num_actual_tokens == 0:
            return  # profile / dummy run: no pages yet
        conv_cache, ssm_cache = self.kv_cache
        for rows in step_row_groups(meta, self.row_filter):
            run_rows(self, rows, raw, g, beta, out, conv_cache, ssm_cache)


# --------------------------------------------------------------------------------------------
# row groups: which tokens, pages and start states one batched call covers


@dataclass
class RowGroup:
    """Rows (sequences) that run as one batched call. Each row's tokens are contiguous in the
    step's flat token layout (vLLM lays tokens out request after request)."""

    starts: torch.Tensor  # [B] long: flat index of each row's first token
    lens: torch.Tensor  # [B] long: tokens of each row (0 for rows vLLM padded)
    num_tokens: int  # sum(lens), known on the host from the metadata's counts
    start_pages: torch.Tensor  # [B] long: page holding the state the row continues from
    pages: torch.Tensor  # [B] page for the final state, or [B, S] page per token (draft verification)
    has_init: torch.Tensor | None  # [B] bool: False = fresh sequence (ignore the page's contents)
    max_len: int | None  # static bound on lens (decodes: 1; drafts: S); None: take it from lens
    decode: bool = False  # one token per row (the CUDA path's in-place recurrent kernel)
    accepted: torch.Tensor | None = None  # [B] draft verification: vLLM's num_accepted_tokens

    @property
    def per_token_pages(self) -> bool:
        return self.pages.dim() == 2


@dataclass
class RowFilter:
    """Switchable mode: the request rows of this step (persistent-batch order) whose preset runs
    this mixer, as a CPU bool mask over `query_start_loc`'s rows."""

    keep: torch.Tensor


def _rows_of(keep: torch.Tensor | None, first: int, count: int, device) -> torch.Tensor | None:
    """Indices (relative to `first`) of kept rows among rows first .. first+count-1; None = all."""
    if keep is None:
        return None
    return torch.nonzero(keep[first : first + count], as_tuple=False).flatten().to(device)


def step_row_groups(meta, row_filter: RowFilter | None = None) -> list[RowGroup]:
    """The batched calls of one step from vLLM's `GDNAttentionMetadata`: all plain decodes, all
    prefills (varlen), all draft-verifying rows. At most three groups, whatever the batch size."""
    groups: list[RowGroup] = []
    keep = row_filter.keep if row_filter is not None else None
    if meta.spec_sequence_masks is None:
        qsl = meta.non_spec_query_start_loc.long()
        slots = meta.non_spec_state_indices_tensor.long()
        nd, np_ = meta.num_decodes, meta.num_prefills
        device = qsl.device
        if nd:
            sel = _rows_of(keep, 0, nd, device)
            starts, pages = qsl[:nd], slots[:nd]
            if sel is not None:
                starts, pages = starts[sel], pages[sel]
            n = starts.shape[0]
            if n:
                groups.append(RowGroup(starts, torch.ones_like(starts), n, pages, pages, None, 1, decode=True))
        if np_:
            sel = _rows_of(keep, nd, np_, device)
            starts = qsl[nd : nd + np_]
            lens = qsl[nd + 1 : nd + np_ + 1] - starts
            pages = slots[nd : nd + np_]
            has_init = meta.has_initial_state[nd : nd + np_]
            num = meta.num_prefill_tokens
            if sel is not None:
                starts, lens, pages, has_init = starts[sel], lens[sel], pages[sel], has_init[sel]
                num = int(lens.sum())  # eager switchable path only (CPU-resident metadata)
            if starts.shape[0]:
                groups.append(RowGroup(starts, lens, num, pages, pages, has_init, None))
        return groups
    if keep is not None:
        raise RuntimeError("switchable serving does not run with speculative decoding")
    # speculative step: draft-verifying rows keep one page per token, other rows are "prefills"
    pages = meta.spec_state_indices_tensor.long()  # [R, S]; rows vLLM padded hold the null page
    spec_qsl = meta.spec_query_start_loc.long()[: pages.shape[0] + 1]
    lens = spec_qsl[1:] - spec_qsl[:-1]
    token_ext = torch.cat([meta.spec_token_indx.long(), meta.spec_token_indx.new_zeros(1).long()])
    starts = token_ext[spec_qsl[:-1].clamp(max=token_ext.shape[0] - 1)]
    accepted = meta.num_accepted_tokens.long()[: pages.shape[0]]
    start_pages = pages.gather(1, (accepted - 1).clamp(min=0)[:, None]).squeeze(1)
    groups.append(RowGroup(starts, lens, meta.num_spec_decode_tokens, start_pages, pages, None, pages.shape[1],
                           accepted=accepted))
    if meta.num_prefills:
        qsl = meta.non_spec_query_start_loc.long()
        token_ext = torch.cat([meta.non_spec_token_indx.long(), meta.non_spec_token_indx.new_zeros(1).long()])
        np_ = meta.num_prefills
        starts = token_ext[qsl[:np_].clamp(max=token_ext.shape[0] - 1)]
        lens = qsl[1 : np_ + 1] - qsl[:np_]
        slots = meta.non_spec_state_indices_tensor.long()[:np_]
        groups.append(RowGroup(starts, lens, meta.num_prefill_tokens, slots, slots, meta.has_initial_state[:np_], None))
    return groups


# --------------------------------------------------------------------------------------------
# one batched call


def _flat_positions(rows: RowGroup) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each of the group's tokens (row-major): its row, its offset in the row, its flat index."""
    ends = torch.cumsum(rows.lens, 0)
    m = torch.arange(rows.num_tokens, device=rows.lens.device)
    row = torch.searchsorted(ends, m, right=True)
    offset = m - (ends[row] - rows.lens[row])
    return row, offset, rows.starts[row] + offset


def _window_index(rows_starts, row, offset, span: int, width: int, n: int) -> torch.Tensor:
    """Index into [flat tokens (n rows); tails (W-1 rows per group row)] of the `span` inputs that
    end at `offset` of each row: tokens of the row where they exist, else the row's start tail."""
    s = offset[:, None] - (span - 1) + torch.arange(span, device=offset.device)
    from_tokens = rows_starts[row][:, None] + s
    from_tail = n + row[:, None] * (width - 1) + (width - 1) + s
    return torch.where(s >= 0, from_tokens, from_tail)


def _start_states(layer, rows: RowGroup, conv_cache, ssm_cache):
    """(tails [B, C, W-1], matrices [B, HV, V, K] fp32) the rows continue from; zeros if fresh."""
    tail = conv_cache.index_select(0, rows.start_pages)
    state = ssm_cache.index_select(0, rows.start_pages).float()
    if rows.has_init is not None:
        init = rows.has_init.to(tail.device)
        tail = torch.where(init[:, None, None], tail, torch.zeros_like(tail))
        state = torch.where(init[:, None, None, None], state, torch.zeros_like(state))
    return tail, state


def run_rows(layer, rows: RowGroup, raw, g, beta, out, conv_cache, ssm_cache) -> None:
    """Conv + recurrence for one group of rows; `out` [N, HV, V] gets the group's tokens."""
    n, width = raw.shape[0], layer.width
    row, offset, token = _flat_positions(rows)
    tail0, state0 = _start_states(layer, rows, conv_cache, ssm_cache)
    ext = torch.cat([raw, tail0.transpose(1, 2).reshape(-1, raw.shape[1]).to(raw.dtype)])
    # short conv: each token's window of W inputs, gathered from the flat tokens and the tails
    window = ext[_window_index(rows.starts, row, offset, width, width, n)]  # [M, W, C]
    x = F.silu(torch.einsum("mwc,cw->mc", window, layer.conv_weight.to(window.dtype)))
    q, k, v = layer._split_qkv(x)
    g_rows, beta_rows = g.index_select(0, token), beta.index_select(0, token)

    def tails_after(last: torch.Tensor) -> torch.Tensor:  # [B] offsets (-1: none yet) -> [B, C, W-1]
        b = torch.arange(rows.lens.shape[0], device=last.device)
        return ext[_window_index(rows.starts, b, last, width - 1, width, n)].transpose(1, 2).to(conv_cache.dtype)

    if raw.is_cuda:
        o = _recurrence_fla(layer, rows, q, k, v, g_rows, beta_rows, state0, ssm_cache)
    else:
        o = _recurrence_torch(layer, rows, row, offset, q, k, v, g_rows, beta_rows, state0, ssm_cache)
    out.index_copy_(0, token, o.to(out.dtype))
    if rows.per_token_pages:
        for t in range(rows.pages.shape[1]):
            page = torch.where(t < rows.lens, rows.pages[:, t], NULL_BLOCK_ID)
            conv_cache.index_copy_(0, page, tails_after(torch.full_like(rows.lens, t)))
    else:
        conv_cache.index_copy_(0, rows.pages, tails_after(rows.lens - 1))


def _recurrence_torch(layer, rows: RowGroup, row, offset, q, k, v, g, beta, state0, ssm_cache) -> torch.Tensor:
    """CPU: the rows padded to the longest one, our torch delta rule batched over rows.

    Padding positions get beta = 0 (no write) and g = 0 (no decay): the final state is the state
    after each row's last token. Returns o [M, HV, V] for the group's tokens."""
    t_max = rows.max_len if rows.max_len is not None else int(rows.lens.max())  # CPU tensor: no sync
    b = rows.lens.shape[0]
    m = q.shape[0]
    pos = torch.arange(t_max, device=q.device)
    valid = pos[None, :] < rows.lens[:, None]
    flat = torch.where(valid, (torch.cumsum(rows.lens, 0) - rows.lens)[:, None] + pos, m)  # [B, T]

    def pad(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, x.new_zeros(1, *x.shape[1:])])[flat]

    qp, kp, vp, gp, bp = pad(q), pad(k), pad(v), pad(g), pad(beta)
    rule = gated_delta_rule if layer.kind == "gdn" else kda_rule
    state = state0.transpose(-1, -2)  # pages [HV, V, K] -> the reference's [HV, K, V]
    if not rows.per_token_pages:
        o, state = rule(qp, kp, vp, gp, bp, scale=layer.scale, initial_state=state.contiguous(),
                        output_final_state=True, use_qk_l2norm=True)
        ssm_cache.index_copy_(0, rows.pages, state.transpose(-1, -2).to(ssm_cache.dtype))
    else:  # draft verification: the state after token t goes to page t (the recurrence's time loop)
        outs = []
        for t in range(t_max):
            o_t, state = rule(qp[:, t : t + 1], kp[:, t : t + 1], vp[:, t : t + 1], gp[:, t : t + 1], bp[:, t : t + 1],
                              scale=layer.scale, initial_state=state.contiguous(), output_final_state=True,
                              use_qk_l2norm=True)
            page = torch.where(t < rows.lens, rows.pages[:, t], NULL_BLOCK_ID)
            ssm_cache.index_copy_(0, page, state.transpose(-1, -2).to(ssm_cache.dtype))
            outs.append(o_t)
        o = torch.cat(outs, dim=1) if outs else vp
    return o[row, offset]


def _recurrence_fla(layer, rows: RowGroup, q, k, v, g, beta, state0, ssm_cache) -> torch.Tensor:
    """CUDA: vLLM's bundled fla Triton kernels on the flat tokens (`cu_seqlens`), pages in place.

    The decode and draft-verification kernels equal the CPU path under Triton's interpreter
    (tests/test_serving_fla_path.py); the chunked prefill kernels run only on a GPU."""
    from vllm.third_party.flash_linear_attention.ops import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
    from vllm.third_party.flash_linear_attention.ops.kda import chunk_kda, fused_recurrent_kda_fwd

    cu = torch.zeros(rows.lens.shape[0] + 1, dtype=torch.int32, device=q.device)
    torch.cumsum(rows.lens, 0, out=cu[1:])
    q, k, v, g, beta = (t.unsqueeze(0).contiguous() for t in (q, k, v, g, beta))
    if rows.decode or rows.per_token_pages:  # fused recurrent kernel, states read and written in place
        indices = rows.pages.to(torch.int32)
        # drafts: the kernel starts from page accepted-1 and writes page t after token t
        accepted = rows.accepted.to(torch.int32) if rows.accepted is not None else None
        if layer.kind == "gdn":
            o, _ = fused_recurrent_gated_delta_rule(q, k, v, g, beta, scale=layer.scale, initial_state=ssm_cache,
                                                    inplace_final_state=True, cu_seqlens=cu,
                                                    ssm_state_indices=indices, num_accepted_tokens=accepted,
                                                    use_qk_l2norm_in_kernel=True)
        else:
            o, _ = fused_recurrent_kda_fwd(q, k, v, g, beta, scale=layer.scale, initial_state=ssm_cache,
                                           inplace_final_state=True, cu_seqlens=cu, ssm_state_indices=indices,
                                           num_accepted_tokens=accepted, use_qk_l2norm_in_kernel=True)
        return o[0]
    if layer.hv != layer.h:  # GVA: the chunk kernels take one q/k head per value head
        q, k = (t.repeat_interleave(layer.hv // layer.h, dim=2) for t in (q, k))
    chunk = chunk_gated_delta_rule if layer.kind == "gdn" else chunk_kda
    o, final = chunk(q, k, v, g, beta, scale=layer.scale, initial_state=state0.contiguous(), output_final_state=True,
                     cu_seqlens=cu, use_qk_l2norm_in_kernel=True)
    ssm_cache.index_copy_(0, rows.pages, final.to(ssm_cache.dtype))
    return o[0]


# --------------------------------------------------------------------------------------------
# the custom op


def supernet_linear_core(raw: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, out: torch.Tensor,
                         layer_name: LayerNameType) -> None:
    """Conv + recurrence of one GDN/KDA layer for the whole step (writes `out` and the pages)."""
    layer = get_forward_context().no_compile_layers[_resolve_layer_name(layer_name)]
    layer.core(raw, g, beta, out)


def _supernet_linear_core_fake(raw, g, beta, out, layer_name) -> None:
    return None


direct_register_custom_op(
    op_name="supernet_linear_core",
    op_func=supernet_linear_core,
    mutates_args=["out"],
    fake_impl=_supernet_linear_core_fake,
)
