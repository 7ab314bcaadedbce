"""What the training benchmark derives from its runs: one run against a reference (scaling
efficiency, loss agreement) and a profiled step's GPU timeline split into compute, exposed
communication and idle time."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def compare_runs(ours: dict[str, Any], ref_path: str) -> dict[str, Any]:
    """A training run against a reference run's JSON: scaling efficiency (tokens/s per GPU, ours over
    the reference's) and the per-step relative loss differences over the steps both ran."""
    ref = json.loads(Path(ref_path).read_text()).get("ours", {})
    if not ref.get("losses"):
        return {"reference": ref_path, "error": f"{ref_path} holds no losses (that run stopped before its "
                                                 f"first step, status {ref.get('status')!r}): rerun it"}
    n = min(len(ref["losses"]), len(ours["losses"]))
    same_placements = ref["placements"][:n] == ours["placements"][:n]
    rel = [abs(a - b) / max(abs(b), 1e-12) for a, b in zip(ours["losses"][:n], ref["losses"][:n])]
    eff = None
    if ref.get("tokens_per_s") and ours.get("tokens_per_s"):
        eff = ours["tokens_per_s"] / (ref["tokens_per_s"] * ours["world_size"] / ref["world_size"])
    return {"reference": ref_path, "scaling_efficiency": eff, "steps_compared": n,
            "same_placements": same_placements, "max_rel_loss_diff": max(rel) if rel else None,
            "mean_rel_loss_diff": sum(rel) / len(rel) if rel else None}


def _union_us(spans: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def timeline_breakdown(kernels: list[tuple[float, float, bool]], wall_us: float) -> dict[str, float]:
    """Split a profiled wall time by what the GPU was doing, from kernel intervals (start, end,
    is_communication) on all streams: `compute_busy` (some compute kernel running), `comm_only`
    (only communication kernels: collectives not hidden behind compute; NCCL kernels also run
    while they wait for another rank) and `gpu_idle` (no kernel at all: the GPU waited for the
    host). `gpu_busy_s_per_step` sums kernel times over streams, so it cannot tell these apart."""
    compute = _union_us([(a, b) for a, b, comm in kernels if not comm])
    everything = _union_us([(a, b) for a, b, _ in kernels])
    return {"compute_busy": compute, "comm_only": everything - compute, "gpu_idle": max(0.0, wall_us - everything)}
