"""`supernet plot-run RUN_DIR`: a PNG of a training run's metrics.jsonl."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from supernet.cli.errors import friendly_errors


def register(app: typer.Typer) -> None:
    """Add `plot-run` to the `supernet` app."""

    @app.command("plot-run")
    def plot_run(
        run_dir: Path = typer.Argument(..., help="a training out_dir (holds metrics.jsonl)"),
        out: Optional[Path] = typer.Option(None, "--out", help="PNG path (default RUN_DIR/metrics.png)"),
    ) -> None:
        """Plot loss, held-out KL per evaluated placement, tokens/s and learning rate."""
        with friendly_errors(ValueError, OSError):
            from supernet.training.run_plot import plot_run as draw

            path = draw(run_dir, out)
            print(f"plot-run: wrote {path}")
