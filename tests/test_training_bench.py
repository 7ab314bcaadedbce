"""The H100 training benchmark runs end to end on the CPU with tiny shapes (--smoke)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from supernet.measure.training_runs import compare_runs, timeline_breakdown

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_training_smoke(tmp_path):
    out = tmp_path / "training_smoke.json"
    proc = subprocess.run([sys.executable, "benchmarks/bench_training.py", "--smoke", "--out", str(out),
                           "--work-dir", str(tmp_path / "work")], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stage-1 throughput" in proc.stdout and "held-out KL" in proc.stdout
    res = json.loads(out.read_text())
    ours, base = res["ours"], res["baseline"]
    assert ours["tokens_per_s"] > 0 and base["tokens_per_s"] > 0 and res["speedup_vs_baseline"] > 0
    assert set(ours["kl_before"]) == {"all-fa", "all-swa", "all-gdn", "all-kda"}
    assert ours["kl_before"]["all-fa"] < 1e-6  # the converted teacher
    assert ours["kl_after"]["all-gdn"] < ours["kl_before"]["all-gdn"]
    assert ours["flops_per_token"] > 0 and len(ours["losses"]) == ours["steps"] == len(ours["placements"])
    off = res["offline"]
    assert off["bytes_per_token"] == 8 * 4 + 9 and off["cache_tokens_per_s"] > 0 and off["train_tokens_per_s"] > 0
    # comparing a run with itself: identical losses, efficiency 1
    cmp = compare_runs(res["ours"], str(out))
    assert cmp["scaling_efficiency"] == pytest.approx(1.0) and cmp["max_rel_loss_diff"] == 0.0


@pytest.mark.slow
def test_bench_training_time_limit_leaves_a_partial_result(tmp_path):
    out = tmp_path / "training_partial.json"
    proc = subprocess.run([sys.executable, "benchmarks/bench_training.py", "--smoke", "--budget-tokens", "0",
                           "--offline-topk", "0", "--time-limit", "0", "--out", str(out),
                           "--work-dir", str(tmp_path / "work")], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["partial"] is True and res["baseline"]["tokens_per_s"] > 0
    ours = res["ours"]
    assert ours["status"].startswith("stopped: time limit") and ours["timed_steps"] == 1 and ours["tokens_per_s"] > 0


@pytest.mark.slow
def test_plot_loss_curves_draws_runs_against_the_reference_and_refuses_other_placements(tmp_path):
    def plot_main(argv):
        proc = subprocess.run([sys.executable, "benchmarks/plot_loss_curves.py", *argv], cwd=REPO,
                              capture_output=True, text=True, timeout=120)
        if proc.returncode:
            raise SystemExit(proc.stderr.strip().splitlines()[-1])

    def write(name, losses, placements):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"ours": {"losses": losses, "placements": placements, "world_size": 1}}))
        return path

    ref = write("ref", [3.0, 2.5, 2.0], ["fa", "gdn", "kda"])
    run = write("run", [3.0, 2.4, 2.1], ["fa", "gdn", "kda"])
    out = tmp_path / "curves.png"
    plot_main([str(ref), str(run), "--out", str(out)])
    assert out.stat().st_size > 1000
    other = write("other", [3.0, 2.4, 2.1], ["fa", "swa", "kda"])
    with pytest.raises(SystemExit, match="other placements"):
        plot_main([str(ref), str(other), "--out", str(out)])
    with pytest.raises(SystemExit, match="holds no losses"):
        plot_main([str(ref), str(write("empty", [], [])), "--out", str(out)])


def test_timeline_breakdown_splits_wall_time_into_compute_exposed_communication_and_idle():
    # compute 0-10 and 8-12 (two streams, overlapping); an all-gather 5-15, half hidden; nothing 15-20
    kernels = [(0.0, 10.0, False), (8.0, 12.0, False), (5.0, 15.0, True)]
    assert timeline_breakdown(kernels, 20.0) == {"compute_busy": 12.0, "comm_only": 3.0, "gpu_idle": 5.0}
    assert timeline_breakdown([], 7.0) == {"compute_busy": 0.0, "comm_only": 0.0, "gpu_idle": 7.0}
