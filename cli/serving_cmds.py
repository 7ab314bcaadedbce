"""Sub-commands of `supernet` (filled in by its part of the system)."""
from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this part's commands to the `supernet` app."""
