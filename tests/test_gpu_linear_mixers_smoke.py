"""benchmarks/gpu_linear_mixers.py --smoke on the CPU: every item runs and the JSON has every section."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_smoke_run_writes_checks_timings_and_kernel_breakdown(tmp_path):
    out = tmp_path / "linear.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/gpu_linear_mixers.py", "--smoke", "--only-smollm2", "--time-limit", "0",
         "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["complete"] and data["all_checks_ok"] and not data["errors"] and not data["skipped"]
    checks = {(r["mixer"], r["check"]) for r in data["correctness"]}
    assert {("conv", "3 decode steps (in-place update)"), ("conv", "prefill T=300"), ("norm", "gated rmsnorm (sigmoid)"),
            ("kda", "in-kernel gates T=300 (chunk)"), ("gdn", "6 decode steps as a CUDA graph vs eager")} <= checks
    # the required rows come first: (a) checks, then (b), then (c)
    groups = [item["group"] for item in data["items"]]
    assert groups == sorted(groups) and groups[0] == "a" and groups[-1] == "c"
    assert {r["mixer"] for r in data["prefill"]} == {"gdn", "kda"}
    assert all("layer_graph_ms" in r and r["layer_graph_ms"] is None for r in data["decode"])  # no graphs on CPU
    assert all(r["layer_torch_ms"] > 0 for r in data["prefill"] + data["decode"])  # fused paths off, same run
    cases = {(r["mixer"], r["case"], r["target"]) for r in data["profile"]}
    assert {("kda", "decode batch=4", "layer"), ("gdn", "prefill batch=1 tokens=64", "op"),
            ("gdn", "decode batch=1", "layer (torch paths)")} <= cases
    assert all(r["top"] and r["kernels_per_call"] > 0 for r in data["profile"])
