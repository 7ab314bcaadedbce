"""Speed-quality picture: the predicted Pareto frontier, the measured placements and the presets."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from supernet.placement.optimize import Solution


def plot_frontier(path: str | Path, frontier: Sequence[Solution], presets: Sequence[Solution],
                  measured: tuple[Sequence[float], Sequence[float]] = ((), ()), title: str = "",
                  quality_label: str = "quality") -> None:
    """Write a PNG: x = speedup over all-fa, y = quality (higher is better)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    xs, ys = measured
    if len(xs):
        ax.scatter(xs, ys, s=10, alpha=0.45, color="tab:gray", label=f"measured ({len(xs)})")
    if frontier:
        pts = sorted(frontier, key=lambda s: s.speedup)
        ax.step([s.speedup for s in pts], [s.quality for s in pts], where="pre", color="tab:blue",
                lw=1.6, label=f"predicted frontier ({len(pts)})")
    for s in presets:
        ax.scatter([s.speedup], [s.quality], s=60, marker="*", color="tab:red", zorder=5)
        ax.annotate(f"{s.target_speedup:g}x" if s.target_speedup else "", (s.speedup, s.quality),
                    textcoords="offset points", xytext=(4, 4), fontsize=8)
    if presets:
        ax.scatter([], [], s=60, marker="*", color="tab:red", label="presets (predicted)")
    ax.set_xlabel("speedup over all-fa (from costs.json)")
    ax.set_ylabel(quality_label)
    ax.set_title(title or "speed-quality frontier")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
