"""The e2e results table with its speed column re-measured by CUDA-graph decoding.

Why: the e2e run (`benchmarks/e2e.py`, 2026-11-26) measured quality with its trained checkpoint,
but timed decoding eagerly, kernel by kernel from Python. A step of a 135M model at batch 64 is then
bound by launch overhead, and the timings disagreed with one another (see the README). Decode
speed does not depend on the weights, so `benchmarks/gpu_decode_presets.py` re-timed the same
placements with random weights, as replayed CUDA graphs, side by side in one run. This script joins
the two measured files by preset name. It writes a table, a JSON and a plot, and types no number.

    python benchmarks/e2e_graph_speed.py  [--measurements FILE] [--speeds FILE] [--out-prefix PATH]
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cli.report import plot, table_markdown  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"


def join(measurements: dict, speeds: dict) -> dict:
    """`measurements` with each preset's decode_speedup / ms_per_step taken from `speeds` (same placement)."""
    timed = {row["preset"]: row for row in speeds["rows"]}
    out = copy.deepcopy(measurements)
    for preset in out["presets"]:
        row = timed.get(preset["preset"])
        if row is None:
            raise SystemExit(f"preset {preset['preset']!r} has no row in the speed file; re-run gpu_decode_presets.py "
                             "with the e2e presets.json")
        counts = {m: preset["placement"].count(m) for m in ("fa", "swa", "gdn", "kda")}
        timed_counts = dict(part.split(":") for part in row["placement"].split())
        if {m: int(timed_counts.get(m, 0)) for m in counts} != counts:
            raise SystemExit(f"preset {preset['preset']!r}: the speed file timed {row['placement']}, not {counts}")
        preset["eager_decode_speedup"] = preset.pop("decode_speedup")
        preset["decode_speedup"] = row["speedup_vs_all_fa"]
        preset["ms_per_step"] = row["ms_per_step"]
        preset["predicted_ms_per_step"] = row.get("predicted_ms_per_step")
    out["speed_source"] = {"file": "gpu_decode_presets.json", "device": speeds.get("device"),
                           "batch": speeds.get("batch"), "context": speeds.get("context"),
                           "method": "static decoding replayed as a CUDA graph, random weights, bf16"}
    out.pop("speculative", None)  # measured eagerly in the e2e run; not re-measured here
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--measurements", type=Path, default=RESULTS / "e2e_measurements.json")
    ap.add_argument("--speeds", type=Path, default=RESULTS / "gpu_decode_presets.json")
    ap.add_argument("--out-prefix", type=Path, default=RESULTS / "e2e_graph_speed")
    args = ap.parse_args()
    joined = join(json.loads(args.measurements.read_text()), json.loads(args.speeds.read_text()))
    md = table_markdown(joined)
    args.out_prefix.with_suffix(".json").write_text(json.dumps(joined, indent=2))
    args.out_prefix.with_suffix(".md").write_text(md)
    plot(joined, None, args.out_prefix.with_suffix(".png"))
    print(md)
    print(f"wrote {args.out_prefix}.json/.md/.png")


if __name__ == "__main__":
    main()
