"""`supernet transplant-vocab`: a checkpoint (supernet or HF decoder) re-fitted to another tokenizer."""
from __future__ import annotations

import time
from pathlib import Path

import typer

from supernet.cli.errors import friendly_errors


def register(app: typer.Typer) -> None:
    """Add this part's commands to the `supernet` app."""

    @app.command("transplant-vocab")
    def transplant_vocab_cmd(
        ckpt: str = typer.Argument(..., help="supernet checkpoint, HF decoder folder, .gguf file or 'smollm2'"),
        tokenizer: str = typer.Option(..., "--tokenizer", help="the new tokenizer: a folder (e.g. the teacher's), tokenizer.json, .gguf or smollm2"),
        out: Path = typer.Option(..., "--out", help="output folder (same kind as CKPT, with the new tokenizer)"),
        k: int = typer.Option(8, "--k", help="shared tokens per approximated token (matching pursuit); 0: mean of pieces"),
        pad_to: int = typer.Option(1, "--pad-to", help="round the new vocabulary size up to a multiple of this"),
    ) -> None:
        """New embeddings and lm_head for another tokenizer: shared tokens copied, the others built from the old
        tokenizer's pieces through the nearest shared tokens (supernet/vocab_transplant.py)."""
        from supernet.vocab_transplant import TransplantError

        with friendly_errors(TransplantError, ValueError, OSError):
            from supernet.vocab_transplant import transplant_vocab

            t0 = time.time()
            r = transplant_vocab(ckpt, tokenizer, out, k=k, pad_to_multiple_of=pad_to)
            print(f"transplant-vocab: {r.old_vocab} -> {r.new_vocab} tokens: {r.copied} copied, {r.by_role} special "
                  f"tokens by role, {r.approximated} approximated (k={r.k}), {r.mean_init} set to the mean row; "
                  f"{'tied' if r.tied else 'untied'} embeddings; {time.time() - t0:.1f} s -> {out}")
