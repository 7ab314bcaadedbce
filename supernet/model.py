"""`SupernetForCausalLM`: a Llama-shaped decoder whose every layer holds four mixers.

The active placement is plain Python state (a tuple of mixer names), so `set_placement` is instant
and never touches weights; a forward call can also override it for that call alone (`placement=`),
which is how training samples a placement per step and speculative decoding runs draft and target.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from supernet.cache import SupernetCache
from supernet.config import SupernetConfig
from supernet.layer import SupernetDecoderLayer
from supernet.mixers.rotary import RotaryEmbedding
from supernet.ops.norm import RMSNorm
from supernet.layout import Placement, PlacementLike


class SupernetPreTrainedModel(PreTrainedModel):
    config_class = SupernetConfig
    config: SupernetConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["SupernetDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # we bring our own cache (recurrent states do not fit a DynamicCache)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """HF's defaults plus ours; `init.*` skip tensors already loaded from a checkpoint."""
        from transformers import initialization as init

        super()._init_weights(module)
        if isinstance(module, RMSNorm):
            init.ones_(module.weight)
        if isinstance(module, RotaryEmbedding):
            # a non-persistent buffer: loading leaves it uninitialised, so recompute it
            init.copy_(module.inv_freq, module.compute_inv_freq())


class SupernetModel(SupernetPreTrainedModel):
    """Embeddings, decoder layers and the final norm; returns hidden states."""

    def __init__(self, config: SupernetConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(SupernetDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)
        # Gemma 3: the teacher's sliding layers use their own RoPE base (None: one RoPE for all layers)
        self.rotary_emb_sliding = RotaryEmbedding(config, sliding=True) if config.sliding_rope_theta is not None else None
        self.gradient_checkpointing = False
        self.placement: Placement = config.active_placement()
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings, times `config.embed_scale` when the teacher scales them (Gemma 3: the
        scale rounded to the weights' dtype, as the teacher does it)."""
        hidden = self.embed_tokens(input_ids)
        if self.config.embed_scale is not None:
            scale = torch.tensor(self.config.embed_scale, dtype=torch.float32, device=hidden.device)
            hidden = hidden * scale.to(hidden.dtype)
        return hidden

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: SupernetCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        placement: PlacementLike | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        hidden = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        b, t = hidden.shape[:2]
        active = self.placement if placement is None else self.config.resolve(placement)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None and not self.training:
            past_key_values = SupernetCache(self.config.num_hidden_layers)
        if not use_cache:
            past_key_values = None
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if past_key_values is not None:
            past_key_values.forward_memo.clear()
        if position_ids is None:
            position_ids = torch.arange(past, past + t, device=hidden.device).unsqueeze(0).expand(b, -1)
        position_embeddings = self.rotary_emb(hidden, position_ids)
        sliding_embeddings = (
            self.rotary_emb_sliding(hidden, position_ids) if self.rotary_emb_sliding is not None else None
        )

        all_hidden: list[torch.Tensor] | None = [] if output_hidden_states else None
        for i, (layer, mixer) in enumerate(zip(self.layers, active)):
            rope = sliding_embeddings if self.config.uses_sliding_rope(i) else position_embeddings
            if all_hidden is not None:
                all_hidden.append(hidden)
            if self.gradient_checkpointing and self.training:
                hidden = self._gradient_checkpointing_func(layer.__call__, hidden, mixer, rope, past_key_values)
            else:
                hidden = layer(hidden, mixer, rope, past_key_values)
        hidden = self.norm(hidden)
        if all_hidden is not None:
            all_hidden.append(hidden)
        if past_key_values is not None:
            past_key_values.forward_memo.clear()  # nothing of this forward held past it (a prefill's RoPE tables)
            past_key_values.advance(t)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden,
            past_key_values=past_key_values,
            hidden_states=tuple(all_hidden) if all_hidden is not None else None,
        )


class SupernetForCausalLM(SupernetPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: SupernetConfig) -> None:
        super().__init__(config)
        self.model = SupernetModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    # -- placement ----------------------------------------------------------------------------
    @property
    def placement(self) -> Placement:
        return self.model.placement

    def set_placement(self, placement: PlacementLike) -> Placement:
        """Switch the active placement (a Placement, list, comma string, `all-<mixer>` or preset name)."""
        self.model.placement = self.config.resolve(placement)
        return self.model.placement

    @property
    def presets(self) -> dict[str, Placement]:
        return {name: self.config.resolve(name) for name in self.config.presets}

    # -- HF plumbing ----------------------------------------------------------------------------
    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, new: nn.Linear) -> None:
        self.lm_head = new

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: SupernetCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        placement: PlacementLike | None = None,
        logits_to_keep: int = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError(
                "padded batches are not supported (linear mixers carry state across positions); "
                "batch sequences of equal length or run them one at a time"
            )
        out = self.model(
            input_ids=input_ids,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            placement=placement,
        )
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        cap = self.config.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, past_key_values=out.past_key_values, hidden_states=out.hidden_states
        )

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        past_key_values: SupernetCache | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool = True,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Feed only the tokens the cache has not seen yet."""
        seen = past_key_values.get_seq_length() if past_key_values is not None else 0
        inputs: dict[str, Any] = {"past_key_values": past_key_values, "use_cache": use_cache}
        if inputs_embeds is not None and seen == 0:
            inputs["inputs_embeds"] = inputs_embeds
        else:
            inputs["input_ids"] = input_ids[:, seen:]
        if attention_mask is not None:
            inputs["attention_mask"] = attention_mask
        for key in ("placement", "logits_to_keep"):
            if key in kwargs:
                inputs[key] = kwargs[key]
        return inputs

    def _reorder_cache(self, past_key_values: SupernetCache, beam_idx: torch.LongTensor) -> SupernetCache:
        return past_key_values.reorder_cache(beam_idx)


def register_auto_classes() -> None:
    """Make `AutoConfig` / `AutoModelForCausalLM` know model_type "supernet"."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        AutoConfig.register("supernet", SupernetConfig)
    except ValueError:
        pass  # already registered
    try:
        AutoModelForCausalLM.register(SupernetConfig, SupernetForCausalLM)
    except ValueError:
        pass


register_auto_classes()
