"""Does the analytic cost model predict the measured decode steps? Leave-one-out on the H200 runs.

Fits the H200 device profile (supernet/placement/profile.py: a roofline per kernel plus per-mixer,
per-layer and per-step latencies) to the committed H200 timings, and for every placement holds out
all of its timings, refits on the rest and predicts it. Prints one row per measured step: measured,
predicted by the fit that did not see it, the error, and what counting bytes alone (the old model)
predicts. Writes benchmarks/results/cost_model_h200.json and, with --write-profile, the shipped
profile supernet/placement/profiles/h200.json (fitted on everything).

Run: .venv/bin/python benchmarks/bench_cost_model.py [--write-profile]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from supernet.placement.cost import analytic_costs  # noqa: E402
from supernet.placement.observations import H200_PEAK_FLOPS, fit_h200_profile, h200_observations  # noqa: E402
from supernet.placement.profile import STEP, leave_one_out, predict  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
PROFILE = ROOT / "placement" / "profiles" / "h200.json"
GOAL = 0.15


def bytes_only_ms(obs, all_fa_ms: float) -> float:
    """The bytes-only model's step, scaled so that its all-fa equals the measured all-fa of that run."""
    table = analytic_costs(obs.config, obs.context, obs.batch, "decode")
    L = obs.config.num_hidden_layers
    cost = table.fixed + sum(n * table.per_layer[m][0] for m, n in obs.counts.items() if n)
    return all_fa_ms * cost / table.reference_cost(L)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write-profile", action="store_true", help=f"also write {PROFILE.relative_to(ROOT)}")
    args = ap.parse_args()
    fitted, superseded = h200_observations(RESULTS)
    profile = fit_h200_profile(RESULTS)
    loo = leave_one_out(fitted, "h200", peak_flops=H200_PEAK_FLOPS)
    all_fa = {o.source: o.ms for o in fitted if o.kind == STEP and o.counts.get("fa") == o.config.num_hidden_layers}
    steps = {(o.source, o.label): o for o in fitted if o.kind == STEP}
    rows = []
    print(f"profile (all timings): {profile.summary()}")
    print(f"{'source':24s} {'preset':16s} {'fa/swa/gdn/kda':>15s} {'measured':>9s} {'LOO pred':>9s} {'error':>7s} "
          f"{'in-fit':>7s} {'bytes-only':>10s}")
    for r in loo:
        obs = steps[(r["source"], r["label"])]
        c = obs.counts
        in_fit = predict(profile, obs) / obs.ms - 1
        bo = bytes_only_ms(obs, all_fa[obs.source])
        row = {**r, "mixers": f"{c.get('fa', 0)}/{c.get('swa', 0)}/{c.get('gdn', 0)}/{c.get('kda', 0)}",
               "in_fit_error": in_fit, "bytes_only_ms": bo, "bytes_only_error": bo / obs.ms - 1}
        rows.append(row)
        print(f"{r['source']:24s} {r['label']:16s} {row['mixers']:>15s} {r['measured_ms']:9.3f} "
              f"{r['predicted_ms']:9.3f} {100 * r['error']:+6.1f}% {100 * in_fit:+6.1f}% {100 * row['bytes_only_error']:+9.1f}%")
    worst = max(abs(r["error"]) for r in rows)
    print(f"worst leave-one-out error over {len(rows)} measured steps: {100 * worst:.1f}% (goal {100 * GOAL:.0f}%)")
    extra = []
    for o in superseded:
        p = predict(profile, o)
        extra.append({"source": o.source, "label": o.label, "measured_ms": o.ms, "predicted_ms": p, "error": p / o.ms - 1})
        print(f"not fitted ({o.source} {o.label}, pre-fusion GDN/KDA kernels): measured {o.ms:.3f}, "
              f"the fused-kernel profile says {p:.3f} ({100 * (p / o.ms - 1):+.0f}%)")
    out = {"profile": {k: v for k, v in profile.to_dict().items() if k != "fit"}, "goal": GOAL,
           "worst_leave_one_out_error": worst, "leave_one_out": rows, "not_fitted": extra,
           "method": "hold out every timing of one placement (same counts, batch, context), refit the profile on the "
                     "rest, predict the held-out steps; bytes-only: the old analytic table, scaled to the run's all-fa"}
    (RESULTS / "cost_model_h200.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {RESULTS / 'cost_model_h200.json'}")
    if args.write_profile:
        profile.save(PROFILE)
        print(f"wrote {PROFILE}")


if __name__ == "__main__":
    main()
