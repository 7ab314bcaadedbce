"""Run a block with a set number of torch intra-op threads, and restore the count afterwards.

Why: on a busy 2-core machine OpenMP threads that wait for each other make small ops many times
slower (one eigenproblem ran 30x slower in `supernet snr`), and comparisons between runs need the
same GEMM splits; the count must come back even when the block raises.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(before)
