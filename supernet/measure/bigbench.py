"""BIG-bench task data, fetched from PyPI and cached: the `bigbench` sdist holds benchmark_tasks/*/task.json.

There is no hub access, but PyPI is reachable, and BIG-bench's JSON tasks ship inside its sdist (358 MB).
The sdist cannot be `pip download`ed normally: its metadata step fails on a direct-URL dependency
(bleurt). With `--no-clean`, pip leaves the unpacked source behind anyway, and we copy the few task.json
files we use out of it into the cache (a few MB), so the download happens once.

Multiple-choice examples (`target_scores`) become rows {"input", "choices", "label"} for lm-eval's
`multiple_choice` output type; the prompt follows BIG-bench's zero-shot JSON format (task prefix,
`Q: ` before the input, `A:` before the answer).
"""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterable

from supernet.teacher import cache_dir

BIGBENCH_PACKAGE = "bigbench==1.0.0"


def bigbench_dir() -> Path:
    return cache_dir() / "bigbench"


def task_json_path(name: str) -> Path:
    return bigbench_dir() / f"{name}.json"


def fetch_bigbench_tasks(names: Iterable[str], log=print, missing_ok: bool = False) -> dict[str, Path]:
    """Path of each BIG-bench task.json, fetching the sdist from PyPI once for those not cached yet.

    `missing_ok` (screening candidates): names BIG-bench has no top-level task.json for (tasks made of
    subtasks, programmatic tasks) are left out of the answer instead of failing the fetch."""
    names = list(dict.fromkeys(names))
    missing = [n for n in names if not task_json_path(n).exists()]
    if missing:
        bigbench_dir().mkdir(parents=True, exist_ok=True)
        log(f"fetching BIG-bench tasks {', '.join(missing)} from the PyPI sdist {BIGBENCH_PACKAGE} (358 MB, once)")
        with tempfile.TemporaryDirectory(dir=bigbench_dir(), prefix=".fetch-") as tmp:
            env = {**os.environ, "TMPDIR": tmp}
            cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-clean", "--no-deps", "--no-binary", ":all:",
                   "-d", str(Path(tmp) / "dl"), BIGBENCH_PACKAGE]
            result = subprocess.run(cmd, capture_output=True, text=True, env=env)
            roots = sorted(Path(tmp).glob("pip-download-*/bigbench*/bigbench/benchmark_tasks"))
            if not roots:
                raise RuntimeError(f"could not fetch {BIGBENCH_PACKAGE} from PyPI ({result.stderr.strip()[-300:]}); "
                                   f"put BIG-bench's benchmark_tasks/<task>/task.json files as <task>.json in "
                                   f"{bigbench_dir()}")
            absent = []
            for name in missing:
                src = roots[0] / name / "task.json"
                if not src.exists():
                    if missing_ok:
                        absent.append(name)
                        continue
                    raise RuntimeError(f"BIG-bench has no JSON task {name!r}")
                part = task_json_path(name).with_suffix(".part")
                shutil.copyfile(src, part)
                os.replace(part, task_json_path(name))
            if absent:
                log(f"BIG-bench has no top-level task.json for {', '.join(absent)} (subtasks or programmatic); skipped")
    return {n: task_json_path(n) for n in names if task_json_path(n).exists()}


def multiple_choice_rows(task: dict) -> list[dict]:
    """BIG-bench examples -> {"input", "choices", "label"}; examples without one best choice are dropped."""
    prefix = task.get("task_prefix", "")
    q = task.get("example_input_prefix", "\nQ: ").lstrip("\n")
    a = task.get("example_output_prefix", "\nA: ").rstrip()
    rows = []
    for ex in task.get("examples", []):  # a task of subtasks lists none
        scores = ex.get("target_scores")
        if not scores:
            continue
        choices = list(scores)
        best = max(scores.values())
        if sum(v == best for v in scores.values()) != 1:
            continue
        text = f"{prefix}{q}{ex['input'].strip()}{a}"
        rows.append({"input": text, "choices": [c.strip() for c in choices], "label": choices.index(
            next(c for c in choices if scores[c] == best))})
    return rows


def write_multiple_choice_jsonl(name: str, out: Path, log=print) -> tuple[Path, float]:
    """The task as lm-eval jsonl; returns (path, chance accuracy: the mean of 1 / #choices)."""
    task = json.loads(fetch_bigbench_tasks([name], log)[name].read_text())
    rows = multiple_choice_rows(task)
    # lm-eval's --limit takes the first documents; a fixed shuffle makes them a fair sample of the task.
    random.Random(name).shuffle(rows)
    if not rows:
        raise RuntimeError(f"BIG-bench task {name!r} has no multiple-choice examples")
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    return out, sum(1 / len(r["choices"]) for r in rows) / len(rows)
