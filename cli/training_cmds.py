"""`supernet distill`, `supernet sft` and `supernet cache-logits`.

The same commands run alone or under `torchrun --nproc_per_node N -m supernet.cli.main distill CONFIG`
(see training/launch/); configuration lives in YAML (training/configs/), `--set key.path=value`
overrides single keys.

SIGTERM, SIGINT (Ctrl-C) and SIGUSR1 end a run after the current step with a checkpoint and exit
code 75 (PREEMPTED_EXIT_CODE), which a job script reads as "requeue me"; the same command resumes.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from supernet.cli.errors import UserError, friendly_errors


def _errors():
    from supernet.training.config import ConfigError
    from supernet.training.data import DataError
    from supernet.training.logit_cache import CacheError
    from supernet.training.trainer import TrainingDiverged

    # ValueError / OSError as in the other commands: bad paths, unreadable files, refused values
    return ConfigError, DataError, CacheError, TrainingDiverged, ValueError, OSError


def _run_stage(stage: str, config: Path, overrides: list[str], out_dir: Optional[str], max_steps: Optional[int],
               resume: Optional[str], resume_force: bool = False) -> None:
    with friendly_errors(*_errors()):
        from supernet.training.config import load_config
        from supernet.training.preemption import PREEMPTED_EXIT_CODE
        from supernet.training.trainer import run

        extra = list(overrides or [])
        if out_dir:
            extra.append(f"out_dir={out_dir}")
        if max_steps is not None:
            extra.append(f"train.max_steps={max_steps}")
            extra.append("train.max_tokens=null")
        if resume:
            extra.append(f"checkpoint.resume={resume}")
        if resume_force:
            extra.append("checkpoint.resume_force=true")
        cfg = load_config(config, extra, stage=stage)
        result = run(cfg)
        main = int(os.environ.get("RANK", "0")) == 0
        if result.stopped_by:
            if main:
                print(f"{stage}: stopped by {result.stopped_by} after step {result.steps}; checkpoint "
                      f"{result.checkpoint}; run the same command to resume (exit code {PREEMPTED_EXIT_CODE}: "
                      "preempted)", flush=True)
            raise typer.Exit(code=PREEMPTED_EXIT_CODE)
        if main:
            last = {k: round(v, 4) for k, v in (result.evals.get(result.steps) or {}).items()}
            print(f"{stage}: {result.steps} steps, {result.tokens_per_s:,.0f} tokens/s (this run)"
                  + (f"; held-out {result.eval_metric} {last}" if last else "")
                  + (f"; final model: {result.final_dir}" if result.final_dir else ""))


SET_HELP = "override one config key, e.g. --set loss.kl_weight=0.5 (repeatable)"
FORCE_HELP = "resume although a key that changes the computation (data, loss, sampling, ...) differs"


# (command, where its configs are, the help line): the three training stages share one signature
STAGES = (
    ("distill", "training/configs/", "Stage 1: distil the teacher into every mixer, sampling a placement per step."),
    ("sft", "training/configs/sft_*.yaml", "Stage 2: supervised fine-tuning on chat data (loss on assistant tokens)."),
    ("transfer", "training/configs/transfer_*.yaml",
     "Layer-local transfer: every trainable mixer of every layer regresses the teacher's attention output."),
)


def _stage_command(stage: str, configs: str, doc: str):
    """The typer command running one training stage (typer reads the options from this signature)."""

    def command(
        config: Path = typer.Argument(..., help=f"YAML config (see {configs})"),
        set_: list[str] = typer.Option([], "--set", help=SET_HELP),
        out_dir: Optional[str] = typer.Option(None, "--out-dir", help="override out_dir"),
        max_steps: Optional[int] = typer.Option(None, "--max-steps", help="override train.max_steps"),
        resume: Optional[str] = typer.Option(None, "--resume", help="auto | none | a checkpoint folder"),
        resume_force: bool = typer.Option(False, "--resume-force", help=FORCE_HELP),
    ) -> None:
        _run_stage(stage, config, set_, out_dir, max_steps, resume, resume_force)

    command.__doc__ = doc
    command.__name__ = stage
    return command


def register(app: typer.Typer) -> None:
    """Add this part's commands to the `supernet` app."""
    for stage, configs, doc in STAGES:
        app.command(stage)(_stage_command(stage, configs, doc))

    @app.command("cache-logits")
    def cache_logits(
        teacher: str = typer.Argument(..., help="teacher: HF folder, .gguf file, 'smollm2' or builtin:tiny-llama"),
        data: str = typer.Argument(..., help="jsonl/txt file(s) or globs, comma-separated"),
        out: Path = typer.Argument(..., help="output folder for the shards and index.json"),
        top_k: int = typer.Option(32, "--top-k", help="log-probabilities kept per token"),
        seq_len: int = typer.Option(2048, "--seq-len", help="window length (must match data.seq_len in training)"),
        temperature: float = typer.Option(1.0, "--temperature", help="must match loss.temperature in training"),
        batch_size: int = typer.Option(8, "--batch-size"),
        shard_sequences: int = typer.Option(256, "--shard-sequences", help="windows per shard file"),
        dtype: str = typer.Option("float16", "--dtype", help="float16 | float32 for the log-probabilities"),
        data_format: str = typer.Option("auto", "--format", help="auto | text | chat"),
        separator: str = typer.Option("eos", "--separator", help="token after each text document"),
        max_documents: Optional[int] = typer.Option(None, "--max-documents"),
        max_sequences: Optional[int] = typer.Option(None, "--max-sequences"),
        gguf_file: Optional[str] = typer.Option(None, "--gguf-file"),
        device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
    ) -> None:
        """Run the teacher once and store its top-K log-probabilities (+ tail mass) per token."""
        with friendly_errors(*_errors()):
            from supernet.training.distributed import init_distributed, shutdown
            from supernet.training.logit_cache import write_logit_cache
            from supernet.training.models import load_teacher_model

            if top_k < 1:
                raise UserError("--top-k must be at least 1")
            if data_format not in ("auto", "text", "chat"):
                raise UserError(f"--format {data_format!r} is not one of auto, text, chat")
            env = init_distributed(device)
            model, tokenizer = load_teacher_model(teacher, gguf_file)
            index = write_logit_cache(
                model, tokenizer, [d for d in data.split(",") if d], out, top_k=top_k, seq_len=seq_len,
                temperature=temperature, batch_size=batch_size, shard_sequences=shard_sequences,
                values_dtype=dtype, data_format=data_format, separator=separator, max_documents=max_documents,
                max_sequences=max_sequences, device=env.device, teacher_name=teacher, rank=env.rank,
                world_size=env.world_size, barrier=env.barrier, progress=True,
            )
            if env.is_main:
                tput = index["throughput_tokens_per_s"]
                print(f"cache-logits: {index['num_sequences']} windows x {seq_len} tokens = {index['num_tokens']:,} "
                      f"tokens, top-{top_k}, {index['bytes_per_token']:.0f} bytes/token "
                      f"({index['bytes_per_token'] * index['num_tokens'] / 2**20:,.1f} MiB), "
                      + (f"{tput:,.0f} tokens/s" if tput else "all shards already present") + f" -> {out}")
            shutdown(env)
