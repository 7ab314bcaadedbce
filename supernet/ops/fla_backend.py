"""When to use fla's fused Triton kernels instead of the pure-torch paths.

The torch paths are the reference: they run on the CPU, under torch.compile (inductor fuses them
into the surrounding graph) and wherever fla is missing. On CUDA in eager mode a decode step of a
small model is bound by kernel launches, not by arithmetic, so one fused kernel in place of a
chain of elementwise ones is where the time goes. `SUPERNET_FUSED_KERNELS=0` turns the fused paths
off (side-by-side benchmarks, debugging).
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import os
from typing import Callable, Iterator

import torch

ENV_SWITCH = "SUPERNET_FUSED_KERNELS"


def fused_kernels_enabled() -> bool:
    """False when the user set SUPERNET_FUSED_KERNELS=0 (read on every call: benchmarks toggle it)."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


@contextlib.contextmanager
def fused_kernels(on: bool) -> Iterator[None]:
    """Run the block with the fused paths on or off (benchmarks time both side by side)."""
    old = os.environ.get(ENV_SWITCH)
    os.environ[ENV_SWITCH] = "1" if on else "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(ENV_SWITCH, None)
        else:
            os.environ[ENV_SWITCH] = old


@functools.lru_cache(maxsize=None)
def fla_function(module: str, name: str) -> Callable | None:
    """`fla.<module>.<name>`, or None when fla (or a working triton) is not importable."""
    try:
        return getattr(importlib.import_module(f"fla.{module}"), name)
    except Exception:  # ImportError, or triton failing to initialise on this machine
        return None


def use_fla(x: torch.Tensor, *, inference_only: bool = False) -> bool:
    """Take the fused path for `x`: on CUDA, not while torch.compile traces, and not switched off.

    `inference_only`: also require autograd to be off (paths whose backward we have not validated
    against the torch path on a GPU).
    """
    if not x.is_cuda or torch.compiler.is_compiling() or not fused_kernels_enabled():
        return False
    if inference_only and torch.is_grad_enabled():
        return False
    return True
