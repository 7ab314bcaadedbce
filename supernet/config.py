"""`SupernetConfig`: the teacher's dimensions plus per-mixer settings, the default placement and presets.

Teacher families differ from Llama in a few places, each recorded in one field whose default is
Llama's behaviour (see supernet/convert.py for which family sets what):

- `norm_layout`: where the residual branches are normalised. "pre" (Llama): norm before the mixer
  and before the MLP. "sandwich" (Gemma 3): norm before and after each of them. "post" (OLMo 2):
  norm after each of them only.
- `qk_norm`: RMSNorm of queries and keys before RoPE. "none"; "per_head" (Qwen3, Gemma 3: over
  each head's head_dim); "whole" (OLMo 2: over the whole q / k projection, all heads at once).
- `embed_scale`: token embeddings are multiplied by it (Gemma 3: sqrt(hidden_size)).
- `query_pre_attn_scalar`: attention scores are scaled by its -1/2 power instead of head_dim's.
- `final_logit_softcapping`: logits -> c * tanh(logits / c).
- `hidden_act`: the gated MLP's activation (silu, or Gemma's gelu_pytorch_tanh).
- `teacher_layer_types`: the teacher's attention kind per layer ("full_attention" / "sliding_attention");
  it decides which RoPE a layer's attention mixers use and the `teacher` preset. The SWA mixers'
  window is `swa_window`, set to the teacher's sliding window when it has one.
- `sliding_rope_theta` / `sliding_rope_scaling`: RoPE of the teacher's sliding layers when it
  differs from the global one (Gemma 3's local base 10k vs global 1M with linear scaling).
- `teacher_family`: the teacher's HF model_type, for `supernet info`.
"""
from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from supernet.layout import MIXERS, Placement, PlacementError


NORM_LAYOUTS = ("pre", "sandwich", "post")
QK_NORMS = ("none", "per_head", "whole")
LAYER_TYPES = ("full_attention", "sliding_attention")


def _choice(field: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{field} {value!r} is not supported; supported: {', '.join(allowed)}")
    return value


class SupernetConfig(PretrainedConfig):
    """Configuration of a supernet: a Llama-shaped decoder whose layers each hold four mixers.

    `placement` is the default placement (one mixer name per layer). `presets` maps names to
    placements. `preset`, when set (e.g. through vLLM's `--hf-overrides '{"preset": "fast"}'`),
    replaces the default placement by that preset at load time.
    """

    model_type = "supernet"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 49152,
        hidden_size: int = 576,
        intermediate_size: int = 1536,
        num_hidden_layers: int = 30,
        num_attention_heads: int = 9,
        num_key_value_heads: int = 3,
        head_dim: int | None = None,
        hidden_act: str = "silu",
        max_position_embeddings: int = 8192,
        rms_norm_eps: float = 1e-5,
        rope_theta: float = 100000.0,
        rope_scaling: dict | None = None,
        attention_bias: bool = False,
        mlp_bias: bool = False,
        tie_word_embeddings: bool = True,
        initializer_range: float = 0.02,
        use_cache: bool = True,
        # what a teacher family does differently from Llama (see the module docstring)
        teacher_family: str = "llama",
        norm_layout: str = "pre",
        qk_norm: str = "none",
        embed_scale: float | None = None,
        query_pre_attn_scalar: float | None = None,
        final_logit_softcapping: float | None = None,
        teacher_layer_types: list[str] | None = None,
        sliding_rope_theta: float | None = None,
        sliding_rope_scaling: dict | None = None,
        # sliding-window attention
        swa_window: int = 4096,
        # Gated DeltaNet
        gdn_num_heads: int | None = None,
        gdn_num_v_heads: int | None = None,
        gdn_head_dim: int | None = None,
        gdn_v_head_dim: int | None = None,
        # Kimi Delta Attention
        kda_num_heads: int | None = None,
        kda_head_dim: int | None = None,
        kda_v_head_dim: int | None = None,
        # both linear mixers
        linear_conv_size: int = 4,
        linear_norm_eps: float | None = None,
        # placements
        placement: list[str] | None = None,
        presets: dict[str, list[str]] | None = None,
        preset: str | None = None,
        bos_token_id: int | None = 1,
        eos_token_id: int | None = 2,
        pad_token_id: int | None = None,
        **kwargs: Any,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.rope_scaling = rope_scaling
        self.attention_bias = attention_bias
        self.mlp_bias = mlp_bias
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self.teacher_family = teacher_family
        self.norm_layout = _choice("norm_layout", norm_layout, NORM_LAYOUTS)
        self.qk_norm = _choice("qk_norm", qk_norm, QK_NORMS)
        self.embed_scale = embed_scale
        self.query_pre_attn_scalar = query_pre_attn_scalar
        self.final_logit_softcapping = final_logit_softcapping
        self.teacher_layer_types = (
            list(teacher_layer_types) if teacher_layer_types is not None else ["full_attention"] * num_hidden_layers
        )
        if len(self.teacher_layer_types) != num_hidden_layers:
            raise ValueError(f"teacher_layer_types has {len(self.teacher_layer_types)} entries for {num_hidden_layers} layers")
        for kind in self.teacher_layer_types:
            _choice("teacher_layer_types entry", kind, LAYER_TYPES)
        self.sliding_rope_theta = sliding_rope_theta
        self.sliding_rope_scaling = sliding_rope_scaling
        self.swa_window = swa_window
        self.gdn_num_heads = gdn_num_heads or num_attention_heads
        self.gdn_num_v_heads = gdn_num_v_heads or self.gdn_num_heads
        self.gdn_head_dim = gdn_head_dim or self.head_dim
        self.gdn_v_head_dim = gdn_v_head_dim or self.gdn_head_dim
        self.kda_num_heads = kda_num_heads or num_attention_heads
        self.kda_head_dim = kda_head_dim or self.head_dim
        self.kda_v_head_dim = kda_v_head_dim or self.kda_head_dim
        self.linear_conv_size = linear_conv_size
        self.linear_norm_eps = linear_norm_eps if linear_norm_eps is not None else rms_norm_eps
        self.presets = {str(k): list(v) for k, v in (presets or {}).items()}
        self.preset = preset
        base = list(placement) if placement is not None else ["fa"] * num_hidden_layers
        self.placement = base
        super().__init__(
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        self.validate_placements()

    def validate_placements(self) -> None:
        """Refuse bad placements at load time, with one line that names the problem."""
        n = self.num_hidden_layers
        Placement.parse(self.placement, n)
        for name, p in self.presets.items():
            try:
                Placement.parse(p, n)
            except PlacementError as exc:
                raise PlacementError(f"preset {name!r}: {exc}") from None
        if self.preset is not None and self.preset not in self.presets:
            known = ", ".join(sorted(self.presets)) or "none"
            raise PlacementError(f"unknown preset {self.preset!r}; this checkpoint has: {known}")

    def active_placement(self) -> Placement:
        """The placement a freshly loaded model runs: the chosen preset if any, else the default."""
        self.validate_placements()  # `preset` may have been set after __init__ (from_pretrained kwargs)
        if self.preset is not None:
            return Placement.parse(self.presets[self.preset], self.num_hidden_layers)
        return Placement.parse(self.placement, self.num_hidden_layers)

    def resolve(self, value: "str | list[str] | Placement") -> Placement:
        """A preset name or a placement in any accepted form -> validated Placement."""
        if isinstance(value, str) and value in self.presets:
            return Placement.parse(self.presets[value], self.num_hidden_layers)
        if isinstance(value, str) and value.strip() not in MIXERS and not any(c in value for c in ",[") \
                and not value.startswith("all-"):
            known = ", ".join(sorted(self.presets)) or "none"
            raise PlacementError(f"unknown preset {value!r}; this checkpoint has: {known} "
                                 "(or give a placement such as 'fa,swa,...')")
        return Placement.parse(value, self.num_hidden_layers)

    def uses_sliding_rope(self, layer_idx: int) -> bool:
        """Whether layer `layer_idx`'s attention mixers take the sliding layers' RoPE (Gemma 3 local)."""
        return self.sliding_rope_theta is not None and self.teacher_layer_types[layer_idx] == "sliding_attention"

    def teacher_placement(self) -> list[str]:
        """The placement that computes the teacher's function: swa where the teacher's layer slides."""
        return ["swa" if kind == "sliding_attention" else "fa" for kind in self.teacher_layer_types]

    @property
    def mixer_names(self) -> tuple[str, ...]:
        return MIXERS
