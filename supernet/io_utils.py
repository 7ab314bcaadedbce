"""File I/O with no lost work and clear errors: atomic writes (a crash mid-write never leaves a
half-written file behind) and JSON / JSONL readers whose failures are one line that says what to do."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _read_text(path: Path, what: str, how_to_make: str, error: type[Exception]) -> str:
    try:
        return Path(path).read_text()
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist; {how_to_make}") from None
    except UnicodeDecodeError:
        raise error(f"{what} {path} is not a text file") from None


def read_json(path: Path, what: str, how_to_make: str, error: type[Exception] = ValueError):
    """Parse a JSON file, turning the usual failures into one-line errors that say what to do."""
    import json

    path = Path(path)
    text = _read_text(path, what, how_to_make, error)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{what} {path} is not valid JSON (line {exc.lineno}): {exc.msg}") from None


def read_yaml(path: Path, what: str, how_to_make: str, error: type[Exception] = ValueError):
    """Parse a YAML file, with read_json's one-line errors (a directory counts as missing)."""
    import yaml

    path = Path(path)
    if path.is_dir():
        raise error(f"{what} {path} is a folder, not a file; {how_to_make}")
    text = _read_text(path, what, how_to_make, error)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise error(f"{what} {path} is not valid YAML: {str(exc).splitlines()[0]}") from None


def read_jsonl(path: Path, what: str, how_to_make: str, error: type[Exception] = ValueError) -> list[tuple[int, object]]:
    """(line number, parsed value) of each non-blank line of a JSONL file, with read_json's one-line errors."""
    import json

    path = Path(path)
    rows = []
    for lineno, line in enumerate(_read_text(path, what, how_to_make, error).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((lineno, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise error(f"{what} {path} line {lineno} is not valid JSON ({exc.msg}); fix or delete that line") from None
    return rows
