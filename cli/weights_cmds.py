"""Commands on a checkpoint's weights as tensors: `supernet snr` (Spectrum selection) and `supernet merge`."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from supernet.cli.errors import friendly_errors

console = Console(stderr=True)


def snr(
    ckpt: Path = typer.Argument(..., help="Supernet checkpoint folder (or a plain HF model folder)."),
    top_percent: float = typer.Option(..., "--top-percent", help="Percent of each module type to unfreeze, in (0, 100]."),
    out: Path = typer.Option(Path("spectrum.yaml"), "--out", help="Selection YAML to write (train.trainable: FILE)."),
    only: Optional[str] = typer.Option(
        None, help="Comma-separated module types or groups to scan: e.g. gdn,kda / fa.q_proj / mlp / mixers / "
                   "shared (default: every weight matrix)."),
) -> None:
    """Spectrum: signal-to-noise ratio of every weight matrix (Marchenko-Pastur noise bound), ranked
    per module type; writes the top P percent of each type as a `train.trainable` selection."""
    from supernet.snr import SNRError, check_percent, scan, selection_document, tied_cuts, write_selection

    with friendly_errors(SNRError):
        check_percent(top_percent)
        groups = [s.strip() for s in only.split(",") if s.strip()] if only else None
        t0 = time.time()
        results, names = scan(ckpt, groups)
        doc = selection_document(ckpt, results, names, top_percent, groups)
        write_selection(out, doc)
        types = len(doc["scores"])
        console.print(f"scanned {len(results)} weight matrices of {types} module types in {time.time() - t0:.1f}s; "
                      f"{len(doc['trainable'])} parameters to unfreeze (top {top_percent:g}% per type) -> {out}")
        tied = tied_cuts(doc)
        if tied:
            console.print(f"[yellow]note: in {len(tied)} module types ({', '.join(tied[:6])}{', ...' if len(tied) > 6 else ''}) "
                          "the cut falls among equal scores (often +inf: too few singular values for the noise "
                          "estimate); those were picked by layer order[/]")


def merge(config: Path = typer.Argument(..., help="Merge YAML: out, method (linear|ties|slerp), models, ...")) -> None:
    """Merge supernets of the same layout tensor by tensor (every mixer of every layer and the shared
    weights): linear, TIES or SLERP, mergekit-style YAML; writes a normal checkpoint atomically."""
    from supernet.merge import MergeError, load_merge_spec, run_merge

    with friendly_errors(MergeError):
        t0 = time.time()
        spec = load_merge_spec(config)
        out = run_merge(spec, progress=True)
        console.print(f"merged {len(spec.models)} checkpoints ({spec.method}) -> {out} in {time.time() - t0:.1f}s")


def register(app: typer.Typer) -> None:
    app.command()(snr)
    app.command()(merge)
