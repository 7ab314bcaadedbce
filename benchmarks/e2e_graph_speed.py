"""The e2e results table with its speed column re-measured by CUDA-graph decoding.

Why: the e2e run (`benchmarks/e2e.py`, 2026-11-26) measured quality with its trained checkpoint,
but timed decoding eagerly, kernel by kernel from Python. A step of a 135M model at batch 64 is then
bound by launch overhead, and the timings disagreed with one another (see the README). Decode
speed does not depend on the weights, so `benchmarks/gpu_decode_presets.py` re-timed the same
placements with random weights, as replayed CUDA graphs, side by side in one run. This script joins
the two measured files by preset name. It writes a table, a JSON and a plot, and types no number.

The uniform placements the speed file also timed (all-gdn, all-kda...) are not e2e presets, but the
e2e run's placement evaluations (`--evaluations`, the >= 200 placements the surrogate was fitted on)
measured their quality on the same checkpoint. They are added as a second table, with that file's
metric (1 - KL / KL_uniform on the teacher's top-64 tokens), which differs from the presets' metric
(full vocabulary): all-swa is given in both metrics to show the gap.

    python benchmarks/e2e_graph_speed.py  [--measurements FILE] [--speeds FILE] [--evaluations FILE]
                                          [--out-prefix PATH]
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


def _counts(summary: str) -> dict[str, int]:
    """'fa:7 swa:23' -> {'fa': 7, 'swa': 23, 'gdn': 0, 'kda': 0}."""
    parts = dict(part.split(":") for part in summary.split())
    return {m: int(parts.get(m, 0)) for m in ("fa", "swa", "gdn", "kda")}


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
        if _counts(row["placement"]) != counts:
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


def add_evaluated_uniform(joined: dict, speeds: dict, evaluations: list[dict]) -> dict:
    """Rows for the speed file's uniform placements whose quality the placement evaluations measured."""
    by_placement = {tuple(e["placement"]): e for e in evaluations}
    rows = []
    for row in speeds["rows"]:
        counts = _counts(row["placement"])
        mixers = [m for m, c in counts.items() if c]
        if len(mixers) != 1:
            continue  # a count summary pins down only uniform placements
        num_layers = counts[mixers[0]]
        evaluated = by_placement.get((mixers[0],) * num_layers)
        if evaluated is None or any(r["preset"] == f"all-{mixers[0]}" for r in rows):
            continue  # not evaluated, or timed twice under two names (all-swa = the max-speed preset)
        rows.append({"preset": f"all-{mixers[0]}", "counts": counts, "decode_speedup": row["speedup_vs_all_fa"],
                     "ms_per_step": row["ms_per_step"], "quality": evaluated["quality"],
                     "top1_agreement": evaluated.get("top1_agreement"), "metric": evaluated.get("metric"),
                     "kl": evaluated.get("kl")})
    joined["evaluated_uniform"] = rows
    return joined


def evaluated_markdown(rows: list[dict]) -> str:
    if not rows:
        return ""
    metric = rows[0].get("metric")
    lines = ["", f"Uniform placements, quality from the placement evaluations (metric `{metric}`):", "",
             "| placement | decode speedup | quality | top-1 agree |", "|---|---|---|---|"]
    for r in rows:
        top1 = f"{100 * r['top1_agreement']:.1f}%" if r.get("top1_agreement") is not None else "-"
        lines.append(f"| {r['preset']} | {r['decode_speedup']:.2f}x | {100 * r['quality']:.1f}% | {top1} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--measurements", type=Path, default=RESULTS / "e2e_measurements.json")
    ap.add_argument("--speeds", type=Path, default=RESULTS / "gpu_decode_presets.json")
    ap.add_argument("--evaluations", type=Path, default=RESULTS / "e2e_evaluations.jsonl")
    ap.add_argument("--out-prefix", type=Path, default=RESULTS / "e2e_graph_speed")
    args = ap.parse_args()
    speeds = json.loads(args.speeds.read_text())
    joined = join(json.loads(args.measurements.read_text()), speeds)
    joined["speed_source"]["file"] = args.speeds.name
    if args.evaluations.exists():
        evaluations = [json.loads(line) for line in args.evaluations.read_text().splitlines() if line.strip()]
        add_evaluated_uniform(joined, speeds, evaluations)
    md = table_markdown(joined) + evaluated_markdown(joined.get("evaluated_uniform", []))
    args.out_prefix.with_suffix(".json").write_text(json.dumps(joined, indent=2))
    args.out_prefix.with_suffix(".md").write_text(md)
    plot(joined, None, args.out_prefix.with_suffix(".png"),
         extra=("uniform placements (evaluations, top-64 metric)", joined.get("evaluated_uniform", [])))
    print(md)
    print(f"wrote {args.out_prefix}.json/.md/.png")


if __name__ == "__main__":
    main()
