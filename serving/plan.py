"""What a server instantiates: the placements it serves, the mixers each layer needs, the draft.

Pure Python on top of `SupernetConfig`, shared by the vLLM model, its config hook, the request
router and the CLI, so every process derives the same plan from the same config keys:

- `preset` (existing key): serve that preset only (else the default `placement`);
- `switchable: true`: serve the default placement and every preset in one engine; a request picks
  one (model name `NAME:PRESET` or `vllm_xargs={"preset": ...}`);
- `draft_preset`: the preset whose mixers the self-speculative drafter needs as well.
"""
from __future__ import annotations

from dataclasses import dataclass

from supernet.layout import MIXERS, Placement, PlacementError
from supernet.mixers.registry import LinearSpec, mixers_of_family, spec

# switchable mode, for comparison only: "full-layout" runs the FA/SWA kernel over every row of a
# step (other rows with zero q/k/v), as before they ran over their own rows only
FULL_LAYOUT_ENV = "SUPERNET_SWITCHABLE_ATTENTION"

DEFAULT = "default"
LINEAR_MIXERS = mixers_of_family("linear")  # served as vLLM state-page layers (MambaBase)
ATTENTION_MIXERS = mixers_of_family("attention")  # served as vLLM attention layers (paged KV)


@dataclass(frozen=True)
class ServingPlan:
    placements: dict[str, Placement]  # served name -> placement; the first one is the default
    layer_mixers: tuple[tuple[str, ...], ...]  # mixers served through vLLM layers, per layer
    draft: Placement | None
    draft_only: tuple[tuple[str, ...], ...]  # mixers only the drafter uses, per layer
    switchable: bool

    @property
    def default_name(self) -> str:
        return next(iter(self.placements))

    @property
    def num_layers(self) -> int:
        return len(self.layer_mixers)

    def used_kinds(self) -> set[str]:
        return {m for layer in self.layer_mixers for m in layer}

    def layer_types(self) -> list[str]:
        """vLLM's `layer_types`, which only decides whether the model is hybrid (some layer holds
        GDN/KDA). SWA layers are spelled "full_attention" on purpose: vLLM counts any other
        spelling as a non-attention layer; their window is set on the layer itself."""
        return ["linear_attention" if any(m in LINEAR_MIXERS for m in mixers) else "full_attention"
                for mixers in self.layer_mixers]

    def resolve(self, name: str | None) -> str:
        """A request's preset name -> a served name; one-line error naming the choices."""
        if name is None or name == "":
            return self.default_name
        if name in self.placements:
            return name
        known = ", ".join(self.placements)
        raise PlacementError(f"unknown preset {name!r}; this server serves: {known}")


def _truthy(value) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def serving_plan(config) -> ServingPlan:
    """Derive the plan from a `SupernetConfig` (after vLLM applied `--hf-overrides`)."""
    n = config.num_hidden_layers
    presets = {name: Placement.parse(p, n) for name, p in (config.presets or {}).items()}
    preset = getattr(config, "preset", None)
    switchable = _truthy(getattr(config, "switchable", False))
    if preset is not None and preset not in presets:
        known = ", ".join(sorted(presets)) or "none"
        raise PlacementError(f"unknown preset {preset!r}; this checkpoint has: {known}")
    base = Placement.parse(config.placement, n)
    if switchable:
        placements: dict[str, Placement] = {}
        first = preset or DEFAULT
        placements[first] = presets[preset] if preset else base
        if DEFAULT not in placements:
            placements[DEFAULT] = base
        for name, p in presets.items():
            placements.setdefault(name, p)
    else:
        placements = {preset: presets[preset]} if preset else {DEFAULT: base}
    layer_mixers = tuple(
        tuple(m for m in MIXERS if any(p[i] == m for p in placements.values())) for i in range(n)
    )
    draft = None
    draft_only: tuple[tuple[str, ...], ...] = tuple(() for _ in range(n))
    draft_name = getattr(config, "draft_preset", None)
    if draft_name:
        if draft_name in presets:
            draft = presets[draft_name]
        else:
            try:
                draft = Placement.parse(draft_name, n)  # a placement string or all-<mixer>
            except PlacementError:
                known = ", ".join(sorted(presets)) or "none"
                raise PlacementError(
                    f"draft preset {draft_name!r} is neither a preset of this checkpoint ({known}) "
                    f"nor a placement of {n} mixers"
                ) from None
        draft_only = tuple(() if draft[i] in layer_mixers[i] else (draft[i],) for i in range(n))
    return ServingPlan(placements, layer_mixers, draft, draft_only, switchable)


def linear_rank_dims(config, kind: str, tp_size: int = 1) -> dict[str, int]:
    """Head counts and sizes of a GDN or KDA mixer on one of `tp_size` tensor-parallel ranks (the
    registry's names: H, HV, K, V, W, C). Heads split evenly across ranks, head sizes do not; a
    one-line ValueError when they do not split."""
    mixer = spec(kind)
    if not isinstance(mixer, LinearSpec):
        raise ValueError(f"{kind!r} is not a linear mixer; the linear ones are {', '.join(LINEAR_MIXERS)}")
    d = dict(mixer.dims(config))
    for key, what in (("H", "q/k heads"), ("HV", "value heads")):
        if d[key] % tp_size:
            raise ValueError(f"{kind}: {d[key]} {what} do not split over tensor-parallel size {tp_size}; "
                             f"use a --tensor-parallel-size that divides {d[key]}")
    d["H"] //= tp_size
    d["HV"] //= tp_size
    d["C"] = 2 * d["H"] * d["K"] + d["HV"] * d["V"]
    return d


def check_tensor_parallel(config, plan: ServingPlan, tp_size: int) -> None:
    """Every GDN/KDA mixer the plan serves splits its heads over `tp_size` ranks (vLLM checks the
    attention heads itself); a one-line ValueError otherwise."""
    for kind in LINEAR_MIXERS:
        if kind in plan.used_kinds():
            linear_rank_dims(config, kind, tp_size)
