"""`supernet eval-tasks`: benchmark tasks through lm-evaluation-harness for one preset or placement."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from supernet.cli.errors import UserError, friendly_errors

console = Console(stderr=True)


def eval_tasks(
    ckpt: Optional[Path] = typer.Argument(None, help="Supernet checkpoint folder (with tokenizer)."),
    preset: Optional[str] = typer.Option(None, "--preset", help="Preset name stored in the checkpoint."),
    placement: Optional[str] = typer.Option(None, "--placement", help="Placement: fa,swa,... or all-<mixer>."),
    tasks: str = typer.Option("dev", "--tasks", help="Comma list of tasks and groups (dev, heldout, bigbench, "
                              "retrieval, retrieval_2k/4k/8k, bb_<task>, ruler_<kind>_<len>)."),
    include_path: list[Path] = typer.Option([], "--include-path", help="Folder of extra lm-eval YAML tasks."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Documents per task (default: all)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="lm-eval results JSON to write."),
    batch_tokens: int = typer.Option(4096, help="Tokens per forward pass when scoring log-likelihoods."),
    corpus: Optional[Path] = typer.Option(None, help="Haystack text for retrieval tasks (default pydocs-eval)."),
    device: str = typer.Option("cpu", help="cpu / cuda."),
    list_tasks: bool = typer.Option(False, "--list", help="List our tasks and groups, then exit."),
) -> None:
    """Score a preset or placement on benchmark tasks with lm-evaluation-harness; writes its results JSON."""
    with friendly_errors(ValueError, OSError, RuntimeError):
        from supernet.measure import tasks as T

        if list_tasks:
            for name, spec in T.registry().items():
                print(f"{name}\t{spec.split}")
            for g, members in T.groups().items():
                print(f"{g}\tgroup: {','.join(members)}")
            return
        if ckpt is None:
            raise UserError("give a checkpoint folder: supernet eval-tasks CKPT --preset NAME --tasks dev")
        if (preset is None) == (placement is None):
            raise UserError("give exactly one of --preset NAME or --placement P")
        if limit is not None and limit < 1:
            raise UserError("--limit must be >= 1")
        for p in include_path:
            if not p.is_dir():
                raise UserError(f"--include-path {p} is not a folder")
        names = T.expand(tasks, T.include_path_tasks(include_path))
        from supernet.cli.model_cmds import _check_placements, load_checkpoint

        _check_placements(str(ckpt), [preset or placement])
        from supernet.measure.lm_eval_model import SupernetLM

        model, tokenizer = load_checkpoint(str(ckpt), device=device)
        if tokenizer is None:
            raise UserError(f"{ckpt} has no tokenizer; save one with the checkpoint")
        lm = SupernetLM(model, tokenizer, placement=preset or placement, batch_tokens=batch_tokens)
        console.print(f"placement {lm.placement}"
                      f"; tasks {', '.join(names)}" + (f"; limit {limit}" if limit else ""))
        results = T.run_tasks(lm, names, limit=limit, include_path=include_path, corpus=corpus,
                              log=console.print)
        results["supernet"] = {"checkpoint": str(ckpt), "preset": preset, "placement": lm.placement.to_list()}
        view = Table("task", "acc", "chance", "n")
        for name, acc in T.summarise(results, names).items():
            chance = results["supernet_chance"].get(name)
            n = results.get("n-samples", {}).get(name, {}).get("effective", "")
            view.add_row(name, f"{acc:.3f}", "" if chance is None else f"{chance:.3f}", str(n))
        Console().print(view)
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=2, default=str))
            console.print(f"wrote {out}")


def register(app: typer.Typer) -> None:
    app.command("eval-tasks")(eval_tasks)
