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
the metadata), all draft-verifying rows. In switchable mode the op gets only the tokens of the
rows whose preset uses the mixer, and the groups address them in that compact layout. Pages are
read with `index_select` and written with `index_copy_` by slot (a page-0 write for rows vLLM
padded: page 0 is vLLM's null block). The
convolution gathers each token's window from the flat tokens and the gathered tails (no padding,
no host read); the recurrence runs on CUDA through vLLM's bundled fla Triton kernels (chunked for
prefills with `cu_seqlens`, fused recurrent for decodes and draft verification with
`ssm_state_indices` / `num_accepted_tokens`, states updated in place) and on the CPU through our
torch delta rule over the rows padded to the longest one (the CPU reads that length from the
CPU-resident `query_start_loc`: no device synchronisation); one-token decodes on the CPU take
one recurrence step on the pages' own [HV, V, K] layout, in place in a workspace shared by all
layers (`_decode_rows_torch`). Draft verification loops over the k+1 time steps of the
recurrence, batched over rows.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from vllm.config import get_current_vllm_config
from vllm.forward_context import get_forward_context
from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
from vllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from vllm.model_executor.layers.mamba.abstract import MambaBase
from vllm.utils.torch_utils import LayerNameType, _encode_layer_name, _resolve_layer_name, direct_register_custom_op
from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum
from vllm.v1.attention.backends.utils import NULL_BLOCK_ID

from supernet.mixers.registry import FLOAT32, MODEL_DTYPE, LinearSpec, spec
from supernet.ops.delta_rule import decode_step_vk, gated_delta_rule, kda_rule, l2_normalize
from supernet.ops.gated_norm import gated_rms_norm
from supernet.ops.short_conv import causal_conv1d_silu
from supernet.serving.plan import linear_rank_dims

CORE_OP = "vllm::supernet_linear_core"


def linear_mixer_dims(config, kind: str, tp_size: int = 1) -> dict[str, int]:
    """Head counts and sizes of a GDN or KDA mixer on one of `tp_size` ranks (`plan.linear_rank_dims`)."""
    return linear_rank_dims(config, kind, tp_size)


def linear_state_shapes(config, kind: str, tp_size: int = 1) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(conv tail [C, W-1], recurrent matrix [HV, V, K]) of one rank's state page: the registry's
    state (`conv_q`/`conv_k`/`conv_v` tails concatenated, the [HV, K, V] matrix transposed to vLLM's
    layout), for the rank's share of the heads."""
    d = linear_mixer_dims(config, kind, tp_size)
    return (d["C"], d["W"] - 1), (d["HV"], d["V"], d["K"])


def linear_state_dtypes(model_dtype: torch.dtype, config, kind: str) -> tuple[torch.dtype, torch.dtype]:
    """(conv tail, recurrent matrix) dtypes of a state page, as the registry keeps the state: each
    tensor in the model dtype or in float32 (the page's conv tail is the registry's conv tails)."""
    states = spec(kind).state_shapes(config, 1, 1)
    as_torch = {MODEL_DTYPE: model_dtype, FLOAT32: torch.float32}
    conv = {as_torch[states[name].dtype] for name in states if name.startswith("conv_")}
    if len(conv) != 1:
        raise ValueError(f"{kind}: the conv tails of one state page must share a dtype")
    return conv.pop(), as_torch[states["recurrent"].dtype]


class SupernetLinearAttention(nn.Module, MambaBase):
    """One GDN or KDA mixer (`kind`), reading and writing its state in vLLM's cache pages.

    Everything about the mixer's tensors comes from its registry spec: the projections that read
    the hidden state are merged into one column-parallel GEMM (`in_proj`, q/k/v first) plus, for
    the low-rank factors all heads share, one replicated GEMM (`shared_proj`); the q/k/v
    convolutions are one depthwise conv over the concatenated channels. With tensor parallelism
    (as vLLM's Qwen3-Next and Kimi-Linear layers) each rank holds a contiguous share of the q/k
    and value heads: its rows of every head-indexed tensor, its share of the state pages, and
    `o_proj` is row-parallel (one all-reduce per layer). A value head's q/k head (GVA: value head
    j reads q/k head j // (HV/H)) lands on the same rank because both split contiguously.
    """

    # set by SupernetModel in switchable mode: restricts the op to the rows of this step whose
    # preset uses this mixer (None = every row)
    row_filter: "RowFilter | None" = None

    @classmethod
    def from_spec(cls, config, mixer_spec: LinearSpec, vllm_config, prefix: str, layer_idx: int = 0):
        return cls(config, mixer_spec.name, prefix)

    def __init__(self, config, kind: str, prefix: str) -> None:
        super().__init__()
        self.kind = kind
        self.prefix = prefix
        self.spec = spec(kind)
        self.tp_size = get_tensor_model_parallel_world_size()
        self.tp_rank = get_tensor_model_parallel_rank()
        dims = linear_mixer_dims(config, kind, self.tp_size)  # this rank's heads
        self.h, self.hv, self.k_dim, self.v_dim, self.width = dims["H"], dims["HV"], dims["K"], dims["V"], dims["W"]
        self.conv_dim = dims["C"]
        self.scale = self.k_dim**-0.5
        self.norm_eps = config.linear_norm_eps
        self.per_channel_decay = self.spec.decay == "channel"
        self.gate_activation = self.spec.gate
        shapes = self.spec.parameter_shapes(config)
        d = config.hidden_size
        names = self.spec.hidden_projections
        if names[:3] != ("q_proj", "k_proj", "v_proj"):
            raise ValueError(f"{kind}: hidden_projections must start with q_proj, k_proj, v_proj (the conv input)")
        # per-rank output sizes of the merged GEMMs, from the registry's shapes
        self.sections = {n: shapes[f"{n}.weight"][0] // self.tp_size for n in names
                         if self.spec.head_axis(f"{n}.weight") is not None}
        self.shared_sections = {n: shapes[f"{n}.weight"][0] for n in names if self.spec.head_axis(f"{n}.weight") is None}
        self.in_proj = MergedColumnParallelLinear(d, [s * self.tp_size for s in self.sections.values()], bias=False,
                                                  return_bias=False, prefix=f"{prefix}.in_proj")
        self.shared_proj = (ReplicatedLinear(d, sum(self.shared_sections.values()), bias=False, return_bias=False,
                                             prefix=f"{prefix}.shared_proj") if self.shared_sections else None)
        # low-rank second factors (KDA): their outputs run over heads, so column-parallel
        self.up_projs = nn.ModuleDict({
            name.removesuffix(".weight"): ColumnParallelLinear(
                shape[1], shape[0], bias=False, gather_output=False, return_bias=False,
                prefix=f"{prefix}.{name.removesuffix('.weight')}")
            for name, shape in shapes.items()
            if name.endswith("_proj.weight") and name.removesuffix(".weight") not in names and name != "o_proj.weight"
        })
        self.dt_bias = nn.Parameter(torch.zeros(shapes["dt_bias"][0] // self.tp_size), requires_grad=False)
        self.conv_weight = nn.Parameter(torch.zeros(self.conv_dim, self.width), requires_grad=False)
        self.A_log = nn.Parameter(torch.zeros(self.hv), requires_grad=False)
        self.o_norm_weight = nn.Parameter(torch.ones(self.v_dim), requires_grad=False)
        self.o_proj = RowParallelLinear(shapes["o_proj.weight"][1], d, bias=False, input_is_parallel=True,
                                        reduce_results=True, return_bias=False, prefix=f"{prefix}.o_proj")
        # the q, k, v convolutions (the registry's order) stacked into conv_weight, this rank's rows
        self._conv_offsets, offset = {}, 0
        for name in (n for n in shapes if n.endswith("_conv1d.weight")):
            self._conv_offsets[name] = offset
            offset += shapes[name][0] // self.tp_size
        if offset != self.conv_dim:
            raise ValueError(f"{kind}: the registry's convolutions hold {offset} channels per rank, not {self.conv_dim}")

        vllm_config = get_current_vllm_config()
        self.model_dtype = vllm_config.model_config.dtype
        self.state_dtypes = linear_state_dtypes(self.model_dtype, config, kind)
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
        return self.state_dtypes

    # -- checkpoint loading --------------------------------------------------------------------
    def _rank_share(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's slice of checkpoint tensor `name`: its heads along the registry's head axis."""
        axis = self.spec.head_axis(name)
        if axis is None or self.tp_size == 1:
            return tensor
        size = tensor.shape[axis] // self.tp_size
        return tensor.narrow(axis, self.tp_rank * size, size)

    def load_checkpoint_tensor(self, name: str, tensor: torch.Tensor) -> str | None:
        """Copy one checkpoint tensor (name relative to `mixers.<kind>.`, full size) into place,
        keeping this rank's share of it.

        Returns the name of the parameter it went to, or None if the name is unknown."""
        proj = name.removesuffix(".weight")
        local = self._rank_share(name, tensor)
        for target, sections in (("in_proj", self.sections), ("shared_proj", self.shared_sections)):
            if proj in sections and name.endswith(".weight"):
                offset = 0
                for key, size in sections.items():
                    if key == proj:
                        break
                    offset += size
                self.get_parameter(f"{target}.weight").data[offset : offset + sections[proj]].copy_(local)
                return f"{target}.weight"
        if name in self._conv_offsets:
            start = self._conv_offsets[name]
            self.conv_weight.data[start : start + local.shape[0]].copy_(local.reshape(local.shape[0], -1))
            return "conv_weight"
        simple = {"A_log": "A_log", "dt_bias": "dt_bias", "o_norm.weight": "o_norm_weight",
                  "o_proj.weight": "o_proj.weight"}
        simple.update({f"{k}.weight": f"up_projs.{k}.weight" for k in self.up_projs})
        if name in simple:
            param = self.get_parameter(simple[name])
            param.data.copy_(local.reshape(param.shape))
            return simple[name]
        return None

    def _decay_and_beta(self, parts: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Log decay g ([N, HV] per head, [N, H, K] per key channel) and beta [N, HV], in float32."""
        beta = torch.sigmoid(parts["b_proj"].float())
        if not self.per_channel_decay:
            g = -self.A_log.float().exp() * F.softplus(parts["a_proj"].float() + self.dt_bias.float())
        else:
            f = self.up_projs["f_b_proj"](parts["f_a_proj"]).float().view(-1, self.h, self.k_dim)
            g = -self.A_log.float().exp()[:, None] * F.softplus(f + self.dt_bias.float().view(self.h, self.k_dim))
        return g, beta

    def _project(self, hidden_states: torch.Tensor):
        """Conv input [N, C], log decay, beta, output-gate pre-activation and its activation."""
        proj = self.in_proj(hidden_states)
        parts = dict(zip(self.sections, proj.split(list(self.sections.values()), dim=-1)))
        if self.shared_proj is not None:
            shared = self.shared_proj(hidden_states)
            parts.update(zip(self.shared_sections, shared.split(list(self.shared_sections.values()), dim=-1)))
        g, beta = self._decay_and_beta(parts)
        gate = parts["g_proj"] if "g_proj" in parts else self.up_projs["g_b_proj"](parts["g_a_proj"])
        return proj[:, : self.conv_dim], g, beta, gate, self.gate_activation

    def _readout(self, o: torch.Tensor, gate: torch.Tensor, activation: str) -> torch.Tensor:
        n = o.shape[0]
        out = gated_rms_norm(o, gate.reshape(n, self.hv, self.v_dim), self.o_norm_weight, self.norm_eps, activation)
        return self.o_proj(out.reshape(n, -1))

    # -- forward -------------------------------------------------------------------------------
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        raw, g, beta, gate, activation = self._project(hidden_states)
        o = hidden_states.new_zeros(hidden_states.shape[0], self.hv, self.v_dim)
        torch.ops.vllm.supernet_linear_core(raw, g, beta, o, _encode_layer_name(self.prefix))
        return self._readout(o, gate, activation)

    def forward_rows(self, hidden_states: torch.Tensor, tokens: torch.Tensor, row_filter: "RowFilter") -> torch.Tensor:
        """Switchable mode: run only the `tokens` ([M] flat indices, ascending) of the request rows
        `row_filter` keeps; returns [M, D]. Projections, op and readout all work on those M tokens
        alone (the op lays its rows out compactly, `step_row_groups`); only the kept rows' pages
        are read and written."""
        raw, g, beta, gate, activation = self._project(hidden_states.index_select(0, tokens))
        o = raw.new_zeros(raw.shape[0], self.hv, self.v_dim)
        self.row_filter = row_filter
        try:
            torch.ops.vllm.supernet_linear_core(raw, g, beta, o, _encode_layer_name(self.prefix))
        finally:
            self.row_filter = None
        return self._readout(o, gate, activation)

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
        rule = kda_rule if self.per_channel_decay else gated_delta_rule
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
    """Switchable mode: the request rows of this step (persistent-batch order, the rows of
    `query_start_loc`) whose preset runs this mixer, and every row's token count, both on the CPU.
    The op's tensors then hold only the kept rows' tokens, in step order."""

    keep: torch.Tensor  # [R] bool
    row_lens: torch.Tensor  # [R] long


def _rows_of(keep: torch.Tensor, first: int, count: int, device) -> tuple[torch.Tensor, int]:
    """Indices (relative to `first`, on `device`) of the kept rows among rows first .. first+count-1,
    and how many there are (from the CPU mask: no device read)."""
    sel = torch.nonzero(keep[first : first + count], as_tuple=False).flatten()
    return sel.to(device), int(sel.shape[0])


def step_row_groups(meta, row_filter: RowFilter | None = None) -> list[RowGroup]:
    """The batched calls of one step from vLLM's `GDNAttentionMetadata`: all plain decodes, all
    prefills (varlen), all draft-verifying rows. At most three groups, whatever the batch size.

    With a `row_filter` only the kept rows form groups, and their tokens are addressed in the
    compact layout of the kept rows' tokens (kept decodes first, as vLLM orders rows)."""
    if meta.spec_sequence_masks is None:
        if row_filter is not None:
            return _kept_row_groups(meta, row_filter)
        groups: list[RowGroup] = []
        qsl = meta.non_spec_query_start_loc.long()
        slots = meta.non_spec_state_indices_tensor.long()
        nd, np_ = meta.num_decodes, meta.num_prefills
        if nd:
            starts, pages = qsl[:nd], slots[:nd]
            groups.append(RowGroup(starts, torch.ones_like(starts), nd, pages, pages, None, 1, decode=True))
        if np_:
            starts = qsl[nd : nd + np_]
            groups.append(RowGroup(starts, qsl[nd + 1 : nd + np_ + 1] - starts, meta.num_prefill_tokens,
                                   slots[nd : nd + np_], slots[nd : nd + np_], meta.has_initial_state[nd : nd + np_], None))
        return groups
    if row_filter is not None:
        raise RuntimeError("switchable serving does not run with speculative decoding")
    groups = []
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


def _kept_row_groups(meta, row_filter: RowFilter) -> list[RowGroup]:
    """`step_row_groups` for the rows `row_filter` keeps (a plain step), in the compact layout:
    the kept decodes' tokens are 0 .. n-1, the kept prefills' follow in row order. Token counts
    come from the filter's CPU row lengths, so nothing is read back from the device."""
    groups: list[RowGroup] = []
    keep, row_lens = row_filter.keep, row_filter.row_lens
    slots = meta.non_spec_state_indices_tensor.long()
    nd, np_ = meta.num_decodes, meta.num_prefills
    device = slots.device
    kept_decodes = 0
    if nd:
        sel, kept_decodes = _rows_of(keep, 0, nd, device)
        if kept_decodes:
            pages = slots[:nd].index_select(0, sel)
            starts = torch.arange(kept_decodes, device=device)
            groups.append(RowGroup(starts, torch.ones_like(starts), kept_decodes, pages, pages, None, 1, decode=True))
    if np_:
        sel, kept = _rows_of(keep, nd, np_, device)
        if kept:
            host_lens = row_lens[nd : nd + np_][keep[nd : nd + np_]]
            lens = host_lens.to(device)
            starts = kept_decodes + torch.cumsum(lens, 0) - lens
            pages = slots[nd : nd + np_].index_select(0, sel)
            has_init = meta.has_initial_state[nd : nd + np_].index_select(0, sel.to(meta.has_initial_state.device))
            groups.append(RowGroup(starts, lens, int(host_lens.sum()), pages, pages, has_init, None))
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
    if rows.decode and not raw.is_cuda:
        _decode_rows_torch(layer, rows, raw, g, beta, out, conv_cache, ssm_cache)
        return
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


def _decode_rows_torch(layer, rows: RowGroup, raw, g, beta, out, conv_cache, ssm_cache) -> None:
    """CPU, one token per row (the step most served tokens take): the conv as one dot product per
    channel over [tail, token] and the recurrence as one step on the pages' own [HV, V, K] layout
    (`decode_step_vk`). A handful of batched ops whatever the batch: in switchable mode a layer
    runs once per mixer its presets use, so what one call costs beyond its rows' work is paid
    again for every mixer of the layer."""
    token, pages = rows.starts, rows.pages
    # the window time-major, [B, W, C]: the concatenation and the reduction over W then run over
    # contiguous channels (measured 56 against 157 us channel-major at 8 rows of 1728 channels)
    tail = conv_cache.index_select(0, pages).transpose(1, 2)
    window = torch.cat([tail, raw.index_select(0, token).unsqueeze(1).to(tail.dtype)], dim=1)
    conv_cache.index_copy_(0, pages, window[:, 1:].transpose(1, 2))
    x = F.silu((window * layer.conv_weight.t().to(window.dtype)).sum(1)).to(raw.dtype)
    q, k, v = layer._split_qkv(x)
    state, scratch = _decode_workspace(ssm_cache, pages.shape[0])
    if ssm_cache.dtype == torch.float32:
        torch.index_select(ssm_cache, 0, pages, out=state)
    else:
        state.copy_(ssm_cache.index_select(0, pages))
    o = decode_step_vk(l2_normalize(q), l2_normalize(k), v, g.index_select(0, token), beta.index_select(0, token),
                       state, layer.scale, scratch)
    ssm_cache.index_copy_(0, pages, state.to(ssm_cache.dtype))
    out.index_copy_(0, token, o.to(out.dtype))


# (page shape, device) -> two float32 buffers of `rows` pages: the gathered states and the products
# of their reads. One pair serves every layer (layers run one after another), grown to the largest
# decode batch seen: at most 2 x max_num_seqs pages per page shape, instead of a fresh allocation
# of that size per layer and step.
_DECODE_WORKSPACES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _decode_workspace(ssm_cache: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    key = (tuple(ssm_cache.shape[1:]), ssm_cache.device)
    buffers = _DECODE_WORKSPACES.get(key)
    if buffers is None or buffers[0].shape[0] < rows:
        shape = (rows, *ssm_cache.shape[1:])
        buffers = _DECODE_WORKSPACES[key] = (torch.empty(shape, dtype=torch.float32, device=ssm_cache.device),
                                             torch.empty(shape, dtype=torch.float32, device=ssm_cache.device))
    return buffers[0][:rows], buffers[1][:rows]


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
    rule = kda_rule if layer.per_channel_decay else gated_delta_rule
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
        if not layer.per_channel_decay:
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
    chunk = chunk_kda if layer.per_channel_decay else chunk_gated_delta_rule
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
