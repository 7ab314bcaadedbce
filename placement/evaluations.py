"""Reading and appending evaluations.jsonl: one measured placement per line (format in DESIGN.md).

Every problem with the file is reported as one line naming the file, the line and the fix, because
the file is often written by hand, merged from several runs, or cut short by an interrupted job.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from supernet.io_utils import read_jsonl
from supernet.layout import Placement, PlacementError


@dataclass
class Evaluations:
    placements: list[Placement]
    quality: np.ndarray
    rows: list[dict]

    @property
    def num_layers(self) -> int:
        return len(self.placements[0])

    def __len__(self) -> int:
        return len(self.placements)

    def measured(self) -> set[tuple[str, ...]]:
        return {p.mixers for p in self.placements}


def read_evaluations(path: str | Path, num_layers: int | None = None, allow_empty: bool = False) -> Evaluations:
    """Parse and validate evaluations.jsonl (blank lines are skipped)."""
    path = Path(path)
    if allow_empty and not path.exists():
        return Evaluations([], np.zeros(0), [])
    lines = read_jsonl(path, "evaluations file", "measure placements with `supernet eval-placements`", PlacementError)
    placements, quality, rows = [], [], []
    expected = num_layers
    first_line = None
    for lineno, row in lines:
        where = f"evaluations file {path} line {lineno}"
        if not isinstance(row, dict) or "placement" not in row or "quality" not in row:
            raise PlacementError(f"{where} needs an object with 'placement' and 'quality'")
        try:
            p = Placement.parse(row["placement"])
        except PlacementError as exc:
            raise PlacementError(f"{where}: {exc}") from None
        if expected is None:
            expected, first_line = len(p), lineno
        elif len(p) != expected:
            origin = f"line {first_line} has" if first_line else "the model has"
            raise PlacementError(f"{where}: placement has {len(p)} layers but {origin} {expected}; "
                                 "all rows must be for the same model")
        q = row["quality"]
        if isinstance(q, bool) or not isinstance(q, (int, float)):
            raise PlacementError(f"{where}: quality must be a number, got {q!r}")
        if not math.isfinite(q):
            raise PlacementError(f"{where}: quality is {q}; remove the row or re-measure that placement")
        placements.append(p)
        quality.append(float(q))
        rows.append(row)
    if not placements and not allow_empty:
        raise PlacementError(f"evaluations file {path} has no rows; measure placements with "
                             "`supernet eval-placements` first")
    return Evaluations(placements, np.asarray(quality, dtype=float), rows)


def append_evaluation(path: str | Path, row: dict) -> None:
    """Append one row and flush, so an interrupted run keeps everything measured so far."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    needs_newline = False
    if path.exists() and path.stat().st_size > 0:
        with path.open("rb") as fh:
            fh.seek(-1, 2)
            needs_newline = fh.read(1) != b"\n"
    with path.open("a") as fh:
        fh.write(("\n" if needs_newline else "") + json.dumps(row) + "\n")
        fh.flush()
