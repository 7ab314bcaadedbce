"""`supernet serve`: a vLLM OpenAI server for a supernet checkpoint (plugin: `serving.plugin`)."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer

from supernet.cli.errors import UserError, friendly_errors

SERVE_HELP = """Serve CKPT through vLLM's OpenAI-compatible API.

One preset per server (--preset; only its mixers are instantiated, so KV-cache memory follows its
attention layers), or every preset in one server (--switchable; a request picks its preset with
model "NAME:PRESET" or extra_body={"vllm_xargs": {"preset": ...}}). --draft-preset adds
self-speculative decoding (the draft preset proposes, the served preset verifies; greedy output is
unchanged). One-preset servers are compiled by vLLM (CUDA graphs on GPUs; add --enforce-eager to
skip); switchable servers run eagerly. Options this command does not know are passed to vLLM, e.g.
`supernet serve ckpt --preset fast --max-model-len 4096 --dtype bfloat16`."""


def register(app: typer.Typer) -> None:
    """Add this part's commands to the `supernet` app."""

    @app.command(
        "serve",
        help=SERVE_HELP,
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    )
    def serve(
        ctx: typer.Context,
        checkpoint: Path = typer.Argument(..., help="supernet checkpoint folder (config.json + safetensors + tokenizer)"),
        preset: Optional[str] = typer.Option(None, "--preset", help="preset to serve (default: the checkpoint's default placement)"),
        switchable: bool = typer.Option(False, "--switchable", help="serve every preset; requests choose"),
        draft_preset: Optional[str] = typer.Option(None, "--draft-preset", help="preset (or placement) that drafts for self-speculative decoding"),
        num_draft_tokens: int = typer.Option(4, "--num-draft-tokens", min=1, help="draft tokens per step"),
        name: str = typer.Option("supernet", "--name", help="served model name; presets are NAME:PRESET"),
        host: str = typer.Option("127.0.0.1", "--host"),
        port: int = typer.Option(8000, "--port"),
        dry_run: bool = typer.Option(False, "--dry-run", help="print the vLLM command and exit"),
    ) -> None:
        with friendly_errors(ValueError):
            cmd, env = _prepare(checkpoint, preset, switchable, draft_preset, num_draft_tokens, name, host, port, list(ctx.args))
        print(" ".join(_quote(c) for c in cmd), file=sys.stderr)
        if dry_run:
            return
        os.execvpe(cmd[0], cmd, env)  # vLLM takes over this process (Ctrl-C stops it)


def _prepare(checkpoint, preset, switchable, draft_preset, num_draft_tokens, name, host, port, extra):
    """Check the request against the checkpoint (one-line errors) and build vLLM's command line."""
    from supernet.serving.plan import check_tensor_parallel, serving_plan
    from supernet.serving.server import cpu_env, vllm_command

    if not (checkpoint / "config.json").is_file():
        raise UserError(f"{checkpoint} is not a checkpoint folder (no config.json); give the folder `supernet convert` wrote")
    if switchable and draft_preset:
        raise UserError("--draft-preset needs one served preset; drop --switchable (vLLM does not combine the two)")
    from transformers import AutoConfig

    import supernet.model  # noqa: F401  (registers the Auto classes for model_type "supernet")

    try:
        config = AutoConfig.from_pretrained(str(checkpoint))
    except Exception as exc:  # unreadable config.json
        raise UserError(f"cannot read {checkpoint}/config.json: {str(exc).splitlines()[0]}") from None
    if getattr(config, "model_type", None) != "supernet":
        raise UserError(f"{checkpoint} holds a {config.model_type!r} model, not a supernet")
    config.preset, config.switchable, config.draft_preset = preset, switchable, draft_preset
    plan = serving_plan(config)  # unknown preset / bad draft -> PlacementError, one line
    tp = _extra_int(extra, "--tensor-parallel-size") or _extra_int(extra, "-tp") or 1
    check_tensor_parallel(config, plan, tp)  # GDN/KDA heads that do not split: one line
    if switchable and "--enforce-eager" not in extra:
        # per-mixer gathers have data-dependent sizes: no compiled graph / CUDA graph to capture
        extra = [*extra, "--enforce-eager"]
    cmd = vllm_command(checkpoint, host=host, port=port, name=name, preset=preset, switchable=switchable,
                       draft_preset=draft_preset, num_draft_tokens=num_draft_tokens, extra=extra)
    env = dict(os.environ)
    import torch

    from supernet.placement.cost import setting_warning

    warning = setting_warning(getattr(config, "presets_cost_source", None) if preset or switchable else None,
                              _extra_int(extra, "--max-num-seqs"), _extra_int(extra, "--max-model-len"),
                              "cuda" if torch.cuda.is_available() else "cpu")
    if warning:
        print(warning, file=sys.stderr)

    if not torch.cuda.is_available():
        job = Path(os.environ.get("SUPERNET_SERVE_DIR", Path.home() / ".cache" / "supernet" / "serve"))
        env = cpu_env(job, env, tensor_parallel_size=tp)
    else:
        env.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    return cmd, env


def _extra_int(extra: list[str], flag: str) -> int | None:
    """The integer value of a vLLM option passed through (`--flag N` or `--flag=N`), if given."""
    for i, arg in enumerate(extra):
        value = arg.split("=", 1)[1] if arg.startswith(flag + "=") else extra[i + 1] if arg == flag and i + 1 < len(extra) else None
        if value is not None:
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _quote(arg: str) -> str:
    return f"'{arg}'" if any(c in arg for c in ' "{}[]') else arg
