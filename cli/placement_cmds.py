"""Placement commands of `supernet`: eval-placements, costs, optimize (same as `placement optimize`)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

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
) -> None:
    """Measure the quality of sampled placements against the teacher (resumable)."""
    with friendly_errors(ValueError, OSError):
        from supernet.placement.cost import analytic_costs, load_config, load_costs
        from supernet.measure.quality import build_evaluator
        from supernet.placement.evaluate import run_campaign

        names = _parse_mixers(mixers)
        if n < 1:
            raise UserError("--n must be >= 1")
        config = load_config(ckpt)
        table = load_costs(costs) if costs is not None else analytic_costs(config, context, batch, "decode")
        evaluator, _ = build_evaluator(ckpt, data, seq_len, sequences, top_k, batch_size, teacher, gguf_file, device)
        console.print(f"evaluating on {evaluator.ids.numel()} tokens, metric {evaluator.metric}, "
                      f"reference {evaluator.reference}")
        probe = {"metric": evaluator.metric, "reference": evaluator.reference, "data_id": evaluator.data_id}
        new = run_campaign(evaluator, out, n, config.num_hidden_layers, names, table, active_fraction, rounds,
                           pairs, seed, probe=probe, log=console.print)
        console.print(f"measured {new} placements; {out} is ready for `placement optimize`")


def costs(
    ckpt: Path = typer.Argument(..., help="Supernet checkpoint folder (or its config.json for analytic costs)."),
    context: int = typer.Option(4096, "--context", help="Context length N."),
    batch: int = typer.Option(1, "--batch", help="Batch size B."),
    mode: str = typer.Option("decode", help="decode (bytes or time per generated token) or prefill (FLOPs / time)."),
    measure: bool = typer.Option(False, "--measure", help="Time each mixer on this device instead of the analytic model."),
    out: Path = typer.Option(Path("costs.json"), "--out", "-o", help="costs.json to write."),
    repeats: int = typer.Option(10, help="Timed repeats per mixer (median) with --measure."),
    layers: str = typer.Option("all", help="With --measure: 'all' or a comma list of layers to time (others copy)."),
    calibrate: bool = typer.Option(False, "--calibrate", help="With --measure (decode): also time the whole model "
                                   "under each all-<mixer> placement and scale that mixer's costs to match it."),
    dtype_bytes: int = typer.Option(2, help="Bytes per weight / KV element of the analytic model."),
    device: Optional[str] = typer.Option(None, help="cuda / cpu (default: cuda when available)."),
) -> None:
    """Per-layer mixer costs (analytic from the config, or measured) -> costs.json."""
    with friendly_errors(ValueError, OSError):
        from supernet.placement.cost import MODES, analytic_costs, load_config, measure_costs
        from supernet.layout import MIXERS

        if mode not in MODES:
            raise UserError(f"unknown --mode {mode!r}; use decode or prefill")
        if context < 1 or batch < 1 or repeats < 1:
            raise UserError("--context, --batch and --repeats must be >= 1")
        if calibrate and not (measure and mode == "decode"):
            raise UserError("--calibrate needs --measure in decode mode (it scales measured per-step costs)")
        config = load_config(ckpt)
        if measure:
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
                from supernet.placement.cost import calibrate_in_stack

                single = {m: table.speedup([m] * config.num_hidden_layers) for m in table.mixers}
                table = calibrate_in_stack(table, model)
                for m, f in table.meta["calibration"]["factors"].items():
                    console.print(f"in-stack {m}: x{f:.3f} of its single-layer cost "
                                  f"(all-{m} {single[m]:.3f}x -> {table.speedup([m] * config.num_hidden_layers):.3f}x)")
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
        console.print(f"wrote {out} ({table.meta.get('source')}, {mode}, N={context}, B={batch})")


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
            console.print(f"dry run: {report.config_path} unchanged; would add or update {len(installed)} preset(s)")
        elif report.written:
            console.print(f"wrote {report.config_path}: installed {', '.join(installed) or 'nothing new'}"
                          + (f", removed {', '.join(report.names('removed'))}" if report.names("removed") else ""))
        else:
            console.print(f"{report.config_path} already holds these presets; nothing written")
        if installed and not dry_run:
            console.print(f"serve one with: supernet serve {ckpt} --preset {installed[0]}")


def register(app: typer.Typer) -> None:
    """Add this part's commands to the `supernet` app."""
    app.command("eval-placements")(eval_placements)
    app.command("costs")(costs)
    app.command("optimize")(optimize_command)
    app.command("install-presets")(install_presets)
