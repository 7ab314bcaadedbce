"""Teacher -> supernet: copy the shared weights, copy attention into FA/SWA, seed GDN/KDA from it.

Supported teachers: Llama, Mistral, Qwen2, Qwen3, Gemma 3 (text), Phi-3 and OLMo 2 (`FAMILIES`).
A fresh checkpoint runs the teacher's placement by default (preset `teacher`: `fa` where the
teacher attends globally, `swa` with the teacher's window where it slides), which computes exactly
the teacher's function; `all-fa` is recorded too.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from supernet.config import SupernetConfig
from supernet.model import SupernetForCausalLM
from supernet.layout import MIXERS

@dataclass(frozen=True)
class TeacherFamily:
    """How one HF decoder family differs from Llama, as far as conversion is concerned.

    `norm_offset`: the family's RMSNorms multiply by (offset + w). Gemma 3 stores w and computes
    (1 + w) in float32 on every call; conversion stores w' = 1 + w instead, so every norm of the
    supernet (and the fused CUDA kernels and vLLM's RMSNorm) stays the plain w' * x / rms(x). In
    float32 this is exact: 1 + w is the same float32 value whether added once here or per call, and
    the product that follows is the same multiplication. (Stored in bfloat16, 1 + w would round to
    8 bits near 1; `supernet convert` loads teachers in float32, so checkpoints keep the exact value.)
    """

    model_type: str
    architecture: str
    norm_layout: str = "pre"
    qk_norm: str = "none"
    norm_offset: float = 0.0
    fused_projections: bool = False  # Phi-3: qkv_proj and gate_up_proj, split at conversion
    attention_bias: bool | None = None  # None: read config.attention_bias


FAMILIES: dict[str, TeacherFamily] = {
    f.model_type: f
    for f in (
        TeacherFamily("llama", "LlamaForCausalLM"),
        TeacherFamily("mistral", "MistralForCausalLM", attention_bias=False),
        TeacherFamily("qwen2", "Qwen2ForCausalLM", attention_bias=True),
        TeacherFamily("qwen3", "Qwen3ForCausalLM", qk_norm="per_head"),
        TeacherFamily("gemma3_text", "Gemma3ForCausalLM", norm_layout="sandwich", qk_norm="per_head",
                      norm_offset=1.0, attention_bias=None),
        TeacherFamily("phi3", "Phi3ForCausalLM", fused_projections=True, attention_bias=False),
        TeacherFamily("olmo2", "Olmo2ForCausalLM", norm_layout="post", qk_norm="whole"),
    )
}
SUPPORTED_TEACHERS = tuple(FAMILIES)


def teacher_family(teacher_config: Any) -> TeacherFamily:
    """The family of an HF config, or one ValueError line naming it and the supported ones."""
    model_type = getattr(teacher_config, "model_type", None)
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    supported = ", ".join(f"{f.architecture} ({f.model_type})" for f in FAMILIES.values())
    hint = ""
    if model_type == "gemma3":
        hint = " (the multimodal Gemma 3; convert its text model, Gemma3ForCausalLM / model_type gemma3_text)"
    raise ValueError(f"teacher model_type {model_type!r}{hint} is not supported; supported: {supported}")


def _rope(params: dict) -> tuple[float, dict | None]:
    """(theta, scaling dict or None) from one HF rope_parameters dict."""
    rope = dict(params)
    theta = rope.pop("rope_theta", 10000.0)
    if rope.pop("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("teachers with partial rotary embeddings (partial_rotary_factor < 1) are not supported")
    return theta, (rope if rope.get("rope_type", "default") != "default" else None)


def _layer_types(teacher_config: Any, n: int) -> tuple[list[str], int | None]:
    """The teacher's attention kind per layer and its sliding window (None: no sliding layer)."""
    window = getattr(teacher_config, "sliding_window", None)
    types = getattr(teacher_config, "layer_types", None)
    if types is None:  # Mistral, Phi-3: a sliding window, when set, applies to every layer
        types = ["sliding_attention" if window is not None else "full_attention"] * n
    types = list(types)
    if "sliding_attention" not in types:
        window = None
    elif window is None:
        raise ValueError("teacher config has sliding layers but no sliding_window")
    return types, window


def supernet_config_from_teacher(teacher_config: Any, **overrides: Any) -> SupernetConfig:
    """Read a supported HF decoder config into a SupernetConfig; its default placement is the teacher's."""
    family = teacher_family(teacher_config)
    c = teacher_config
    if getattr(c, "use_bidirectional_attention", False):
        raise ValueError("bidirectional Gemma 3 (use_bidirectional_attention=True) is not a causal LM teacher")
    rope_params = dict(getattr(c, "rope_parameters", None) or {"rope_theta": getattr(c, "rope_theta", 10000.0)})
    sliding_theta = sliding_scaling = None
    if "full_attention" in rope_params:  # Gemma 3: one RoPE per layer kind
        rope_theta, rope_scaling = _rope(rope_params["full_attention"])
        if "sliding_attention" in rope_params:
            sliding_theta, sliding_scaling = _rope(rope_params["sliding_attention"])
    else:
        rope_theta, rope_scaling = _rope(rope_params)
    n = c.num_hidden_layers
    layer_types, window = _layer_types(c, n)
    bias = family.attention_bias if family.attention_bias is not None else getattr(c, "attention_bias", False)
    is_gemma = family.model_type == "gemma3_text"
    kwargs: dict[str, Any] = dict(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=n,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
        head_dim=getattr(c, "head_dim", None),
        hidden_act=getattr(c, "hidden_activation", None) or c.hidden_act,
        max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps,
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        attention_bias=bias,
        mlp_bias=getattr(c, "mlp_bias", False),
        tie_word_embeddings=c.tie_word_embeddings,
        bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id,
        pad_token_id=getattr(c, "pad_token_id", None),
        teacher_family=family.model_type,
        norm_layout=family.norm_layout,
        qk_norm=family.qk_norm,
        # Gemma 3 multiplies embeddings by sqrt(hidden) and scales scores by query_pre_attn_scalar;
        # its attn_logit_softcapping is not applied by transformers' Gemma 3 attention, so not by us.
        embed_scale=c.hidden_size**0.5 if is_gemma else None,
        query_pre_attn_scalar=getattr(c, "query_pre_attn_scalar", None) if is_gemma else None,
        final_logit_softcapping=getattr(c, "final_logit_softcapping", None),
        teacher_layer_types=layer_types,
        sliding_rope_theta=sliding_theta,
        sliding_rope_scaling=sliding_scaling,
    )
    if window is not None:
        kwargs["swa_window"] = window
    probe = SupernetConfig(**{**kwargs, **overrides})
    teacher = probe.teacher_placement()
    kwargs.update(placement=teacher, presets={"teacher": teacher, "all-fa": ["fa"] * n})
    kwargs.update(overrides)
    return SupernetConfig(**kwargs)


def _attention_weights(attn: nn.Module, config: SupernetConfig, fused: bool) -> dict[str, torch.Tensor]:
    """q/k/v/o weights of one teacher attention, Phi-3's fused qkv_proj split into its rows."""
    if fused:
        q_rows = config.num_attention_heads * config.head_dim
        kv_rows = config.num_key_value_heads * config.head_dim
        q, k, v = attn.qkv_proj.weight.split([q_rows, kv_rows, kv_rows], dim=0)
        return {"q_proj": q, "k_proj": k, "v_proj": v, "o_proj": attn.o_proj.weight}
    return {name: getattr(attn, name).weight for name in ("q_proj", "k_proj", "v_proj", "o_proj")}


def _fold_qk_norm(w: torch.Tensor, norm: torch.Tensor, heads: int) -> torch.Tensor:
    """Projection rows scaled by the teacher's q/k norm weight (repeated per head when per-head)."""
    scale = norm if norm.numel() == w.shape[0] else norm.repeat(heads)
    return w * scale[:, None].to(w.dtype)


@torch.no_grad()
def supernet_from_teacher(teacher: nn.Module, **overrides: Any) -> SupernetForCausalLM:
    """Build a supernet in memory from a loaded HF causal LM of a supported family."""
    family = teacher_family(teacher.config)
    config = supernet_config_from_teacher(teacher.config, **overrides)
    model = SupernetForCausalLM(config).to(next(teacher.parameters()).dtype)
    offset = family.norm_offset

    def norm(dst: nn.Module, src: nn.Module) -> None:
        dst.weight.copy_(src.weight.float() + offset if offset else src.weight)

    t = teacher.model
    model.model.embed_tokens.weight.copy_(t.embed_tokens.weight)
    norm(model.model.norm, t.norm)
    if not config.tie_word_embeddings:
        model.lm_head.weight.copy_(teacher.lm_head.weight)
    layer_norms = {
        "pre": ("input_layernorm", "post_attention_layernorm"),
        "sandwich": ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"),
        "post": ("post_attention_layernorm", "post_feedforward_layernorm"),
    }[config.norm_layout]
    shape = (config.num_attention_heads, config.num_key_value_heads, config.head_dim)
    for src, dst in zip(t.layers, model.model.layers):
        for name in layer_norms:
            norm(getattr(dst, name), getattr(src, name))
        if family.fused_projections:
            gate, up = src.mlp.gate_up_proj.weight.chunk(2, dim=0)
            dst.mlp.gate_proj.weight.copy_(gate)
            dst.mlp.up_proj.weight.copy_(up)
            dst.mlp.down_proj.weight.copy_(src.mlp.down_proj.weight)
        else:
            dst.mlp.load_state_dict(src.mlp.state_dict())
        attn = src.self_attn
        weights = _attention_weights(attn, config, family.fused_projections)
        # a projection the teacher has without bias gets a zero bias (Qwen2's o_proj)
        biases = {
            name: (getattr(attn, name).bias if getattr(getattr(attn, name, None), "bias", None) is not None
                   else torch.zeros(weights[name].shape[0]))
            for name in weights
        } if config.attention_bias else {}
        norms = {}
        if config.qk_norm != "none":
            norms = {name: getattr(attn, name).weight.float() + offset for name in ("q_norm", "k_norm")}
        qkvo = (weights["q_proj"], weights["k_proj"], weights["v_proj"], weights["o_proj"])
        for name in MIXERS:
            mixer = dst.mixers[name]
            if name in ("fa", "swa"):
                mixer.init_from_attention(*qkvo, *shape, biases=biases, norms=norms)
            elif norms:
                # GDN/KDA L2-normalise q and k per head, which removes the teacher's per-token RMS
                # division; what remains of its q/k norm is the per-channel weight, folded into the rows.
                q_w = _fold_qk_norm(qkvo[0], norms["q_norm"], config.num_attention_heads)
                k_w = _fold_qk_norm(qkvo[1], norms["k_norm"], config.num_key_value_heads)
                mixer.init_from_attention(q_w, k_w, qkvo[2], qkvo[3], *shape)
            else:
                mixer.init_from_attention(*qkvo, *shape)
    model.set_placement(config.teacher_placement())
    return model.eval()


def save_checkpoint(model: SupernetForCausalLM, out_dir: str | Path, tokenizer: Any | None = None) -> Path:
    """save_pretrained into a temporary sibling folder, then rename: never a half-written checkpoint."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if out.exists():
            backup = out.with_name(f".{out.name}.old")
            if backup.exists():
                shutil.rmtree(backup)
            os.replace(out, backup)
            os.replace(tmp, out)
            shutil.rmtree(backup)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def convert_teacher(
    teacher: str | Path, out_dir: str | Path, gguf_file: str | None = None, **overrides: Any
) -> Path:
    """`supernet convert`: teacher folder / GGUF / 'smollm2' -> supernet checkpoint folder."""
    from transformers import AutoConfig

    from supernet.teacher import load_teacher, resolve_teacher

    folder, gguf = resolve_teacher(teacher, gguf_file)
    if gguf is None:
        teacher_family(AutoConfig.from_pretrained(folder))  # refuse before loading the weights
    model, tokenizer = load_teacher(teacher, gguf_file)
    supernet = supernet_from_teacher(model, **overrides)
    return save_checkpoint(supernet, out_dir, tokenizer)
