"""The `Placement` value type: one mixer name per layer.

Placements cross every seam of the system (CLI strings, JSON files, configs, the vLLM plugin), so
parsing and validation live in one place and every error names the offending value and the fix.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence, Union

MIXERS: tuple[str, ...] = ("fa", "swa", "gdn", "kda")


class PlacementError(ValueError):
    """A placement or preset that cannot be used; the message is one line naming the problem."""


@dataclass(frozen=True)
class Placement:
    """An immutable tuple of mixer names, one per decoder layer."""

    mixers: tuple[str, ...]

    def __post_init__(self) -> None:
        for i, m in enumerate(self.mixers):
            if m not in MIXERS:
                raise PlacementError(
                    f"unknown mixer {m!r} at layer {i}; choose one of {', '.join(MIXERS)}"
                )

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def parse(cls, value: "PlacementLike", num_layers: int | None = None) -> "Placement":
        """Accept a Placement, a list of names, a comma-separated string, or `all-<mixer>`."""
        if isinstance(value, Placement):
            placement = value
        elif isinstance(value, str):
            text = value.strip()
            if text.startswith("[") and text.endswith("]"):
                try:
                    names = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise PlacementError(f"placement {text!r} is not valid JSON: {exc.msg}") from None
                return cls.parse(names, num_layers)
            if text.startswith("all-") and "," not in text:
                if num_layers is None:
                    raise PlacementError(f"placement {text!r} needs the number of layers to expand")
                return cls.uniform(text[4:], num_layers)
            names = [part.strip().lower() for part in text.split(",")]
            if any(not n for n in names):
                raise PlacementError(f"placement {text!r} has an empty entry; write e.g. 'fa,gdn,swa'")
            placement = cls(tuple(names))
        elif isinstance(value, Iterable):
            names = list(value)
            if not all(isinstance(n, str) for n in names):
                raise PlacementError(f"placement {names!r} must be a list of mixer names")
            placement = cls(tuple(n.strip().lower() for n in names))
        else:
            raise PlacementError(f"cannot read a placement from {type(value).__name__}")
        if num_layers is not None and len(placement) != num_layers:
            raise PlacementError(
                f"placement has {len(placement)} layers but the model has {num_layers}; "
                f"give exactly {num_layers} mixer names"
            )
        return placement

    @classmethod
    def uniform(cls, mixer: str, num_layers: int) -> "Placement":
        if mixer not in MIXERS:
            raise PlacementError(f"unknown mixer {mixer!r}; choose one of {', '.join(MIXERS)}")
        return cls((mixer,) * num_layers)

    # -- views --------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.mixers)

    def __iter__(self):
        return iter(self.mixers)

    def __getitem__(self, i: int) -> str:
        return self.mixers[i]

    def __str__(self) -> str:
        return ",".join(self.mixers)

    def to_list(self) -> list[str]:
        return list(self.mixers)

    def counts(self) -> dict[str, int]:
        c = Counter(self.mixers)
        return {m: c.get(m, 0) for m in MIXERS}

    def summary(self) -> str:
        """Short human form, e.g. `fa:3 swa:10 gdn:12 kda:5`."""
        return " ".join(f"{m}:{n}" for m, n in self.counts().items() if n)

    def used_mixers(self) -> list[str]:
        return [m for m in MIXERS if m in self.mixers]


PlacementLike = Union[Placement, str, Sequence[str]]


# -- presets.json (format in DESIGN.md) ---------------------------------------------------------
def load_presets(path: str | Path, num_layers: int | None = None) -> dict[str, Placement]:
    """Read presets.json into name -> Placement, validating every entry."""
    from supernet.io_utils import read_json

    path = Path(path)
    data = read_json(path, "presets file", "write one with `placement optimize`", PlacementError)
    if not isinstance(data, dict) or not isinstance(data.get("presets"), list):
        raise PlacementError(f"presets file {path} must be an object with a 'presets' list")
    layers = num_layers if num_layers is not None else data.get("num_layers")
    out: dict[str, Placement] = {}
    for i, entry in enumerate(data["presets"]):
        if not isinstance(entry, dict) or "name" not in entry or "placement" not in entry:
            raise PlacementError(f"presets file {path}: entry {i} needs 'name' and 'placement'")
        out[str(entry["name"])] = Placement.parse(entry["placement"], layers)
    return out


def save_presets(path: str | Path, presets: dict[str, Placement], extra: dict[str, dict] | None = None) -> None:
    """Write presets.json; `extra` adds per-preset keys such as speedup and predicted_quality."""
    if not presets:
        raise PlacementError("no presets to save")
    num_layers = len(next(iter(presets.values())))
    rows = []
    for name, p in presets.items():
        row = {"name": name, "placement": p.to_list()}
        row.update((extra or {}).get(name, {}))
        rows.append(row)
    payload = {"num_layers": num_layers, "mixers": list(MIXERS), "presets": rows}
    from supernet.io_utils import atomic_write_text

    atomic_write_text(Path(path), json.dumps(payload, indent=2) + "\n")
