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

from dataclasses import dataclass, field

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


@dataclass(frozen=True)
class Selection:
    """The part of a step one mixer runs over: flat token indices and a row mask (CPU, over the
    rows of `query_start_loc`) for the state-page layers; for the attention layers also the rows
    that hold tokens (`row_ids`, CPU, ascending) and their token counts (`query_lens`), and a
    per-step cache of what the attention layers derive from them (`derived`: restricted
    metadata, keyed by the metadata object it restricts)."""

    tokens: torch.Tensor
    rows: torch.Tensor
    row_ids: torch.Tensor | None = None
    query_lens: torch.Tensor | None = None
    row_lens: torch.Tensor | None = None  # [R] CPU: every row's token count (the step's layout)
    derived: dict = field(default_factory=dict, compare=False, repr=False)


class StepRoute:
    """Which tokens run which mixer, for one forward pass; computed once per step.

    Each layer asks `layer_plan(i)`: a mixer every request of the step uses runs over all tokens
    (`None`, no gather); a mixer only some use runs over theirs (`Selection`). Selections are
    cached per set of presets, so layers with the same pattern share one index tensor."""

    def __init__(self, router: "Router", row_presets: torch.Tensor, row_lens: torch.Tensor, num_tokens: int,
                 device: torch.device) -> None:
        self.router = router
        self.row_presets = row_presets  # [R] CPU long, index into router.names
        # host data (the router's rows and the CPU copy of the row layout): no device read
        self.present = frozenset(row_presets[row_lens > 0].tolist()) or frozenset([router.index[router.plan.default_name]])
        self.row_lens = row_lens  # [R] CPU long
        token_preset = torch.repeat_interleave(row_presets, row_lens)
        # tokens vLLM padded (never read): no preset, so no selection holds them and the attention
        # layers' row layout (`row_ids`, `query_lens`) covers a selection's tokens exactly
        pad = num_tokens - token_preset.shape[0]
        self.token_preset = torch.cat([token_preset, token_preset.new_full((max(pad, 0),), -1)])[:num_tokens]
        self.device = device
        self._selections: dict[frozenset[int], Selection] = {}

    def _select(self, presets: frozenset[int]) -> Selection:
        sel = self._selections.get(presets)
        if sel is None:
            ids = torch.tensor(sorted(presets), dtype=torch.long)
            tokens = torch.nonzero(torch.isin(self.token_preset, ids)).flatten()
            rows = torch.isin(self.row_presets, ids)
            row_ids = torch.nonzero(rows & (self.row_lens > 0)).flatten()
            sel = Selection(tokens.to(self.device), rows, row_ids, self.row_lens[row_ids], self.row_lens)
            self._selections[presets] = sel
        return sel

    def layer_plan(self, layer_idx: int) -> list[tuple[str, Selection | None]]:
        plan = []
        for mixer, users in self.router.users[layer_idx].items():
            active = users & self.present
            if active:
                plan.append((mixer, None if active == self.present else self._select(active)))
        return plan


def _row_layout(attn_metadata) -> torch.Tensor | None:
    """Row boundaries of the flattened batch (query_start_loc) from any layer's metadata, on the
    CPU (vLLM's CPU attention keeps it there; elsewhere this copy is the switchable path's one
    host synchronisation per step)."""
    if not isinstance(attn_metadata, dict):
        return None
    fallback = None
    for meta in attn_metadata.values():
        qsl = getattr(meta, "query_start_loc", None)
        if qsl is not None:
            return qsl.cpu()
        if fallback is None and getattr(meta, "spec_sequence_masks", 1) is None:
            fallback = meta.non_spec_query_start_loc
    return fallback.cpu() if fallback is not None else None


class Router:
    """Model-side half: the route of one forward pass."""

    def __init__(self, plan: ServingPlan) -> None:
        self.plan = plan
        self.names = list(plan.placements)
        self.index = {n: i for i, n in enumerate(self.names)}
        # users[layer][mixer]: the presets (indices into names) that run `mixer` at `layer`
        self.users = [
            {m: frozenset(i for i, n in enumerate(self.names) if plan.placements[n][layer] == m)
             for m in plan.layer_mixers[layer]}
            for layer in range(plan.num_layers)
        ]

    def route(self, forward_context, num_tokens: int, device: torch.device) -> StepRoute | None:
        """None for a profile / warm-up run (no metadata): every layer then runs all its mixers."""
        qsl = _row_layout(forward_context.attn_metadata)
        if qsl is None:
            return None
        router = active_router()
        if router is None:
            raise RuntimeError(
                f"switchable serving needs the request router: start vLLM with "
                f"--logits-processors {ROUTER_FQCN} (supernet serve --switchable does)"
            )
        qsl = qsl.long()
        rows = qsl.shape[0] - 1
        get = router.row_presets.get
        row_presets = torch.tensor([self.index[get(r, self.plan.default_name)] for r in range(rows)], dtype=torch.long)
        return StepRoute(self, row_presets, qsl[1:] - qsl[:-1], num_tokens, device)
