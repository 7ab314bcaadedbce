"""One way for every command to fail: a one-line message on stderr and a non-zero exit."""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator

import typer


class UserError(Exception):
    """An error caused by the user's input; its message says what is wrong and how to fix it."""


@contextmanager
def friendly_errors(*extra: type[BaseException]) -> Iterator[None]:
    """Turn expected failures into `error: <message>` and exit code 2, never a traceback."""
    from supernet.layout import PlacementError

    try:
        yield
    except (UserError, PlacementError, FileNotFoundError, *extra) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"error: {msg}", file=sys.stderr)
        raise typer.Exit(code=2) from None
