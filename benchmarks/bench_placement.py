"""Benchmark of the placement optimiser; writes benchmarks/results/placement.json and prints tables.

0. (`--only cli`, writes benchmarks/results/placement_cli.json) the real `placement optimize`
   command as a subprocess at L = 48, 600 planted evaluations, 100 budgets (target: < 1 s on 2
   cores), split into Python start + imports, surrogate fit and DP, with wall and CPU time (CPU
   time is what a shared machine's load distorts least); the closed-form cross-validated fit and
   the per-fold refits it replaced, timed side by side in one process on the same data; with
   `--before-python /work/main/.venv/bin/python` also another checkout's command, side by side.
1. `placement optimize` for L = 48, 4 mixers, nearest-neighbour pairs, 100 budgets (target: < 1 s on
   2 CPU cores), with the surrogate fit (300 planted evaluations) timed separately. Two cost tables:
   analytic decode costs (same for every layer, as `supernet costs` writes them) and "measured-like"
   ones (each layer jittered by +-5%, so no exact grid exists and the DP rounds).
2. DP (+ local search + conditional DPs) against the exact MILP for all-pairs models: time and gap.

Run: .venv/bin/python benchmarks/bench_placement.py [--quick] [--milp-time-limit 30] [--only cli|dp]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from supernet.placement.cost import CostTable, analytic_costs  # noqa: E402
from supernet.placement.optimize import Problem, optimize, solve_milp  # noqa: E402
from supernet.placement.planted import planted_problem, planted_tables, truth  # noqa: E402
from supernet.placement.presets import run_optimize, write_presets  # noqa: E402
from supernet.placement.sampling import initial_design  # noqa: E402
from supernet.placement.surrogate import fit_surrogate  # noqa: E402
from supernet.config import SupernetConfig  # noqa: E402
from supernet.layout import MIXERS, Placement  # noqa: E402

L = 48


def timed(fn, repeats: int = 5):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def planted_surrogate(n: int = 300, seed: int = 0):
    """Fit the surrogate on n planted evaluations (quality ~ 1 - small losses, noise 1% of spread)."""
    h, pr, Jp = planted_tables(L, 4, "nn", seed, pair_scale=0.3)
    h, Jp = -np.abs(h) * 0.004, Jp * 0.001
    h[:, 0] = 0.0  # fa is the teacher's own mixer: no loss
    rng = np.random.default_rng(seed)
    rows = np.stack(initial_design(n, L, 4, rng).rows)
    clean = 1.0 + truth(h, pr, Jp, rows)
    y = clean + rng.normal(scale=0.01 * np.ptp(clean), size=n)
    t0 = time.perf_counter()
    model = fit_surrogate([Placement(tuple(MIXERS[v] for v in r)) for r in rows], y, pairs="nn")
    fit_s = time.perf_counter() - t0
    test = rng.integers(0, 4, size=(2000, L))
    rho = float(spearmanr(model.predict_indices(test), truth(h, pr, Jp, test)).statistic)
    return model, fit_s, rho


def cost_tables(seed: int = 0) -> dict[str, CostTable]:
    cfg = SupernetConfig(num_hidden_layers=L)
    analytic = analytic_costs(cfg, 32768, 8, "decode")
    rng = np.random.default_rng(seed)
    jittered = {m: v[0] * rng.uniform(0.95, 1.05, size=L) for m, v in analytic.per_layer.items()}
    measured_like = CostTable(jittered, analytic.fixed, analytic.unit, 32768, 8, {"source": "jittered"})
    return {"analytic (same every layer)": analytic, "measured-like (+-5% per layer)": measured_like}


def bench_nn(quick: bool) -> dict:
    surrogate, fit_s, rho = planted_surrogate()
    rows = []
    tmp = Path(tempfile.mkdtemp())
    sur_path = tmp / "surrogate.json"
    surrogate.save(sur_path)
    for name, table in cost_tables().items():
        problem = Problem.from_surrogate(surrogate, table, allow_unmeasured=True)
        speedups = list(np.linspace(1.0, 0.999 * problem.max_speedup(), 100))
        t_solve, res = timed(lambda: optimize(problem, speedups), 3 if quick else 5)
        t_front, res_f = timed(lambda: optimize(problem, speedups, frontier=True), 3 if quick else 5)
        costs_path = tmp / "costs.json"
        table.save(costs_path)

        def end_to_end():  # what the CLI does after its imports: read files, optimise, write presets.json
            run = run_optimize(None, costs_path, speedups, surrogate_path=sur_path, allow_unmeasured=True)
            write_presets(tmp / "presets.json", run)
            return run

        t_e2e, _ = timed(end_to_end, 3 if quick else 5)
        ok = all(s.speedup >= s.target_speedup * (1 - 1e-9) for s in res.presets)
        checked = res.presets[::10]  # optimality against the exact MILP on every 10th budget
        gaps = [solve_milp(problem, s.budget).quality - s.quality for s in checked]
        q = [s.quality for s in sorted(res.presets, key=lambda s: s.target_speedup)]
        rows.append({
            "costs": name,
            "budgets": len(speedups),
            "solve_s": t_solve,
            "solve_with_frontier_s": t_front,
            "files_to_presets_s": t_e2e,
            "dp_s": res.dp.seconds,
            "grid_cells": int(len(res.dp.best)),
            "exact_grid": res.dp.exact_grid,
            "bound_pct_of_tightest_budget": 100 * res.dp.error_bound / min(s.budget for s in res.presets),
            "frontier_points": len(res_f.frontier),
            "all_budgets_met": ok,
            "milp_checked_budgets": len(checked),
            "milp_matched": int(sum(abs(g) <= 1e-9 for g in gaps)),
            "milp_max_gap": float(max(gaps)),
            "quality_monotone": bool(np.all(np.diff(q) <= 1e-12)),
        })
    cli = shutil.which("placement", path=str(Path(sys.executable).parent))
    cli_s = None
    if cli:
        args = [cli, "optimize", "--surrogate", str(sur_path), "--costs", str(tmp / "costs.json"),
                "--allow-unmeasured", "--out", str(tmp / "cli.json")]
        for s in np.linspace(1.0, 2.0, 100):
            args += ["--speedup", f"{s:.4f}"]
        t0 = time.perf_counter()
        proc = subprocess.run(args, capture_output=True, text=True)
        cli_s = time.perf_counter() - t0 if proc.returncode == 0 else None
    return {"fit_s": fit_s, "fit_n": 300, "fit_heldout_spearman": rho, "rows": rows, "cli_process_s": cli_s}


def planted_evaluations(folder: Path, n: int = 600, seed: int = 0) -> tuple[Path, Path, list[float]]:
    """evaluations.jsonl (n planted rows, noise 1% of the spread), analytic decode costs.json and
    100 target speedups up to 0.999 x the fastest placement, as a user would hand them to the CLI."""
    h, pr, Jp = planted_tables(L, 4, "nn", seed, pair_scale=0.3)
    h, Jp = -np.abs(h) * 0.004, Jp * 0.001
    h[:, 0] = 0.0
    rng = np.random.default_rng(seed)
    rows = np.stack(initial_design(n, L, 4, rng).rows)
    clean = 1.0 + truth(h, pr, Jp, rows)
    y = clean + rng.normal(scale=0.01 * np.ptp(clean), size=n)
    folder.mkdir(parents=True, exist_ok=True)
    ev = folder / "evaluations.jsonl"
    ev.write_text("".join(json.dumps({"placement": ",".join(MIXERS[v] for v in r), "quality": float(q)}) + "\n"
                          for r, q in zip(rows, y)))
    costs = folder / "costs.json"
    table = cost_tables()["analytic (same every layer)"]
    table.save(costs)
    fastest = table.speedup([min(table.per_layer, key=lambda m: table.per_layer[m].sum())] * L)
    return ev, costs, [float(s) for s in np.linspace(1.0, 0.999 * fastest, 100)]


def _child_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _run(args: list[str]) -> tuple[float, float, str]:
    """(wall s, CPU s of the child, stdout) of one subprocess."""
    c0, t0 = _child_cpu(), time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    wall, cpu = time.perf_counter() - t0, _child_cpu() - c0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:3])} failed: {proc.stderr[-2000:]}")
    return wall, cpu, proc.stdout


def bench_cli_process(python: str, ev: Path, costs: Path, speedups: list[float], out: Path, repeats: int) -> dict:
    """Median wall/CPU of `placement optimize` and of its imports alone, with the command's own
    printed fit and DP seconds."""
    exe = str(Path(python).parent / "placement")
    cmd = [exe, "optimize", "--evaluations", str(ev), "--costs", str(costs), "--out", str(out)]
    for s in speedups:
        cmd += ["--speedup", f"{s:.6f}"]
    runs, imports = [], []
    for _ in range(repeats):
        imports.append(_run([python, "-c", "import supernet.cli.placement_cli"]))
        wall, cpu, text = _run(cmd)
        fit = re.search(r"fit ([0-9.]+)s", text)
        dp = re.search(r"solved in ([0-9.]+)s", text)
        runs.append({"wall_s": wall, "cpu_s": cpu, "fit_s": float(fit.group(1)) if fit else None,
                     "dp_s": float(dp.group(1)) if dp else None})
    med = lambda xs: statistics.median(xs)  # noqa: E731
    return {
        "python": python,
        "total_wall_s": med([r["wall_s"] for r in runs]),
        "total_cpu_s": med([r["cpu_s"] for r in runs]),
        "start_and_imports_wall_s": med([w for w, _, _ in imports]),
        "start_and_imports_cpu_s": med([c for _, c, _ in imports]),
        "fit_s": med([r["fit_s"] for r in runs]),
        "dp_s": med([r["dp_s"] for r in runs]),
        "runs": runs,
        "presets": json.loads(out.read_text()),
    }


def bench_cli(repeats: int, before_python: str | None) -> dict:
    tmp = Path(tempfile.mkdtemp())
    ev, costs, speedups = planted_evaluations(tmp)
    from supernet.placement.evaluations import read_evaluations

    data = read_evaluations(ev)
    fits = {}
    for name, refit in (("closed_form", False), ("refit_every_fold", True)):
        t, model = timed(lambda: fit_surrogate(data.placements, data.quality, pairs="nn", refit_cv=refit),
                         max(1, repeats // 2))
        c0 = time.process_time()
        fit_surrogate(data.placements, data.quality, pairs="nn", refit_cv=refit)
        fits[name] = {"wall_s": t, "cpu_s": time.process_time() - c0, "model": model}
    a, b = fits["closed_form"]["model"], fits["refit_every_fold"]["model"]
    test = np.random.default_rng(1).integers(0, 4, size=(2000, L))
    same = {"alpha": (a.alpha, b.alpha), "pair_ratio": (a.pair_ratio, b.pair_ratio),
            "max_prediction_difference": float(np.abs(a.predict_indices(test) - b.predict_indices(test)).max()),
            "cv_rmse": (a.diagnostics["cv_rmse"], b.diagnostics["cv_rmse"])}
    for f in fits.values():
        del f["model"]
    after = bench_cli_process(sys.executable, ev, costs, speedups, tmp / "after.json", repeats)
    before = None
    if before_python:
        before = bench_cli_process(before_python, ev, costs, speedups, tmp / "before.json", max(1, repeats // 2))
        pa, pb = after.pop("presets")["presets"], before.pop("presets")["presets"]
        same["preset_placements_identical_to_before"] = ([(p["name"], p["placement"]) for p in pa]
                                                         == [(p["name"], p["placement"]) for p in pb])
        same["max_predicted_quality_difference_to_before"] = max(
            abs(p["predicted_quality"] - q["predicted_quality"]) for p, q in zip(pa, pb))
    else:
        after.pop("presets")
    return {"L": L, "evaluations": 600, "budgets": len(speedups), "pairs": "nn", "in_process_fit": fits,
            "closed_form_vs_refit": same, "after": after, "before": before}


def print_cli(console, cli: dict) -> None:
    from rich.table import Table

    t = Table("command", "total wall", "total CPU", "start+imports wall", "start+imports CPU", "fit", "DP",
              title=f"`placement optimize`, L={cli['L']}, {cli['evaluations']} evaluations, "
                    f"{cli['budgets']} budgets (median of the runs; fit and DP as the command prints them)")
    for name in ("before", "after"):
        r = cli[name]
        if r:
            t.add_row(f"{name} ({r['python']})", f"{r['total_wall_s']:.2f}s", f"{r['total_cpu_s']:.2f}s",
                      f"{r['start_and_imports_wall_s']:.2f}s", f"{r['start_and_imports_cpu_s']:.2f}s",
                      f"{r['fit_s']:.2f}s", f"{r['dp_s']:.3f}s")
    console.print(t)
    f = cli["in_process_fit"]
    console.print(f"surrogate fit in one process: closed-form CV {f['closed_form']['wall_s']:.3f}s wall / "
                  f"{f['closed_form']['cpu_s']:.3f}s CPU, per-fold refits {f['refit_every_fold']['wall_s']:.3f}s / "
                  f"{f['refit_every_fold']['cpu_s']:.3f}s "
                  f"(x{f['refit_every_fold']['cpu_s'] / f['closed_form']['cpu_s']:.1f} CPU)")
    console.print(f"same fit: {cli['closed_form_vs_refit']}")
    console.print(f"load average (1 min) at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")


def bench_all_pairs(quick: bool, time_limit: float) -> list[dict]:
    cases = [(12, None), (24, 0.5), (24, None), (48, 0.5), (48, None)]
    if quick:
        cases = [(12, None), (24, 0.5)]
    out = []
    for n_layers, decay in cases:
        problem = planted_problem(n_layers, pairs="all", seed=0, pair_scale=0.3, decay=decay)
        cheapest = problem.quality(np.argmin(np.where(problem.allowed, problem.cost, np.inf), axis=1))[0]
        for s in (1.5, round(0.6 * problem.max_speedup(), 2)):
            t0 = time.perf_counter()
            sol = optimize(problem, [s]).presets[0]
            dp_s = time.perf_counter() - t0
            milp = solve_milp(problem, problem.budget(s), time_limit=time_limit)
            best = max(sol.quality, milp.quality)
            gap = milp.quality - sol.quality
            out.append({
                "L": n_layers,
                "pairs": "all" + (f", strength x{decay}^(d-1)" if decay else ", equal strength"),
                "speedup": s,
                "dp_s": dp_s,
                "milp_s": milp.seconds,
                "milp_status": milp.status,
                "dp_quality": sol.quality,
                "milp_quality": milp.quality,
                "gap": gap,
                "gap_pct": 100 * gap / abs(best - cheapest) if best != cheapest else 0.0,
                "milp_upper_bound": milp.upper_bound,
                # proven: the DP answer is at most this far below the true optimum
                "dp_gap_at_most": max(0.0, milp.upper_bound - sol.quality),
            })
            print(f"  all-pairs L={n_layers} decay={decay} s={s}: dp {dp_s:.2f}s, milp {milp.status} "
                  f"{milp.seconds:.1f}s, gap {gap:+.4g}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and MILP cases")
    parser.add_argument("--milp-time-limit", type=float, default=30.0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "placement.json")
    parser.add_argument("--only", choices=["cli", "dp"], help="cli: just the command's timing (placement_cli.json); "
                        "dp: just the optimiser tables (placement.json)")
    parser.add_argument("--repeats", type=int, default=5, help="runs of the command (median)")
    parser.add_argument("--before-python", help="another checkout's venv python, timed side by side "
                        "(e.g. /work/main/.venv/bin/python)")
    parser.add_argument("--cli-out", type=Path, default=ROOT / "benchmarks" / "results" / "placement_cli.json")
    args = parser.parse_args()
    from rich.console import Console
    from rich.table import Table

    console = Console(width=160)
    machine = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
               "numpy": np.__version__}
    if args.only != "dp":
        cli = bench_cli(args.repeats, args.before_python)
        print_cli(console, cli)
        args.cli_out.parent.mkdir(parents=True, exist_ok=True)
        args.cli_out.write_text(json.dumps({"machine": {**machine, "load_average_1min": os.getloadavg()[0]},
                                            "placement_optimize": cli}, indent=2) + "\n")
        console.print(f"wrote {args.cli_out}")
        if args.only == "cli":
            return
    nn = bench_nn(args.quick)
    console.print(f"surrogate fit (L={L}, nn pairs, {nn['fit_n']} evaluations): {nn['fit_s']:.2f}s, "
                  f"held-out Spearman {nn['fit_heldout_spearman']:.4f}")
    table = Table("costs", "100 budgets", "+ frontier", "files -> presets.json", "DP pass", "grid", "bound",
                  "frontier pts", "budgets met", "= MILP optimum", title=f"placement optimize, L={L}, 4 mixers, nn pairs")
    for r in nn["rows"]:
        table.add_row(r["costs"], f"{r['solve_s']:.3f}s", f"{r['solve_with_frontier_s']:.3f}s",
                      f"{r['files_to_presets_s']:.3f}s", f"{r['dp_s']:.3f}s",
                      f"{r['grid_cells']}{' exact' if r['exact_grid'] else ''}",
                      f"{r['bound_pct_of_tightest_budget']:.3f}%", str(r["frontier_points"]), str(r["all_budgets_met"]),
                      f"{r['milp_matched']}/{r['milp_checked_budgets']}")
    console.print(table)
    if nn["cli_process_s"]:
        console.print(f"whole `placement optimize` process (100 budgets, incl. Python start and imports): "
                      f"{nn['cli_process_s']:.2f}s")
    pairs = bench_all_pairs(args.quick, args.milp_time_limit)
    t2 = Table("L", "pair model", "speedup", "DP+local", "MILP", "status", "gap (MILP - DP)", "gap %",
               "DP below optimum by at most", title="all-pairs surrogate: approximate DP vs exact MILP")
    for r in pairs:
        t2.add_row(str(r["L"]), r["pairs"], f"{r['speedup']:g}", f"{r['dp_s']:.2f}s", f"{r['milp_s']:.1f}s",
                   r["milp_status"], f"{r['gap']:+.4g}", f"{r['gap_pct']:+.2f}%",
                   f"{r['dp_gap_at_most']:.4g}")
    console.print(t2)
    console.print("bound: worst-case rounding of the DP cost grid, % of the tightest budget (0.999 x max speedup); "
                  "answers are then polished by local search under the true costs")
    console.print("gap % = (MILP - DP) / (best found - quality of the cheapest placement); negative: the MILP "
                  "hit its time limit with a worse incumbent than the DP; the last column is proven by the MILP's "
                  "dual bound")
    result = {
        "machine": {**machine, "load_average_1min": os.getloadavg()[0]},
        "nn_optimize": nn,
        "all_pairs_dp_vs_milp": pairs,
        "milp_time_limit_s": args.milp_time_limit,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
