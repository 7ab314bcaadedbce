"""`supernet demo`: the whole pipeline in miniature on the CPU, on the real SmolLM2 teacher."""
from __future__ import annotations

import time
from pathlib import Path

import typer

from supernet.cli.errors import UserError, friendly_errors
from supernet.pipeline import STEPS, PipelineSettings, console, demo_settings, find_corpus, run_pipeline


def demo(
    workdir: Path = typer.Option(Path("runs/demo"), help="Where every file of the run goes (resumable)."),
    train_data: str = typer.Option(None, help="Training jsonl (default: the shared pydocs corpus)."),
    eval_data: str = typer.Option(None, help="Held-out jsonl (default: the shared pydocs corpus)."),
    step: list[str] = typer.Option(None, help=f"Run only these steps: {', '.join(STEPS)}."),
) -> None:
    """Run the pipeline in miniature on the CPU: convert SmolLM2, distil a few steps, evaluate
    placements, optimise presets, measure them, and generate with two presets."""
    with friendly_errors(ValueError, RuntimeError):
        t0 = time.time()
        steps = tuple(step) if step else STEPS
        bad = [s for s in steps if s not in STEPS]
        if bad:
            raise UserError(f"unknown step {bad[0]!r}; choose from {', '.join(STEPS)}")
        settings = demo_settings(workdir, train_data or find_corpus("pydocs-train.jsonl"),
                                 eval_data or find_corpus("pydocs-eval.jsonl"))
        run_pipeline(settings, steps)
        if "report" in steps:
            _generate_with_two_presets(settings)
        console.print(f"[bold green]demo finished in {time.time() - t0:.0f}s[/]; files in {workdir}/: "
                      "supernet-final/ (checkpoint with presets), evaluations.jsonl, costs.json, presets.json, "
                      "frontier.png, measurements.json, results.md, speed_quality.png")


def _generate_with_two_presets(s: PipelineSettings) -> None:
    from transformers import AutoTokenizer

    from supernet.generation import greedy_generate
    from supernet.model import SupernetForCausalLM

    model = SupernetForCausalLM.from_pretrained(s.final).eval()
    tokenizer = AutoTokenizer.from_pretrained(s.final)
    prompt = "The Python standard library module for regular expressions is"
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    names = ["all-fa"] + [n for n in model.presets if n != "all-fa"][-1:]
    for name in names:
        new = greedy_generate(model, ids, name, 20, tokenizer.eos_token_id)[0]
        text = tokenizer.decode(new, skip_special_tokens=True)
        console.print(f"[bold]{name}[/] ({model.presets[name].summary()}): {prompt}[italic]{text}[/]")
