"""The stand-alone `placement` command (so that `placement optimize ...` works as written)."""
from __future__ import annotations

import typer

app = typer.Typer(name="placement", no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
