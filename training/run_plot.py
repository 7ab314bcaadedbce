"""Draw a run's `metrics.jsonl`: training loss, held-out KL per evaluated placement, tokens/s, LR.

Why a PNG and not only TensorBoard: the JSONL is always written, on every host, with no extra
dependency; one picture answers "is it learning, for which placements, how fast" in a report.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class RunPlotError(ValueError):
    """The run folder has nothing to plot; the message says why."""


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of `<run_dir>/metrics.jsonl`, a resumed run's later lines replacing earlier ones."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise RunPlotError(f"{path} does not exist; give a training out_dir (it holds metrics.jsonl)")
    train: dict[int, dict[str, Any]] = {}
    evals: dict[int, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line of a crashed run
        if not isinstance(rec, dict) or "step" not in rec:
            continue
        (train if "loss" in rec else evals)[int(rec["step"])] = rec
    return [train[s] for s in sorted(train)] + [evals[s] for s in sorted(evals)]


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the four-panel PNG (default `<run_dir>/metrics.png`) and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "loss" not in r and any(k.startswith("eval_") for k in r)]
    if not train and not evals:
        raise RunPlotError(f"{Path(run_dir) / 'metrics.jsonl'} holds no training or evaluation records yet")
    out = Path(out) if out else Path(run_dir) / "metrics.png"
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), constrained_layout=True)
    (ax_loss, ax_eval), (ax_tput, ax_lr) = axes
    steps = [r["step"] for r in train]
    window = max(1, len(train) // 20)
    if train:
        loss = [r["loss"] for r in train]
        ax_loss.plot(steps, loss, color="tab:blue", alpha=0.3 if window > 1 else 1.0, lw=0.8, label="loss")
        if window > 1:
            ax_loss.plot(steps, _smooth(loss, window), color="tab:blue", lw=1.8, label=f"loss (mean of {window})")
        if any(r.get("kl", 0) for r in train):
            ax_loss.plot(steps, _smooth([r["kl"] for r in train], window), color="tab:orange", lw=1.2,
                         label="KL term")
        ax_loss.legend(fontsize=8)
    ax_loss.set(title="training loss (sampled placements)", xlabel="step")
    metric = "eval_kl" if any("eval_kl" in r for r in evals) else "eval_ce"
    names = sorted({name for r in evals for name in r.get(metric, {})})
    for name in names:
        pts = [(r["step"], r[metric][name]) for r in evals if name in r.get(metric, {})]
        ax_eval.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=name)
    if names:
        ax_eval.legend(fontsize=8)
    else:
        ax_eval.text(0.5, 0.5, "no evaluation records", ha="center", va="center", transform=ax_eval.transAxes)
    what = ("KL to the teacher" if metric == "eval_kl" else "cross-entropy") if names else "evaluation"
    ax_eval.set(title=f"held-out {what} per placement", xlabel="step")
    if train:
        tput = [r.get("tokens_per_s", 0.0) for r in train]
        ax_tput.plot(steps, tput, color="tab:green", alpha=0.3 if window > 1 else 1.0, lw=0.8)
        if window > 1:
            ax_tput.plot(steps, _smooth(tput, window), color="tab:green", lw=1.8)
        ax_lr.plot(steps, [r.get("lr", 0.0) for r in train], color="tab:red")
    ax_tput.set(title="throughput (tokens/s per step)", xlabel="step")
    ax_lr.set(title="learning rate (base group)", xlabel="step")
    from matplotlib.ticker import MaxNLocator

    for ax in axes.flat:
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(str(Path(run_dir)))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
