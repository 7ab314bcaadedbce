"""Per-request presets in one engine (switchable mode).

A request names its preset either through the model name (`supernet:fast`, see `serving.plugin`)
or through `vllm_xargs={"preset": "fast"}`; both end up in `SamplingParams.extra_args["preset"]`.

vLLM gives a model's forward pass only the flattened tokens of the batch, not the requests they
belong to. Its logits-processor interface, however, tells a processor which request (with its
SamplingParams) sits in which row of the persistent batch before every forward pass — so
`PresetRouter` is a logits processor that never changes the logits and only records row -> preset;
the model's `Router` turns that into a per-token preset using the attention metadata's
`query_start_loc` (tokens are laid out row after row). The processor's `validate_params` rejects
an unknown preset in the API server, which vLLM answers with HTTP 400.

Needs vLLM's V1 model runner (the one whose rows the logits processors see); `supernet serve`
sets VLLM_USE_V2_MODEL_RUNNER=0.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor

from supernet.serving.plan import ServingPlan, serving_plan
from supernet.layout import PlacementError

PRESET_KEY = "preset"
ROUTER_FQCN = "supernet.serving.routing:PresetRouter"

# served presets, per process: set by the config hook (API server) and by the router (worker)
_KNOWN_PRESETS: dict[str, ServingPlan] = {}
_ACTIVE_ROUTER: "PresetRouter | None" = None


def remember_plan(model_key: str, plan: ServingPlan) -> None:
    _KNOWN_PRESETS[model_key] = plan


def requested_preset(params) -> str | None:
    extra = getattr(params, "extra_args", None) or {}
    value = extra.get(PRESET_KEY)
    return None if value is None else str(value)


def validate_preset(sampling_params) -> None:
    """Raise ValueError (vLLM answers 400) if the request asks for a preset this server lacks."""
    name = requested_preset(sampling_params)
    if name is None:
        return
    for plan in _KNOWN_PRESETS.values():
        if not plan.switchable:
            if name in plan.placements:
                return
            raise ValueError(
                f"this server serves only preset {plan.default_name!r}; start it with "
                f"--switchable to choose presets per request (asked for {name!r})"
            )
        try:
            plan.resolve(name)
        except PlacementError as exc:
            raise ValueError(str(exc)) from None


class PresetRouter(LogitsProcessor):
    """Records the preset of every row of the persistent batch; leaves logits untouched."""

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        validate_preset(sampling_params)

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        global _ACTIVE_ROUTER
        hf_config = vllm_config.model_config.hf_config
        self.plan = serving_plan(hf_config) if getattr(hf_config, "model_type", "") == "supernet" else None
        self.row_presets: dict[int, str] = {}
        _ACTIVE_ROUTER = self

    def is_argmax_invariant(self) -> bool:
        return True

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None or self.plan is None:
            return
        rows = self.row_presets
        for index in batch_update.removed:
            rows.pop(index, None)
        for index, params, _prompt, _output in batch_update.added:
            rows[index] = self.plan.resolve(requested_preset(params)) if params is not None else self.plan.default_name
        for a, b, direction in batch_update.moved:
            pa, pb = rows.pop(a, None), rows.pop(b, None)
            if pa is not None:
                rows[b] = pa
            if pb is not None and direction.name == "SWAP":
                rows[a] = pb


def active_router() -> PresetRouter | None:
    return _ACTIVE_ROUTER


@dataclass
class BatchRoute:
    """Which mixer each token of this forward pass uses, layer by layer."""

    token_preset: torch.Tensor | None  # [num_tokens] index into names; None = profile run
    names: list[str]
    plan: ServingPlan
    batch_presets: list[str]
    num_tokens: int

    def layer_masks(self, layer_idx: int):
        """(mixer, token mask) for every mixer some request of the batch uses at this layer."""
        if self.token_preset is None:  # profile / warm-up run: exercise every mixer, keep the first
            none = torch.zeros(self.num_tokens, dtype=torch.bool)
            return [(m, none) for m in self.plan.layer_mixers[layer_idx]]
        needed: dict[str, None] = {}
        for name in self.batch_presets:
            needed.setdefault(self.plan.placements[name][layer_idx], None)
        out = []
        for mixer in needed:
            ids = [i for i, n in enumerate(self.names) if self.plan.placements[n][layer_idx] == mixer]
            mask = torch.isin(self.token_preset, torch.tensor(ids, device=self.token_preset.device))
            out.append((mixer, mask))
        return out


def _query_start_loc(attn_metadata) -> list[int] | None:
    """Row boundaries of the flattened batch, from any layer's metadata."""
    if not isinstance(attn_metadata, dict):
        return None
    fallback = None
    for meta in attn_metadata.values():
        qsl = getattr(meta, "query_start_loc", None)
        if qsl is not None:
            return qsl.tolist()
        if fallback is None and getattr(meta, "spec_sequence_masks", 1) is None:
            fallback = meta.non_spec_query_start_loc
    return fallback.tolist() if fallback is not None else None


class Router:
    """Model-side half: per-token presets for one forward pass."""

    def __init__(self, plan: ServingPlan) -> None:
        self.plan = plan
        self.names = list(plan.placements)

    def route(self, forward_context, num_tokens: int, device: torch.device) -> BatchRoute:
        qsl = _query_start_loc(forward_context.attn_metadata)
        if qsl is None:
            return BatchRoute(None, self.names, self.plan, self.names, num_tokens)
        router = active_router()
        if router is None:
            raise RuntimeError(
                f"switchable serving needs the request router: start vLLM with "
                f"--logits-processors {ROUTER_FQCN} (supernet serve --switchable does)"
            )
        default = self.plan.default_name
        index = {n: i for i, n in enumerate(self.names)}
        token_preset = torch.full((num_tokens,), index[default], dtype=torch.long)
        batch = []
        for row in range(len(qsl) - 1):
            if qsl[row + 1] <= qsl[row]:
                continue
            name = router.row_presets.get(row, default)
            batch.append(name)
            token_preset[qsl[row] : qsl[row + 1]] = index[name]
        return BatchRoute(token_preset.to(device), self.names, self.plan, sorted(set(batch)) or [default], num_tokens)
