"""Placement commands of `supernet`: eval-placements, costs, optimize (same as `placement optimize`)."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from supernet.cli.errors import UserError, friendly_errors
from supernet.cli.placement_cli import optimize as optimize_command

console = Console(stderr=True)


def _parse_mixers(text: str) -> tuple[str, ...]:
    from supernet.layout import MIXERS

    names = tuple(dict.fromkeys(m.strip().lower() for m in text.split(",") if m.strip()))
    for m in names:
        if m not in MIXERS:
            raise UserError(f"unknown mixer {m!r} in --mixers; choose from {', '.join(MIXERS)}")
    if not names:
        raise UserError("--mixers is empty; e.g. --mixers fa,swa,gdn,kda")
    return names


def eval_placements(
    ckpt: Path = typer.Argument(..., help="Supernet checkpoint folder (with tokenizer)."),
    data: Path = typer.Option(..., "--data", help="Held-out text, JSONL with a 'text' field per line."),
    n: int = typer.Option(300, "--n", help="Target number of evaluations in --out (resumes up to it)."),
    out: Path = typer.Option(Path("evaluations.jsonl"), "--out", "-o", help="evaluations.jsonl (appended)."),
    teacher: Optional[str] = typer.Option(None, help="Teacher HF folder or GGUF; default: the checkpoint's all-fa."),
    gguf_file: Optional[str] = typer.Option(None, help="GGUF file name inside the --teacher folder."),
    seq_len: int = typer.Option(256, help="Tokens per evaluated sequence."),
    sequences: int = typer.Option(16, help="Number of sequences (tokens evaluated = seq-len x sequences)."),
    top_k: int = typer.Option(64, help="Teacher tokens kept per position (0 = full vocabulary, recomputed)."),
    batch_size: int = typer.Option(4, help="Sequences per forward pass."),
    costs: Optional[Path] = typer.Option(None, help="costs.json for active learning (default: analytic decode)."),
    context: int = typer.Option(4096, help="Context length of the default analytic costs."),
    batch: int = typer.Option(1, help="Decode batch of the default analytic costs."),
    active_fraction: float = typer.Option(0.25, help="Share of --n proposed by active learning."),
    rounds: int = typer.Option(3, help="Active-learning rounds."),
    pairs: str = typer.Option("nn", help="Surrogate pair terms used by active learning."),
    mixers: str = typer.Option("fa,swa,gdn,kda", help="Mixers to sample from."),
    seed: int = typer.Option(0, help="Seed of the sampling design."),
    device: Optional[str] = typer.Option(None, help="cuda / cpu (default: cuda when available)."),
    retrieval: Optional[str] = typer.Option(None, "--retrieval", help="Also record a retrieval score: tasks or "
                                            "groups of `supernet eval-tasks`, e.g. retrieval_2k."),
    dev_tasks: Optional[str] = typer.Option(None, "--dev-tasks", help="Also record a development-task score, "
                                            "e.g. dev (held-out tasks are refused)."),
    task_limit: Optional[int] = typer.Option(None, "--task-limit", help="Documents per task for --retrieval/--dev-tasks "
                                             "(default 4, or the task set's)."),
    task_set: Optional[str] = typer.Option(None, "--task-set", help="Retrieval and development tasks of a named set "
                                           "(supernet/measure/task_sets.py: demo, e2e) instead of --retrieval/--dev-tasks."),
    sparse_share: Optional[float] = typer.Option(None, "--sparse-share", help="Share of --n that changes only "
                                                 "1..L/4 layers from all-fa (retrieval is ~0 elsewhere, so its "
                                                 "surrogate needs them); default 0.25 when retrieval is recorded, "
                                                 "else 0."),
) -> None:
    """Measure the quality of sampled placements against the teacher (resumable)."""
    with friendly_errors(ValueError, OSError):
        from supernet.measure.placement_metrics import build_placement_scorer
        from supernet.placement.cost import analytic_costs, load_config, load_costs
        from supernet.placement.evaluate import run_campaign

        names = _parse_mixers(mixers)
        if n < 1:
            raise UserError("--n must be >= 1")
        if task_set is not None and (retrieval or dev_tasks):
            raise UserError("give --task-set or --retrieval/--dev-tasks, not both")
        if task_limit is not None and task_limit < 1:
            raise UserError("--task-limit must be >= 1")
        if sparse_share is not None and not 0.0 <= sparse_share <= 1.0:
            raise UserError("--sparse-share must be in [0, 1]")
        config = load_config(ckpt)
        table = load_costs(costs) if costs is not None else analytic_costs(config, context, batch, "decode")
        scorer = build_placement_scorer(ckpt, data, seq_len, sequences, top_k, batch_size, teacher, gguf_file, device,
                                        task_set, retrieval, dev_tasks, task_limit, log=console.print)
        console.print(f"evaluating on {scorer.evaluator.ids.numel()} tokens, metric {scorer.evaluator.metric}, "
                      f"reference {scorer.evaluator.reference}")
        if scorer.metrics is not None:
            console.print(f"task metrics per placement: {scorer.metrics.spec}")
        if sparse_share is None:  # retrieval is a threshold metric: give its surrogate the few-changed placements
            sparse_share = 0.25 if scorer.records_retrieval else 0.0
        new = run_campaign(scorer, out, n, config.num_hidden_layers, names, table, active_fraction, rounds,
                           pairs, seed, probe=scorer.probe, log=console.print, sparse_share=sparse_share)
        console.print(f"measured {new} placements; {out} is ready for `placement optimize`")


def verify_preset(
    ckpt: Path = typer.Argument(..., help="Supernet checkpoint the evaluations were measured on."),
    evaluations: Path = typer.Option(..., "--evaluations", "-e", help="evaluations.jsonl (the candidates are appended)."),
    costs_file: Path = typer.Option(..., "--costs", "-c", help="costs.json."),
    presets: Path = typer.Option(..., "--presets", help="presets.json (from `placement optimize`); the verified "
                                 "preset is added to it."),
    require: str = typer.Option(..., "--require", help="The requirement, e.g. 'retrieval>=0.9*teacher'."),
    speedup: List[float] = typer.Option(..., "--speedup", "-s", help="Target speedup; repeatable (tried highest first)."),
    data: Path = typer.Option(..., "--data", help="The held-out text eval-placements measured on."),
    objective: str = typer.Option("quality", help="Metric (or weighted sum) to maximise among verified placements."),
    rounds: int = typer.Option(4, help="New measurements per speedup target."),
    measurements: int = typer.Option(12, help="New measurements in all."),
    confirm_limit: Optional[int] = typer.Option(None, "--confirm-limit", help="Also judge each passing candidate on this "
                                                "many documents per task (default: the task set's report documents; "
                                                "0: no confirmation)."),
    seq_len: int = typer.Option(256, help="As given to eval-placements."),
    sequences: int = typer.Option(16, help="As given to eval-placements."),
    top_k: int = typer.Option(64, help="As given to eval-placements."),
    batch_size: int = typer.Option(4, help="As given to eval-placements."),
    task_set: Optional[str] = typer.Option(None, "--task-set", help="As given to eval-placements."),
    retrieval: Optional[str] = typer.Option(None, "--retrieval", help="As given to eval-placements."),
    dev_tasks: Optional[str] = typer.Option(None, "--dev-tasks", help="As given to eval-placements."),
    task_limit: Optional[int] = typer.Option(None, "--task-limit", help="As given to eval-placements."),
    device: Optional[str] = typer.Option(None, help="cuda / cpu (default: cuda when available)."),
) -> None:
    """A preset optimised under --require and kept only if measured to meet it: solve, measure the
    candidate as eval-placements does (appended to --evaluations), refit, re-solve (placement/verify.py)."""
    with friendly_errors(ValueError, OSError):
        from supernet.measure import tasks as T
        from supernet.measure.placement_metrics import build_placement_scorer
        from supernet.measure.verified_preset import add_to_presets, confirm_scorer, verified_preset
        from supernet.placement.cost import load_costs
        from supernet.placement.multimetric import parse_objective, parse_requirement

        req, weights = parse_requirement(require), parse_objective(objective)
        table = load_costs(costs_file)
        if not presets.exists():
            raise UserError(f"{presets} does not exist; write it with `placement optimize` first")
        if rounds < 1 or measurements < 1:
            raise UserError("--rounds and --measurements must be >= 1")
        scorer = build_placement_scorer(ckpt, data, seq_len, sequences, top_k, batch_size, None, None, device,
                                        task_set, retrieval, dev_tasks, task_limit, log=console.print)
        if task_set is not None:
            from supernet.measure.task_sets import task_set as named_set

            chosen = named_set(task_set)
            names, limit = (chosen.retrieval_tasks(), chosen.dev_tasks()), chosen.report_limits()
        else:
            names, limit = (T.expand(retrieval) if retrieval else [], T.expand(dev_tasks) if dev_tasks else []), None
        if confirm_limit is not None:
            limit = confirm_limit or None
        confirm = confirm_scorer(scorer, req.metric, *names, limit, log=console.print) if limit else None
        row, record = verified_preset(evaluations, table, req.text, sorted(set(speedup), reverse=True), scorer, confirm,
                                      weights, rounds, measurements, fastest=False, log=console.print)
        add_to_presets(presets, row, record)
        if row is None:
            raise UserError(record["message"] + "; lower the speedup or relax the requirement")
        console.print(f"wrote {presets}: {row['name']} ({row['counts']}) at {row['speedup']:.3f}x, measured "
                      f"{req.metric} {row['measured'][req.metric]:.3f}"
                      + (f", confirmed {row['confirmed'][req.metric]:.3f}" if row["confirmed"] else ""))


def costs(
    ckpt: Path = typer.Argument(..., help="Supernet checkpoint folder (or its config.json for analytic costs)."),
    context: int = typer.Option(4096, "--context", help="Context length N."),
    batch: int = typer.Option(1, "--batch", help="Batch size B."),
    mode: str = typer.Option("decode", help="decode (bytes or time per generated token) or prefill (FLOPs / time)."),
    measure: bool = typer.Option(False, "--measure", help="Time each mixer on this device instead of the analytic model."),
    profile: Optional[str] = typer.Option(None, "--profile", help="Analytic costs in ms on a device profile: a shipped "
                                          "name (h200) or a profile .json (from --fit-profile)."),
    fit_profile: Optional[Path] = typer.Option(None, "--fit-profile", help="Fit a device profile of this device from "
                                               "timings and write it here (with --tables: from those costs files)."),
    tables: Optional[str] = typer.Option(None, "--tables", help="With --fit-profile: comma list of measured costs.json "
                                         "files (`costs --measure`) to fit from instead of timing now."),
    out: Path = typer.Option(Path("costs.json"), "--out", "-o", help="costs.json to write."),
    repeats: int = typer.Option(10, help="Timed repeats per mixer (median) with --measure."),
    layers: str = typer.Option("all", help="With --measure: 'all' or a comma list of layers to time (others copy)."),
    calibrate: bool = typer.Option(False, "--calibrate", help="With --measure (decode): also time the whole model "
                                   "under each all-<mixer> placement and scale that mixer's costs to match it."),
    calibrate_tokens: int = typer.Option(32, help="With --calibrate: decode steps per timed window."),
    calibrate_rounds: int = typer.Option(3, help="With --calibrate: timed passes over the all-<mixer> placements."),
    calibrate_windows: int = typer.Option(2, help="With --calibrate: timed windows per pass (the median counts)."),
    calibrate_clock: str = typer.Option("wall", help="With --calibrate: wall, or cpu (this process's CPU time: "
                                        "robust on a shared CPU machine; CPU runs only)."),
    dtype_bytes: int = typer.Option(2, help="Bytes per weight / KV element of the analytic model."),
    device: Optional[str] = typer.Option(None, help="cuda / cpu (default: cuda when available)."),
) -> None:
    """Per-layer mixer costs (analytic from the config, on a device profile, or measured) -> costs.json."""
    with friendly_errors(ValueError, OSError):
        from supernet.layout import MIXERS
        from supernet.placement.cost import MODES, analytic_costs, cost_source, describe_cost_source, load_config

        if mode not in MODES:
            raise UserError(f"unknown --mode {mode!r}; use decode or prefill")
        if context < 1 or batch < 1 or repeats < 1:
            raise UserError("--context, --batch and --repeats must be >= 1")
        if calibrate and not (measure and mode == "decode"):
            raise UserError("--calibrate needs --measure in decode mode (it scales measured per-step costs)")
        if min(calibrate_tokens, calibrate_rounds, calibrate_windows) < 1:
            raise UserError("--calibrate-tokens, --calibrate-rounds and --calibrate-windows must be >= 1")
        if sum(x is not None and x is not False for x in (measure or None, profile, fit_profile)) > 1:
            raise UserError("give one of --measure, --profile and --fit-profile")
        if tables is not None and fit_profile is None:
            raise UserError("--tables goes with --fit-profile")
        config = load_config(ckpt)
        if fit_profile is not None:
            _fit_profile(ckpt, config, fit_profile, tables, context, batch, repeats, device)
            return
        if measure:
            if calibrate_clock not in ("wall", "cpu"):
                raise UserError(f"unknown --calibrate-clock {calibrate_clock!r}; use wall or cpu")
            rounds = (calibrate_tokens, calibrate_rounds, calibrate_windows, calibrate_clock)
            table = _measure(ckpt, config, context, batch, mode, repeats, layers, calibrate, device, rounds)
        elif profile is not None:
            from supernet.placement.profile import load_profile, profile_costs

            table = profile_costs(config, load_profile(profile), context, batch, mode)
        else:
            table = analytic_costs(config, context, batch, mode, dtype_bytes=dtype_bytes)
        table.save(out)
        L = config.num_hidden_layers
        view = Table("mixer", f"per layer ({table.unit})", "all-layers speedup")
        for m in MIXERS:
            if m in table.per_layer:
                view.add_row(m, f"{float(table.per_layer[m].mean()):.4g}", f"{table.speedup([m] * L):.3f}x")
        view.add_row("fixed", f"{table.fixed:.4g}", "")
        Console().print(view)
        console.print(f"wrote {out}: costs {describe_cost_source(cost_source(table))}")


def _measure(ckpt, config, context, batch, mode, repeats, layers, calibrate, device, rounds=(32, 3, 2, "wall")):
    from supernet.measure.costs import measure_costs
    from supernet.measure.quality import load_supernet, pick_device

    chosen = None
    if layers != "all":
        try:
            chosen = [int(x) for x in layers.split(",")]
        except ValueError:
            raise UserError(f"--layers must be 'all' or a comma list of integers, got {layers!r}") from None
        if any(not 0 <= i < config.num_hidden_layers for i in chosen):
            raise UserError(f"--layers must lie in 0..{config.num_hidden_layers - 1}")
    model = load_supernet(ckpt, pick_device(device))
    table = measure_costs(model, context, batch, mode, repeats=repeats, layers=chosen)
    if calibrate:
        from supernet.measure.costs import calibrate_in_stack

        single = {m: table.speedup([m] * config.num_hidden_layers) for m in table.mixers}
        table = calibrate_in_stack(table, model, new_tokens=rounds[0], rounds=rounds[1], windows=rounds[2],
                                   clock=rounds[3])
        for m, f in table.meta["calibration"]["factors"].items():
            console.print(f"in-stack {m}: x{f:.3f} of its single-layer cost "
                          f"(all-{m} {single[m]:.3f}x -> {table.speedup([m] * config.num_hidden_layers):.3f}x)")
    return table


def _fit_profile(ckpt, config, out: Path, tables: Optional[str], context: int, batch: int, repeats: int,
                 device: Optional[str]) -> None:
    """Fit a device profile from measured decode tables: given ones, or timed now: whole all-<mixer>
    steps at batch 1 and B, context N/4 and N (on the CPU a mixer timed alone is a poor guide to its
    share of an eager whole step, so only whole steps are fitted there)."""
    import json

    from supernet.layout import MIXERS
    from supernet.placement.observations import config_shape, table_observations
    from supernet.placement.profile import fit_profile

    shape = config_shape(config)
    observations, sources, dtype_bytes = [], [], 2
    if tables is not None:
        from supernet.io_utils import read_json

        for name in [t.strip() for t in tables.split(",") if t.strip()]:
            data = read_json(Path(name), "costs file", "write one with `supernet costs CKPT --measure`", UserError)
            observations += table_observations(data, shape, name)
            dtype_bytes = {"float32": 4, "bfloat16": 2, "float16": 2}.get(str(data.get("dtype")), dtype_bytes)
            sources.append({"file": name, "device": data.get("device_name") or data.get("device"),
                            "batch": data.get("batch_size"), "context": data.get("context_length")})
        kind = "cuda" if any(str(s["device"]).startswith(("cuda", "NVIDIA")) for s in sources) else "cpu"
    else:
        from supernet.layout import Placement
        from supernet.measure.costs import device_name
        from supernet.measure.quality import load_supernet, pick_device
        from supernet.placement.profile import STEP, Observation
        from supernet.measure.throughput import compare_decode

        model = load_supernet(ckpt, pick_device(device))
        kind = next(model.parameters()).device.type
        dtype_bytes = next(model.parameters()).element_size()  # bytes moved per weight / cache element
        clock = "cpu" if kind == "cpu" else "wall"  # CPU time: other processes' slices do not count
        L = config.num_hidden_layers
        uniform = {m: Placement.uniform(m, L) for m in MIXERS}
        for b, n in sorted({(b, n) for b in (1, batch) for n in (max(8, context // 4), context)}):
            speeds = compare_decode(model, uniform, batch=b, context=n, new_tokens=8, rounds=3, windows=1, clock=clock)
            where = f"timed here B={b} N={n}"
            observations += [Observation(STEP, shape, b, n, float(speeds[m]["ms_per_step"]), {m: L}, f"all-{m}", where)
                             for m in MIXERS]
            sources.append({"device": device_name(next(model.parameters()).device), "batch": b, "context": n,
                            "clock": clock})
            console.print(f"{where}: " + ", ".join(f"all-{m} {speeds[m]['ms_per_step']:.3g} ms" for m in MIXERS))
    if not observations:
        raise UserError("no timings to fit a profile from; give --tables or let the command time this device")
    name = out.stem
    prof = fit_profile(observations, name, f"fitted by `supernet costs --fit-profile` on {sources[0]['device']}",
                       device=kind, dtype_bytes=dtype_bytes)
    prof.fit["sources"] = sources
    prof.save(out)
    view = Table("timing", "B", "N", "measured ms", "profile ms", "error")
    for r in prof.fit["rows"]:
        view.add_row(f"{r['source']}: {r['label']}", str(r["batch"]), str(r["context"]), f"{r['measured_ms']:.4g}",
                     f"{r['predicted_ms']:.4g}", f"{100 * r['error']:+.1f}%")
    Console().print(view)
    console.print(f"wrote {out}: {prof.summary()}")
    console.print(f"use it with `supernet costs CKPT --profile {out}`; {json.dumps(prof.fit['max_abs_error'])} worst "
                  "relative error over the timings it was fitted on")


def install_presets(
    ckpt: Path = typer.Argument(..., help="Supernet checkpoint folder; its config.json gets the presets."),
    presets: Path = typer.Argument(..., help="presets.json from `placement optimize --out`."),
    replace: bool = typer.Option(False, "--replace", help="Drop the checkpoint's existing presets first."),
    overwrite: bool = typer.Option(False, "--overwrite",
                                   help="Replace an installed preset of the same name but another placement."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show what would change; write nothing."),
) -> None:
    """Install optimised presets into a checkpoint (config.json only), ready for `supernet serve --preset`."""
    with friendly_errors(ValueError, OSError):
        from supernet.install_presets import install_presets as install

        report = install(ckpt, presets, replace=replace, overwrite=overwrite, dry_run=dry_run)
        view = Table("preset", "status", "fa/swa/gdn/kda", "predicted speedup", "predicted quality")
        for c in report.changes:
            n = c.placement.counts()
            speedup, quality = c.info.get("speedup"), c.info.get("predicted_quality")
            view.add_row(c.name, c.status, f"{n['fa']}/{n['swa']}/{n['gdn']}/{n['kda']}",
                         f"{speedup:.2f}x" if isinstance(speedup, (int, float)) else "",
                         f"{quality:.4f}" if isinstance(quality, (int, float)) else "")
        Console().print(view)
        installed = report.names("added", "updated")
        if dry_run:
            console.print(f"dry run: {report.config_path} unchanged; would add or update {len(installed)} preset(s)",
                          soft_wrap=True)
        elif report.written:
            console.print(f"wrote {report.config_path}: installed {', '.join(installed) or 'nothing new'}"
                          + (f", removed {', '.join(report.names('removed'))}" if report.names("removed") else ""),
                          soft_wrap=True)
        else:
            console.print(f"{report.config_path} already holds these presets; nothing written", soft_wrap=True)
        if installed and not dry_run:
            # soft_wrap: a command line to copy must not be broken at the terminal's width
            console.print(f"serve one with: supernet serve {ckpt} --preset {installed[0]}", soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add this part's commands to the `supernet` app."""
    app.command("eval-placements")(eval_placements)
    app.command("costs")(costs)
    app.command("optimize")(optimize_command)
    app.command("verify-preset")(verify_preset)
    app.command("install-presets")(install_presets)
