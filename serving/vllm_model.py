"""`SupernetForCausalLM` for vLLM, built from vLLM's own layers.

FA and SWA are vLLM `Attention` layers (paged KV cache, `per_layer_sliding_window` for SWA; vLLM
frees blocks that fall out of the window), the MLP and projections are vLLM's (tensor-parallel)
linear layers, GDN and KDA are `SupernetLinearAttention` (`MambaBase`: vLLM owns their state
pages). Checkpoints load as saved by `supernet` (names in the spec); q/k/v and gate/up are merged
on load.

Only the mixers of the served placement(s) exist (`serving.plan`): a server for one preset
allocates KV cache for its attention layers only, and the model carries `@support_torch_compile`
(vLLM compiles it and captures CUDA graphs; the GDN/KDA core is a custom op, see
`linear_layers`). In switchable mode a layer holds every mixer that some served preset uses
there; the route of every token is computed once per step (`routing.StepRoute`) and each mixer
runs only over the tokens whose preset uses it (gather, run, scatter back). Switchable mode runs
eagerly: its gathers have data-dependent sizes.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable

import torch
from torch import nn
from vllm import _custom_ops as cpu_ops
from vllm import envs as vllm_envs
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.activation import GeluAndMul, SiluAndMul
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.interfaces import IsHybrid
from vllm.sequence import IntermediateTensors
try:  # vLLM's CPU backend: switchable FA/SWA attend over their rows only (SupernetAttention.forward_rows)
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionMetadata
except ImportError:  # pragma: no cover - a build without it
    CPUAttentionMetadata = ()
from vllm.v1.kv_cache_interface import MambaSpec

from supernet.serving import routing
from supernet.serving.linear_layers import RowFilter, SupernetLinearAttention, linear_state_dtypes, linear_state_shapes
from supernet.serving.plan import FULL_LAYOUT_ENV, LINEAR_MIXERS, serving_plan
from supernet.mixers import mixer_class, spec


def rope_parameters(config, sliding: bool = False) -> dict:
    """vLLM's `rope_parameters` for our config (default, linear or llama3 scaling, as the reference);
    `sliding`: the RoPE of the teacher's sliding layers (Gemma 3's local base)."""
    theta = config.sliding_rope_theta if sliding else config.rope_theta
    params = {"rope_type": "default", "rope_theta": theta}
    scaling = dict((config.sliding_rope_scaling if sliding else config.rope_scaling) or {})
    kind = scaling.pop("rope_type", scaling.pop("type", "default"))
    if kind not in (None, "default"):
        params.update(scaling)
        params["rope_type"] = kind
    return params


class SupernetAttention(nn.Module):
    """FA (`window=None`) or SWA: the teacher's attention on vLLM's paged KV cache.

    As the reference mixer (supernet/mixers/attention.py): q/k RMSNorm before RoPE per head or over
    the whole projection (`config.qk_norm`), score scale from `query_pre_attn_scalar` when set, and
    the RoPE of the layer's kind (`config.uses_sliding_rope`).
    """

    @classmethod
    def from_spec(cls, config, mixer_spec, vllm_config: VllmConfig, prefix: str, layer_idx: int = 0):
        return cls(config, mixer_spec.window(config), vllm_config, prefix, layer_idx)

    def __init__(self, config, window: int | None, vllm_config: VllmConfig, prefix: str, layer_idx: int = 0) -> None:
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        self.qk_norm = getattr(config, "qk_norm", "none")
        if self.qk_norm == "whole" and tp > 1:
            raise ValueError("q/k norms over the whole projection (OLMo 2) are not supported with tensor parallelism")
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads // tp
        self.num_kv_heads = max(1, config.num_key_value_heads // tp)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size, self.head_dim, config.num_attention_heads, config.num_key_value_heads,
            bias=config.attention_bias, quant_config=vllm_config.quant_config, prefix=f"{prefix}.qkv_proj",
        )
        self.o_proj = RowParallelLinear(
            config.num_attention_heads * self.head_dim, config.hidden_size, bias=config.attention_bias,
            quant_config=vllm_config.quant_config, prefix=f"{prefix}.o_proj",
        )
        self.rotary_emb = get_rope(
            self.head_dim, max_position=config.max_position_embeddings, is_neox_style=True,
            rope_parameters=rope_parameters(config, sliding=config.uses_sliding_rope(layer_idx)),
        )
        if self.qk_norm != "none":
            whole = self.qk_norm == "whole"
            self.q_norm = RMSNorm(self.q_size if whole else self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = RMSNorm(self.kv_size if whole else self.head_dim, eps=config.rms_norm_eps)
        scale = (getattr(config, "query_pre_attn_scalar", None) or self.head_dim) ** -0.5
        self.attn = Attention(
            self.num_heads, self.head_dim, scale, num_kv_heads=self.num_kv_heads,
            cache_config=vllm_config.cache_config, quant_config=vllm_config.quant_config,
            per_layer_sliding_window=window, prefix=f"{prefix}.attn",
        )
        self.full_layout = os.environ.get(FULL_LAYOUT_ENV) == "full-layout"

    def _qkv(self, positions: torch.Tensor, hidden_states: torch.Tensor):
        """Projections, the family's q/k norms and RoPE: q, k, v for these tokens."""
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.qk_norm == "whole":
            q, k = self.q_norm(q.contiguous()), self.k_norm(k.contiguous())
        elif self.qk_norm == "per_head":
            q = self.q_norm(q.reshape(-1, self.num_heads, self.head_dim)).reshape(q.shape)
            k = self.k_norm(k.reshape(-1, self.num_kv_heads, self.head_dim)).reshape(k.shape)
        q, k = self.rotary_emb(positions, q, k)
        return q, k, v

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        out, _ = self.o_proj(self.attn(*self._qkv(positions, hidden_states)))
        return out

    def forward_rows(self, positions: torch.Tensor, hidden_states: torch.Tensor, sel: "routing.Selection") -> torch.Tensor:
        """Switchable mode: this layer for the tokens of `sel` only (returns [M, D]).

        On vLLM's CPU backend the attention kernel runs over `sel`'s rows alone: its metadata
        restricted to them (`rows_metadata`, built once per step per metadata and row subset),
        swapped into the forward context for the call. The other rows neither attend nor write
        this layer's KV pages: a request's preset is fixed for its life, so no later step of
        theirs reads those pages. Elsewhere (or with SUPERNET_SWITCHABLE_ATTENTION=full-layout)
        the kernel runs over the step's whole layout, the other rows with zero q/k/v."""
        tokens = sel.tokens
        q, k, v = self._qkv(positions.index_select(0, tokens), hidden_states.index_select(0, tokens))
        context = get_forward_context()
        swap = None if self.full_layout else _rows_attention(context, self.attn, sel)
        if swap is None:
            n = hidden_states.shape[0]
            full = [t.new_zeros(n, t.shape[1]).index_copy_(0, tokens, t) for t in (q, k, v)]
            out, _ = self.o_proj(self.attn(*full).index_select(0, tokens))
            return out
        name = self.attn.layer_name
        saved = context.attn_metadata[name], context.slot_mapping[name]
        context.attn_metadata[name], context.slot_mapping[name] = swap
        try:
            attended = self.attn(q, k, v)
        finally:
            context.attn_metadata[name], context.slot_mapping[name] = saved
        out, _ = self.o_proj(attended)
        return out


def rows_metadata(meta: CPUAttentionMetadata, layer: Attention, sel: "routing.Selection") -> CPUAttentionMetadata:
    """`meta` (one step of vLLM's CPU attention) restricted to the rows of `sel`: their query
    layout, sequence lengths, block-table rows and slots, and the kernel's work plan for them
    (as vLLM's builder makes it, for this layer's heads and window)."""
    lens = sel.query_lens
    qsl = torch.zeros(lens.shape[0] + 1, dtype=meta.query_start_loc.dtype)
    qsl[1:] = lens.cumsum(0)
    row_ids = sel.row_ids.to(meta.seq_lens.device)
    seq_lens = meta.seq_lens.index_select(0, row_ids)
    plan = cpu_ops.cpu_attn_get_scheduler_metadata(
        num_reqs=lens.shape[0], num_heads=layer.num_heads, num_kv_heads=layer.num_kv_heads,
        head_dim=layer.head_size, seq_lens=seq_lens, dtype=layer.dtype, query_start_loc=qsl,
        causal=meta.causal, sliding_window_size=layer.impl.sliding_window, isa=layer.isa,
        enable_kv_split=vllm_envs.VLLM_CPU_ATTN_SPLIT_KV, kv_cache_dtype=layer.kv_cache_dtype,
    )
    return dataclasses.replace(
        meta, num_actual_tokens=int(sel.tokens.shape[0]), max_query_len=int(lens.max()), query_start_loc=qsl,
        max_seq_len=int(seq_lens.max()), seq_lens=seq_lens, block_table=meta.block_table.index_select(0, row_ids),
        slot_mapping=meta.slot_mapping.index_select(0, sel.tokens), scheduler_metadata=plan,
    )


def _rows_attention(context, layer: Attention, sel: "routing.Selection"):
    """(metadata, slot mapping) of `layer` for `sel`'s rows, cached on `sel` per metadata object
    (layers of one KV-cache group share theirs); None where only the whole layout runs."""
    metas, slots = context.attn_metadata, getattr(context, "slot_mapping", None)
    name = layer.layer_name
    if not isinstance(metas, dict) or not isinstance(slots, dict) or sel.row_ids is None:
        return None
    meta, slot = metas.get(name), slots.get(name)
    if (not isinstance(meta, CPUAttentionMetadata) or slot is None or meta.dynamic_causal is not None
            or meta.encoder_cache is not None or meta.use_sdpa_prefill or sel.row_ids.shape[0] == 0):
        return None
    key = (id(meta), id(slot))
    swap = sel.derived.get(key)
    if swap is None:
        swap = sel.derived[key] = (rows_metadata(meta, layer, sel), slot.index_select(0, sel.tokens))
    return swap


class SupernetMLP(nn.Module):
    def __init__(self, config, vllm_config: VllmConfig, prefix: str) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size, [config.intermediate_size] * 2, bias=config.mlp_bias,
            quant_config=vllm_config.quant_config, prefix=f"{prefix}.gate_up_proj",
        )
        self.down_proj = RowParallelLinear(
            config.intermediate_size, config.hidden_size, bias=config.mlp_bias,
            quant_config=vllm_config.quant_config, prefix=f"{prefix}.down_proj",
        )
        gelu = config.hidden_act in ("gelu_pytorch_tanh", "gelu_tanh")
        self.act_fn = GeluAndMul(approximate="tanh") if gelu else SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self.gate_up_proj(x)
        x, _ = self.down_proj(self.act_fn(x))
        return x


def build_mixer(config, name: str, vllm_config: VllmConfig, prefix: str, layer_idx: int = 0) -> nn.Module:
    """The serving layer the registry names for mixer `name` (its `vllm_layer`), built from its spec."""
    mixer_spec = spec(name)
    return mixer_spec.vllm_layer_class().from_spec(config, mixer_spec, vllm_config, prefix, layer_idx)


class SupernetDecoderLayer(nn.Module):
    """Shared norms and MLP; `mixers` holds the mixers this server needs at this layer.

    Norm layouts as the reference layer (supernet/layer.py): "pre" (Llama), "sandwich" (Gemma 3:
    also a norm on the mixer's and the MLP's output) and "post" (OLMo 2: only those two). The layer
    returns (branch output, residual stream); the next layer (or the final norm) adds them.
    """

    def __init__(self, config, layer_idx: int, mixers: tuple[str, ...], vllm_config: VllmConfig, prefix: str) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.norm_layout = getattr(config, "norm_layout", "pre")
        d, eps = config.hidden_size, config.rms_norm_eps
        if self.norm_layout != "post":
            self.input_layernorm = RMSNorm(d, eps=eps)
        self.post_attention_layernorm = RMSNorm(d, eps=eps)
        if self.norm_layout == "sandwich":
            self.pre_feedforward_layernorm = RMSNorm(d, eps=eps)
        if self.norm_layout in ("sandwich", "post"):
            self.post_feedforward_layernorm = RMSNorm(d, eps=eps)
        self.mlp = SupernetMLP(config, vllm_config, f"{prefix}.mlp")
        self.mixers = nn.ModuleDict(
            {m: build_mixer(config, m, vllm_config, f"{prefix}.mixers.{m}", layer_idx) for m in mixers}
        )

    def run_mixer(self, name: str, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        mixer = self.mixers[name]
        return mixer(positions, x) if isinstance(mixer, SupernetAttention) else mixer(x)

    def run_mixer_rows(self, name: str, positions: torch.Tensor, x: torch.Tensor, sel: "routing.Selection") -> torch.Tensor:
        mixer = self.mixers[name]
        if isinstance(mixer, SupernetAttention):
            return mixer.forward_rows(positions, x, sel)
        return mixer.forward_rows(x, sel.tokens, RowFilter(sel.rows, sel.row_lens))

    def mix(self, positions, x, route: "routing.StepRoute | None") -> torch.Tensor:
        if len(self.mixers) == 1:
            return self.run_mixer(next(iter(self.mixers)), positions, x)
        if route is None:  # profile / warm-up run: exercise every mixer, keep the first
            outs = [self.run_mixer(name, positions, x) for name in self.mixers]
            return outs[0]
        out = None
        for name, sel in route.layer_plan(self.layer_idx):
            if sel is None:  # every request of the step uses this mixer here
                return self.run_mixer(name, positions, x)
            if out is None:
                out = torch.zeros_like(x)
            out.index_copy_(0, sel.tokens, self.run_mixer_rows(name, positions, x, sel))
        return out

    def forward(self, positions, hidden_states, residual, route: "routing.StepRoute | None"):
        if self.norm_layout == "post":
            residual = hidden_states if residual is None else hidden_states + residual
            x = residual
        elif residual is None:
            residual = hidden_states
            x = self.input_layernorm(hidden_states)
        else:
            x, residual = self.input_layernorm(hidden_states, residual)
        out = self.mix(positions, x, route)
        if self.norm_layout == "post":
            residual = residual + self.post_attention_layernorm(out)
            return self.post_feedforward_layernorm(self.mlp(residual)), residual
        if self.norm_layout == "sandwich":
            x, residual = self.pre_feedforward_layernorm(self.post_attention_layernorm(out), residual)
            return self.post_feedforward_layernorm(self.mlp(x)), residual
        x, residual = self.post_attention_layernorm(out, residual)
        return self.mlp(x), residual


def _compiled(vllm_config: VllmConfig) -> bool:
    """Compile (and graph) single-preset servers; switchable ones gather data-dependent subsets."""
    return not serving_plan(vllm_config.model_config.hf_config).switchable


@support_torch_compile(
    dynamic_arg_dims={"input_ids": 0, "positions": 0, "intermediate_tensors": 0, "inputs_embeds": 0},
    enable_if=_compiled,
)
class SupernetModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.plan = serving_plan(config)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, prefix=f"{prefix}.embed_tokens")
        self.layers = nn.ModuleList(
            SupernetDecoderLayer(config, i, self.plan.layer_mixers[i], vllm_config, f"{prefix}.layers.{i}")
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        # mixers only the self-speculative drafter runs: reference modules, no vLLM cache
        self.draft_mixers = nn.ModuleDict(
            {f"{i}_{m}": mixer_class(m)(config, i) for i, names in enumerate(self.plan.draft_only) for m in names}
        )
        self.router = routing.Router(self.plan) if self.plan.switchable else None

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        scale = getattr(self.config, "embed_scale", None)
        if scale is not None:  # Gemma 3: sqrt(hidden), rounded to float32 then to the weights' dtype
            hidden = hidden * torch.tensor(scale, dtype=torch.float32).to(hidden.dtype)
        return hidden

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        hidden = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        route = self.router.route(get_forward_context(), hidden.shape[0], hidden.device) if self.router else None
        residual = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, route)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class SupernetForCausalLM(nn.Module, IsHybrid):
    """vLLM entry class; registered by `serving.plugin.register` under the checkpoint's architecture."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.vllm_config = vllm_config
        self.model = SupernetModel(vllm_config=vllm_config, prefix="model")
        if config.tie_word_embeddings:
            self.lm_head = self.model.embed_tokens
        else:
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, prefix="lm_head")
        self.logits_processor = LogitsProcessor(
            config.vocab_size, soft_cap=getattr(config, "final_logit_softcapping", None))

    @property
    def plan(self):
        return self.model.plan

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids, positions, intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds=None, **kwargs) -> torch.Tensor:
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    # -- hybrid cache description (read before the model exists) --------------------------------
    @classmethod
    def _linear_kinds(cls, vllm_config: VllmConfig) -> list[str]:
        plan = serving_plan(vllm_config.model_config.hf_config)
        return [m for m in LINEAR_MIXERS if m in plan.used_kinds()]

    @classmethod
    def get_mamba_specs_from_config(cls, vllm_config: VllmConfig) -> tuple[MambaSpec, ...]:
        """One state page per linear mixer kind served, as one tensor-parallel rank holds it."""
        config = vllm_config.model_config.hf_config
        dtype = vllm_config.model_config.dtype
        tp = vllm_config.parallel_config.tensor_parallel_size
        return tuple(
            MambaSpec(shapes=linear_state_shapes(config, kind, tp), dtypes=linear_state_dtypes(dtype, config, kind),
                      block_size=-1)
            for kind in cls._linear_kinds(vllm_config)
        )

    @classmethod
    def get_mamba_state_shape_from_config(cls, vllm_config: VllmConfig):
        specs = cls.get_mamba_specs_from_config(vllm_config)
        if not specs:
            tp = vllm_config.parallel_config.tensor_parallel_size
            return linear_state_shapes(vllm_config.model_config.hf_config, LINEAR_MIXERS[0], tp)
        return max(specs, key=lambda s: s.page_size_bytes).shapes

    @classmethod
    def get_mamba_state_dtype_from_config(cls, vllm_config: VllmConfig):
        kinds = cls._linear_kinds(vllm_config) or list(LINEAR_MIXERS)
        return linear_state_dtypes(vllm_config.model_config.dtype, vllm_config.model_config.hf_config, kinds[0])

    @classmethod
    def get_mamba_state_copy_func(cls):
        from vllm.model_executor.layers.mamba.mamba_utils import get_temporal_copy_spec

        return (get_temporal_copy_spec, get_temporal_copy_spec)

    # -- weights -----------------------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            target = self._load_one(name, tensor, params)
            if target:
                loaded.add(target)
        return loaded

    def _load_one(self, name: str, tensor: torch.Tensor, params: dict[str, nn.Parameter]) -> str | None:
        if name == "lm_head.weight" and self.config.tie_word_embeddings:
            return None
        if ".mixers." in name:
            head, rest = name.split(".mixers.", 1)
            layer_idx = int(head.rsplit(".", 1)[1])
            mixer, sub = rest.split(".", 1)
            key = f"{layer_idx}_{mixer}"
            if key in self.model.draft_mixers:
                module = self.model.draft_mixers[key]
                dict(module.named_parameters())[sub].data.copy_(tensor)
                return f"model.draft_mixers.{key}.{sub}"
            layer = self.model.layers[layer_idx]
            if mixer not in layer.mixers:
                return None  # a mixer this server does not serve
            module = layer.mixers[mixer]
            prefix = f"{head}.mixers.{mixer}"
            if isinstance(module, SupernetLinearAttention):
                param_name = module.load_checkpoint_tensor(sub, tensor)
                if param_name is None:
                    raise ValueError(f"unexpected checkpoint tensor {name}")
                return f"{prefix}.{param_name}"
            proj, kind = sub.rsplit(".", 1)
            if proj in ("q_proj", "k_proj", "v_proj"):
                target = f"{prefix}.qkv_proj.{kind}"
                param = params[target]
                param.weight_loader(param, tensor, proj[0])
                return target
            target = f"{prefix}.{sub}"
        elif ".mlp.gate_proj." in name or ".mlp.up_proj." in name:
            shard = 0 if ".gate_proj." in name else 1
            target = name.replace(".gate_proj.", ".gate_up_proj.").replace(".up_proj.", ".gate_up_proj.")
            param = params[target]
            param.weight_loader(param, tensor, shard)
            return target
        else:
            target = name
        if target not in params:
            raise ValueError(f"checkpoint tensor {name} has no place in this model")
        param = params[target]
        getattr(param, "weight_loader", default_weight_loader)(param, tensor)
        return target

