"""The results table and the speed-quality plot of a pipeline run (from measurements.json)."""
from __future__ import annotations

import json
from pathlib import Path


def table_markdown(measurements: dict) -> str:
    rows = measurements["presets"]
    needle_keys = list(rows[0]["needle"]) if rows else []
    head = ["preset", "fa/swa/gdn/kda", "decode speedup", "predicted", "quality (1-nKL)", "retention", "top-1 agree"]
    head += [f"needle@{k}" for k in needle_keys]
    lines = ["Decode speedup: measured in one run against all-fa (median of the timed windows, their range in"
             " brackets); predicted: the cost model's figure that the optimiser chose the preset by.",
             "",
             "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]
    for r in rows:
        c = r["counts"]
        cells = [r["preset"], f"{c['fa']}/{c['swa']}/{c['gdn']}/{c['kda']}", _speedup_cell(r),
                 f"{r.get('predicted_speedup', 1.0):.2f}x", f"{r['quality']:.4f}",
                 f"{100 * r['quality_retention']:.1f}%", f"{100 * r['top1_agreement']:.1f}%"]
        cells += [f"{100 * r['needle'][k]:.0f}%" for k in needle_keys]
        lines.append("| " + " | ".join(cells) + " |")
    spec = measurements.get("speculative", {}).get("best")
    if spec:
        lines.append("")
        lines.append(f"Self-speculative decoding, best pair: draft `{spec['draft']}` -> target `{spec['target']}` "
                     f"(k={spec['k']}): {spec['speedup']:.2f}x over the target alone, acceptance "
                     f"{100 * spec['acceptance_rate']:.0f}%, output identical: {spec['lossless']}.")
    return "\n".join(lines) + "\n"


def _speedup_cell(row: dict) -> str:
    """Measured speedup, with the range of its timed windows when the run recorded several."""
    cell = f"{row['decode_speedup']:.2f}x"
    low_high = row.get("decode_speedup_range")
    if low_high and len(row.get("ms_per_step_windows", [])) > 1 and row["preset"] != "all-fa":
        cell += f" ({low_high[0]:.2f}-{low_high[1]:.2f})"
    return cell


def plot(measurements: dict, evaluations: Path | None, out: Path) -> None:
    """Presets' measured speed vs retention."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = measurements["presets"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot([r["decode_speedup"] for r in rows], [100 * r["quality_retention"] for r in rows], "o-", color="C0",
            label="presets (measured)")
    for r in rows:
        ax.annotate(r["preset"], (r["decode_speedup"], 100 * r["quality_retention"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    ax.set_xlabel("decode throughput vs all-fa (measured)")
    ax.set_ylabel("quality retention (% of all-fa, 1 - normalised KL)")
    ax.set_title("supernet presets: speed vs quality")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=130)
    plt.close(fig)


def write_report(workdir: Path) -> Path:
    measurements = json.loads((workdir / "measurements.json").read_text())
    md = table_markdown(measurements)
    (workdir / "results.md").write_text(md)
    plot(measurements, workdir / "evaluations.jsonl", workdir / "speed_quality.png")
    print(md)
    return workdir / "results.md"
