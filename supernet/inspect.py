"""Summaries of a supernet: parameters per mixer and shared, presets — what `supernet info` prints."""
from __future__ import annotations

from dataclasses import dataclass

from supernet.model import SupernetForCausalLM
from supernet.layout import MIXERS


FAMILY_NAMES = {
    "llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3",
    "gemma3_text": "Gemma 3 (text)", "phi3": "Phi-3", "olmo2": "OLMo 2",
}


def describe_teacher(config) -> str:
    """One line: the teacher family and what its layers do differently from Llama."""
    family = getattr(config, "teacher_family", "llama")
    parts = [FAMILY_NAMES.get(family, family)]
    if config.norm_layout != "pre":
        parts.append(f"{config.norm_layout} norms")
    if config.qk_norm != "none":
        parts.append(f"q/k norm {config.qk_norm.replace('_', '-')}")
    if config.embed_scale is not None:
        parts.append(f"embeddings x{config.embed_scale:.4g}")
    if config.query_pre_attn_scalar is not None:
        parts.append(f"scores x{config.query_pre_attn_scalar:g}^-1/2")
    if config.hidden_act not in ("silu", "swish"):
        parts.append(config.hidden_act)
    if config.final_logit_softcapping is not None:
        parts.append(f"logit softcap {config.final_logit_softcapping:g}")
    sliding = sum(kind == "sliding_attention" for kind in config.teacher_layer_types)
    if sliding:
        parts.append(f"{sliding}/{config.num_hidden_layers} sliding layers (window {config.swa_window})")
    if config.sliding_rope_theta is not None:
        parts.append(f"RoPE base {config.rope_theta:g} global / {config.sliding_rope_theta:g} sliding")
    return ", ".join(parts)


@dataclass
class ParameterCounts:
    shared: int
    per_mixer: dict[str, int]  # summed over layers
    num_layers: int = 1

    @property
    def total(self) -> int:
        return self.shared + sum(self.per_mixer.values())

    def placement_total(self, placement) -> int:
        """Parameters a single placement actually uses."""
        per_layer = {m: n // max(1, self.num_layers) for m, n in self.per_mixer.items()}
        return self.shared + sum(per_layer[m] for m in placement)


def count_parameters(model: SupernetForCausalLM) -> ParameterCounts:
    seen: set[int] = set()
    per_mixer = {m: 0 for m in MIXERS}
    shared = 0
    for name, p in model.named_parameters(remove_duplicate=True):
        if id(p) in seen:
            continue
        seen.add(id(p))
        parts = name.split(".")
        if "mixers" in parts:
            per_mixer[parts[parts.index("mixers") + 1]] += p.numel()
        else:
            shared += p.numel()
    return ParameterCounts(shared=shared, per_mixer=per_mixer, num_layers=model.config.num_hidden_layers)
