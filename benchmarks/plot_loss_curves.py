"""Per-step losses of several `bench_training.py` results on one plot, and each one's relative
difference from the first (the reference): how issue 4's "equal loss curves" is shown.

    python benchmarks/plot_loss_curves.py REF.json RUN.json [RUN.json ...] --out curves.png

The runs must have sampled the same placements (bench_training records them); a run that did not
is refused, since its losses would differ for that reason alone.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def load_run(path: Path) -> dict:
    try:
        run = json.loads(path.read_text())["ours"]
    except (OSError, ValueError, KeyError) as err:
        raise SystemExit(f"error: {path} is not a bench_training.py result ({err}); pass the JSON it wrote with --out")
    if not run.get("losses"):
        raise SystemExit(f"error: {path} holds no losses (status {run.get('status')!r}); rerun that benchmark")
    return run


def label(path: Path, run: dict) -> str:
    accum = f", accumulation {run['grad_accum']}" if run.get("grad_accum", 1) > 1 else ""
    return f"{path.stem}: {run.get('world_size', 1)} GPU(s){accum}"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path, nargs="+", help="bench_training.py JSON files; the first is the reference")
    ap.add_argument("--out", type=Path, required=True, help="PNG to write")
    args = ap.parse_args(argv)
    if len(args.results) < 2:
        raise SystemExit("error: give a reference and at least one run to compare with it")
    runs = [load_run(p) for p in args.results]
    ref = runs[0]
    for path, run in zip(args.results[1:], runs[1:]):
        n = min(len(ref["placements"]), len(run["placements"]))
        if ref["placements"][:n] != run["placements"][:n]:
            raise SystemExit(f"error: {path} sampled other placements than {args.results[0]}; "
                             "run both with the same seed and global batch")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    height = 5.5 + 0.2 * len(runs)  # inches; the legend below takes ~0.17 in a run
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, height), sharex=True, height_ratios=[2, 1])
    for i, (path, run) in enumerate(zip(args.results, runs)):
        steps = range(1, len(run["losses"]) + 1)
        top.plot(steps, run["losses"], marker="o" if i == 0 else None, ms=3, lw=1.2, label=label(path, run))
        if i:
            n = min(len(ref["losses"]), len(run["losses"]))
            rel = [100 * (a - b) / abs(b) for a, b in zip(run["losses"][:n], ref["losses"][:n])]
            bottom.plot(range(1, n + 1), rel, lw=1.2, color=f"C{i}")
    top.set_ylabel("loss (KL to the teacher)")
    top.set_title("stage-1 loss per step, same placements and global batch")
    fig.legend(*top.get_legend_handles_labels(), fontsize=8, loc="lower center", ncol=1)  # below: curves stay clear
    top.grid(alpha=0.3)
    bottom.axhline(0, color="k", lw=0.6)
    bottom.set_ylabel("vs reference (%)")
    bottom.set_xlabel("optimizer step")
    bottom.grid(alpha=0.3)
    fig.tight_layout(rect=(0, (0.25 + 0.17 * len(runs)) / height, 1, 1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=130)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
