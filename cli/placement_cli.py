"""The stand-alone `placement` command (so that `placement optimize ...` works as written).

`optimize` and `fit` are plain functions so that `supernet optimize` registers the very same ones.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from supernet.cli.errors import UserError, friendly_errors

app = typer.Typer(name="placement", no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
                  help="Find the best placement for each speed: fit the surrogate, optimise, write presets.json.")


def _fmt(x: float) -> str:
    return "nan" if x != x else f"{x:.4f}"


def _print_fit(console: Console, surrogate, fit_seconds: float) -> None:
    d = surrogate.diagnostics
    console.print(
        f"surrogate: {surrogate.method}, pairs {surrogate.pair_spec()}, {d['n']} evaluations, "
        f"{d['num_features']} non-zero terms, fit {fit_seconds:.2f}s"
    )
    console.print(
        f"  held-out ({d['folds']}-fold CV): Spearman {_fmt(d['cv_spearman'])}, R² {_fmt(d['cv_r2'])}, "
        f"RMSE {d['cv_rmse']:.3g} (quality std {d['quality_std']:.3g}); pair terms carry "
        f"{100 * d['pair_variance_share']:.1f}% of the predicted variance (max |J_ij| {d['pair_max_abs']:.3g})"
    )
    if d["n"] < d.get("num_terms", 0):
        console.print(f"  [yellow]note:[/] {d['n']} evaluations for {d['num_terms']} possible terms: the fit leans on "
                      "the penalty; measure more placements (a few hundred) for reliable presets")
    if d.get("alpha_at_grid_edge"):
        console.print("  [yellow]note:[/] the chosen penalty is at the edge of the search grid")


def _print_result(console: Console, run, speedups_given: bool) -> None:
    from supernet.placement.presets import preset_name

    dp = run.result.dp
    if dp.exact_grid:
        bound = "exact (the costs lie on the grid)"
    else:
        tightest = min([s.budget for s in run.result.presets] or [run.problem.min_cost()])
        bound = (f"rounding bound {dp.error_bound:.3g} {run.costs.unit} = {100 * dp.error_bound / tightest:.2g}% "
                 "of the tightest budget (each preset is at least as good as the true optimum of a budget "
                 "smaller by that much)")
    from supernet.placement.cost import cost_source, describe_cost_source

    console.print(f"costs: {describe_cost_source(cost_source(run.costs))}")
    console.print(f"optimiser: {run.result.method}, {len(dp.best)} cost cells of {dp.step:.3g} {run.costs.unit}, "
                  f"{bound}; solved in {run.result.seconds:.3f}s")
    if run.excluded:
        console.print(f"  [yellow]note:[/] {run.excluded} (layer, mixer) choices were never measured and are "
                      "excluded (--allow-unmeasured to use them)")
    table = Table("preset", "target", "speedup", "predicted quality", "mixer counts")
    for s in run.result.presets:
        table.add_row(preset_name(s.target_speedup), f"{s.target_speedup:g}x", f"{s.speedup:.3f}x",
                      f"{s.quality:.4f}", s.placement.summary())
    if speedups_given:
        console.print(table)
    if run.result.frontier:
        speeds = [s.speedup for s in run.result.frontier]
        console.print(f"Pareto frontier: {len(speeds)} placements from {min(speeds):.3f}x to {max(speeds):.3f}x")


def _print_multi(console: Console, run) -> None:
    from supernet.placement.presets import preset_name

    m = run.multi
    for name, d in m["surrogates"].items():
        console.print(f"  surrogate of {name}: CV Spearman {_fmt(d['cv_spearman'] or float('nan'))}, "
                      f"R² {_fmt(d['cv_r2'] or float('nan'))}")
    teacher = ", ".join(f"{k} {v:.4f} ({m['teacher_source'][k]})" for k, v in m["teacher"].items())
    console.print(f"objective {m['objective']}; requirements {', '.join(m['requirements']) or 'none'}; "
                  f"teacher: {teacher}")
    table = Table("preset", "speedup", *[f"predicted {c}" for c in m["metrics"]], "method", "gap", "mixer counts")
    for s in run.result.presets:
        pred = s.notes.get("predicted", {})
        table.add_row(preset_name(s.target_speedup), f"{s.speedup:.3f}x", *[f"{pred.get(c, float('nan')):.4f}"
                      for c in m["metrics"]], s.method, f"{s.notes.get('gap', 0.0):.2g}", s.placement.summary())
    console.print(table)


def optimize(
    evaluations: Optional[Path] = typer.Option(None, "--evaluations", "-e", help="evaluations.jsonl (measured placements)."),
    costs: Path = typer.Option(..., "--costs", "-c", help="costs.json (per-layer mixer costs)."),
    speedup: Optional[List[float]] = typer.Option(None, "--speedup", "-s", help="Target speedup over all-fa; repeatable."),
    pairs: str = typer.Option("nn", help="Pair terms of the surrogate: none, nn, all or within:D."),
    frontier: bool = typer.Option(False, "--frontier", help="Also write the whole predicted Pareto frontier."),
    out: Path = typer.Option(Path("presets.json"), "--out", "-o", help="presets.json to write."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="PNG of the frontier with the measured points."),
    method: str = typer.Option("ridge", help="Regression: ridge or lasso (penalty chosen by cross-validation)."),
    solver: str = typer.Option("auto", help="auto/dp (DP, + local search for long-range pairs) or milp (exact)."),
    resolution: Optional[int] = typer.Option(None, help="Cost grid steps of the DP (default: auto, ~0.1 s of work)."),
    surrogate: Optional[Path] = typer.Option(None, help="Use this fitted surrogate JSON instead of fitting."),
    save_surrogate: Optional[Path] = typer.Option(None, help="Write the fitted surrogate to this JSON."),
    allow_unmeasured: bool = typer.Option(False, help="Allow (layer, mixer) choices no evaluation contains."),
    seed: int = typer.Option(0, help="Seed of the cross-validation folds."),
    objective: Optional[str] = typer.Option(None, "--objective", help="Metric to maximise, or a weighted sum: "
                                            "quality, retrieval, dev_tasks, '0.5*quality+0.5*dev_tasks'."),
    require: Optional[List[str]] = typer.Option(None, "--require", help="Requirement on a metric, repeatable: "
                                                "'retrieval>=0.9*teacher', 'dev_tasks>=0.4'."),
) -> None:
    """Fit the surrogate, then for each --speedup the placement with the best predicted quality
    (or the best --objective meeting every --require)."""
    with friendly_errors(ValueError):
        from supernet.placement.presets import measured_points, run_optimize, write_presets

        if resolution is not None and resolution < 10:
            raise UserError("--resolution must be at least 10")
        console = Console()
        run = run_optimize(evaluations, costs, speedup or [], pairs=pairs, frontier=frontier or plot is not None,
                           method=method, solver=solver, resolution=resolution, surrogate_path=surrogate,
                           allow_unmeasured=allow_unmeasured, seed=seed, objective=objective,
                           requires=require or [])
        _print_fit(console, run.surrogate, run.fit_seconds)
        _print_result(console, run, bool(speedup) and run.multi is None)
        if run.multi is not None:
            _print_multi(console, run)
        write_presets(out, run, include_frontier=frontier)
        if save_surrogate is not None:
            run.surrogate.save(save_surrogate)
        if plot is not None:
            from supernet.placement.plot import plot_frontier

            metric = run.evaluations.rows[0].get("metric", "quality") if run.evaluations else "quality"
            plot_frontier(plot, run.result.frontier, run.result.presets,
                          measured_points(run), quality_label=f"quality ({metric})",
                          title=f"{run.surrogate.num_layers} layers, costs: {run.costs.unit}")
            console.print(f"wrote {plot}")
        console.print(f"wrote {out}")


def fit(
    evaluations: Path = typer.Option(..., "--evaluations", "-e", help="evaluations.jsonl."),
    pairs: str = typer.Option("nn", help="Pair terms: none, nn, all or within:D."),
    method: str = typer.Option("ridge", help="ridge or lasso."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the fitted surrogate JSON here."),
    seed: int = typer.Option(0, help="Seed of the cross-validation folds."),
) -> None:
    """Fit the cluster-expansion surrogate and report how well it predicts held-out placements."""
    with friendly_errors(ValueError):
        import time

        from supernet.placement.evaluations import read_evaluations
        from supernet.placement.surrogate import fit_surrogate

        ev = read_evaluations(evaluations)
        t0 = time.perf_counter()
        model = fit_surrogate(ev.placements, ev.quality, pairs=pairs, method=method, seed=seed)
        console = Console()
        _print_fit(console, model, time.perf_counter() - t0)
        if out is not None:
            model.save(out)
            console.print(f"wrote {out}")


app.command("optimize")(optimize)
app.command("fit")(fit)


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
