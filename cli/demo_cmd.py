"""`supernet demo`: the whole pipeline in miniature on the CPU, on the real SmolLM2 teacher."""
from __future__ import annotations

import time
from pathlib import Path

import typer

from supernet.cli.errors import UserError, friendly_errors
from supernet.pipeline import STEPS, PipelineSettings, console, run_pipeline

REPO = Path(__file__).resolve().parents[1]


def _default_data(name: str) -> str:
    import os

    for base in (os.environ.get("SUPERNET_DATA"), REPO.parent / "shared" / "data", Path.cwd() / "data"):
        if base and (Path(base) / name).exists():
            return str(Path(base) / name)
    raise UserError(f"corpus file {name} not found; set SUPERNET_DATA to a folder with pydocs-train/eval.jsonl "
                    "(or pass --train-data/--eval-data)")


def demo_settings(workdir: Path, train_data: str, eval_data: str) -> PipelineSettings:
    return PipelineSettings(
        workdir=workdir, teacher="smollm2", train_data=train_data, eval_data=eval_data, swa_window=64,
        distill_config=str(REPO / "training" / "configs" / "demo_cpu.yaml"), distill_steps=8,
        eval_n=36, eval_seq_len=128, eval_sequences=4, eval_batch=4,
        cost_context=8192, cost_batch=64, measure_costs=False, speedups=[1.5, 2.0, 3.0],
        quality_seq_len=128, quality_sequences=8, throughput_batch=1, throughput_context=256,
        throughput_tokens=16, needle_contexts=[256, 512], spec_k=4, spec_tokens=24, spec_prompts=1, device="cpu",
    )


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
        settings = demo_settings(workdir, train_data or _default_data("pydocs-train.jsonl"),
                                 eval_data or _default_data("pydocs-eval.jsonl"))
        run_pipeline(settings, steps)
        if "report" in steps:
            _generate_with_two_presets(settings)
        console.print(f"[bold green]demo finished in {time.time() - t0:.0f}s[/]; files in {workdir}/: "
                      "supernet-final/ (checkpoint with presets), evaluations.jsonl, costs.json, presets.json, "
                      "frontier.png, measurements.json, results.md, speed_quality.png")


def _generate_with_two_presets(s: PipelineSettings) -> None:
    import torch
    from transformers import AutoTokenizer

    from supernet.model import SupernetForCausalLM

    model = SupernetForCausalLM.from_pretrained(s.final).eval()
    tokenizer = AutoTokenizer.from_pretrained(s.final)
    prompt = "The Python standard library module for regular expressions is"
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    names = ["all-fa"] + [n for n in model.presets if n != "all-fa"][-1:]
    for name in names:
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=20, do_sample=False, placement=model.config.resolve(name),
                                 pad_token_id=tokenizer.eos_token_id)
        text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        console.print(f"[bold]{name}[/] ({model.presets[name].summary()}): {prompt}[italic]{text}[/]")
