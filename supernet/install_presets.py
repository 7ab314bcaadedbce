"""Install optimised presets into a checkpoint: presets.json (from `placement optimize`) -> the
`presets` of the checkpoint's config.json, which `supernet serve --preset NAME` reads.

Only config.json changes (the weights hold every mixer already), and it is rewritten atomically, so
an interrupted install leaves the old file. Every preset is validated against the checkpoint's layer
count before anything is written. Existing presets are kept unless `replace`; a name that is already
installed with another placement is refused unless `overwrite` (re-installing the same placement is
not a clash, so an install can be repeated).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from supernet.io_utils import atomic_write_text, read_json
from supernet.layout import Placement, PlacementError

RESERVED = "default"  # the name a server gives the checkpoint's default placement (serving/plan.py)


@dataclass
class PresetChange:
    name: str
    status: str  # added | updated | unchanged | kept | removed
    placement: Placement
    info: dict[str, Any] = field(default_factory=dict)  # speedup, predicted_quality... from presets.json


@dataclass
class InstallReport:
    config_path: Path
    changes: list[PresetChange]
    written: bool

    def names(self, *statuses: str) -> list[str]:
        return [c.name for c in self.changes if c.status in statuses]


def read_checkpoint_config(ckpt: str | Path) -> tuple[Path, dict]:
    """(path of config.json, its contents) of a supernet checkpoint folder, or a one-line error."""
    path = Path(ckpt) / "config.json"
    if not Path(ckpt).is_dir() or not path.is_file():
        raise PlacementError(f"{ckpt} is not a checkpoint folder (no config.json); give the folder from "
                             "`supernet convert` or training")
    config = read_json(path, "checkpoint config", "give the folder from `supernet convert`", PlacementError)
    if not isinstance(config, dict) or config.get("model_type") != "supernet":
        raise PlacementError(f"{path} is not a supernet config (model_type {config.get('model_type')!r}); "
                             "convert the model with `supernet convert` first")
    if not isinstance(config.get("num_hidden_layers"), int):
        raise PlacementError(f"{path} has no integer num_hidden_layers")
    return path, config


def read_presets_file(path: str | Path, num_layers: int) -> tuple[dict[str, tuple[Placement, dict]], dict | None]:
    """(name -> (placement, the entry's other keys), the file's cost_source block or None), every entry
    checked against `num_layers`."""
    path = Path(path)
    data = read_json(path, "presets file", "write one with `placement optimize --out presets.json`", PlacementError)
    if not isinstance(data, dict) or not isinstance(data.get("presets"), list):
        raise PlacementError(f"presets file {path} must be an object with a 'presets' list "
                             "(the file `placement optimize --out` writes)")
    if not data["presets"]:
        raise PlacementError(f"presets file {path} holds no presets")
    file_layers = data.get("num_layers")
    if isinstance(file_layers, int) and file_layers != num_layers:
        raise PlacementError(f"presets file {path} is for {file_layers} layers but the checkpoint has {num_layers}; "
                             "optimise with evaluations and costs of this checkpoint")
    out: dict[str, tuple[Placement, dict]] = {}
    for i, entry in enumerate(data["presets"]):
        if not isinstance(entry, dict) or "placement" not in entry:
            raise PlacementError(f"presets file {path}: entry {i} needs 'name' and 'placement'")
        name = entry.get("name")
        if not isinstance(name, str) or not name.strip() or name != name.strip():
            raise PlacementError(f"presets file {path}: entry {i} needs a non-empty 'name' without surrounding spaces")
        if name == RESERVED:
            raise PlacementError(f"presets file {path}: the name {RESERVED!r} is reserved for the checkpoint's "
                                 "default placement; rename that preset")
        if name in out:
            raise PlacementError(f"presets file {path}: preset {name!r} appears twice; give each preset its own name")
        try:
            placement = Placement.parse(entry["placement"], num_layers)
        except PlacementError as exc:
            raise PlacementError(f"preset {name!r} in {path}: {exc}") from None
        out[name] = (placement, {k: v for k, v in entry.items() if k not in ("name", "placement")})
    return out, data.get("cost_source")


def install_presets(ckpt: str | Path, presets_file: str | Path, *, replace: bool = False, overwrite: bool = False,
                    dry_run: bool = False) -> InstallReport:
    """Write the presets of `presets_file` into `ckpt`'s config.json; see the module docstring."""
    config_path, config = read_checkpoint_config(ckpt)
    num_layers = config["num_hidden_layers"]
    new, source = read_presets_file(presets_file, num_layers)
    existing: dict[str, Placement] = {}
    for name, value in (config.get("presets") or {}).items():
        try:
            existing[name] = Placement.parse(value, num_layers)
        except PlacementError as exc:
            raise PlacementError(f"preset {name!r} already in {config_path} is invalid ({exc}); "
                                 "pass --replace to drop the existing presets") from None
    clashes = [n for n, (p, _) in new.items() if n in existing and existing[n] != p]
    if clashes and not overwrite and not replace:
        names = ", ".join(repr(n) for n in clashes)
        raise PlacementError(f"{config_path} already has preset(s) {names} with another placement; pass --overwrite "
                             "to replace them, --replace to drop every existing preset, or rename them in "
                             f"{Path(presets_file).name}")
    changes: list[PresetChange] = []
    for name, old in existing.items():
        if name not in new:
            changes.append(PresetChange(name, "removed" if replace else "kept", old))
    for name, (placement, info) in new.items():
        status = "added" if name not in existing else ("unchanged" if existing[name] == placement else "updated")
        changes.append(PresetChange(name, status, placement, info))
    result = {c.name: c.placement.to_list() for c in changes if c.status != "removed"}
    active = config.get("preset")
    if active is not None and active not in result:
        raise PlacementError(f"{config_path} selects preset {active!r} (its 'preset' key), which this install would "
                             "remove; keep it in the presets file or install without --replace")
    written = False
    if not dry_run and (result != config.get("presets") or (source and source != config.get("presets_cost_source"))):
        config["presets"] = result
        if source:  # `serve` / `generate` warn when the presets are used far from this setting
            config["presets_cost_source"] = source
        atomic_write_text(config_path, json.dumps(config, indent=2, sort_keys=False) + "\n")
        written = True
    return InstallReport(config_path, changes, written)
