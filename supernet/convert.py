"""Teacher -> supernet: copy the shared weights, copy attention into FA/SWA, seed GDN/KDA from it.

A fresh checkpoint runs the all-`fa` placement by default (and has a preset `all-fa`), which computes
exactly the teacher's function.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from supernet.config import SupernetConfig
from supernet.model import SupernetForCausalLM
from supernet.layout import MIXERS, Placement
from supernet.mixers.registry import spec

SUPPORTED_TEACHERS = ("llama", "mistral", "qwen2")


def supernet_config_from_teacher(teacher_config: Any, **overrides: Any) -> SupernetConfig:
    """Read a Llama-family HF config into a SupernetConfig (all-`fa` default placement)."""
    model_type = getattr(teacher_config, "model_type", None)
    if model_type not in SUPPORTED_TEACHERS:
        raise ValueError(
            f"teacher model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_TEACHERS)}"
        )
    rope = dict(getattr(teacher_config, "rope_parameters", None) or {})
    rope_theta = rope.pop("rope_theta", getattr(teacher_config, "rope_theta", 10000.0))
    rope_scaling = rope if rope.get("rope_type", "default") != "default" else None
    n = teacher_config.num_hidden_layers
    eos = teacher_config.eos_token_id
    kwargs: dict[str, Any] = dict(
        vocab_size=teacher_config.vocab_size,
        hidden_size=teacher_config.hidden_size,
        intermediate_size=teacher_config.intermediate_size,
        num_hidden_layers=n,
        num_attention_heads=teacher_config.num_attention_heads,
        num_key_value_heads=getattr(teacher_config, "num_key_value_heads", None) or teacher_config.num_attention_heads,
        head_dim=getattr(teacher_config, "head_dim", None),
        hidden_act=teacher_config.hidden_act,
        max_position_embeddings=teacher_config.max_position_embeddings,
        rms_norm_eps=teacher_config.rms_norm_eps,
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        attention_bias=getattr(teacher_config, "attention_bias", model_type == "qwen2"),
        mlp_bias=getattr(teacher_config, "mlp_bias", False),
        tie_word_embeddings=teacher_config.tie_word_embeddings,
        bos_token_id=teacher_config.bos_token_id,
        eos_token_id=eos,
        pad_token_id=getattr(teacher_config, "pad_token_id", None),
        placement=["fa"] * n,
        presets={"all-fa": ["fa"] * n},
    )
    kwargs.update(overrides)
    return SupernetConfig(**kwargs)


@torch.no_grad()
def supernet_from_teacher(teacher: nn.Module, **overrides: Any) -> SupernetForCausalLM:
    """Build a supernet in memory from a loaded HF Llama-family causal LM."""
    config = supernet_config_from_teacher(teacher.config, **overrides)
    model = SupernetForCausalLM(config).to(next(teacher.parameters()).dtype)
    t = teacher.model
    model.model.embed_tokens.weight.copy_(t.embed_tokens.weight)
    model.model.norm.weight.copy_(t.norm.weight)
    if not config.tie_word_embeddings:
        model.lm_head.weight.copy_(teacher.lm_head.weight)
    for i, (src, dst) in enumerate(zip(t.layers, model.model.layers)):
        dst.input_layernorm.weight.copy_(src.input_layernorm.weight)
        dst.post_attention_layernorm.weight.copy_(src.post_attention_layernorm.weight)
        dst.mlp.load_state_dict(src.mlp.state_dict())
        attn = src.self_attn
        weights = (attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, attn.o_proj.weight)
        biases = {
            name: getattr(attn, name).bias
            for name in ("q_proj", "k_proj", "v_proj", "o_proj")
            if getattr(attn, name).bias is not None
        }
        shape = (config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        for name in MIXERS:
            mixer = dst.mixers[name]
            if spec(name).family == "attention":  # same projections as the teacher, biases included
                mixer.init_from_attention(*weights, *shape, biases=biases)
            else:
                mixer.init_from_attention(*weights, *shape)
    model.set_placement(Placement.uniform("fa", config.num_hidden_layers))
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
    from supernet.teacher import load_teacher

    model, tokenizer = load_teacher(teacher, gguf_file)
    supernet = supernet_from_teacher(model, **overrides)
    return save_checkpoint(supernet, out_dir, tokenizer)
