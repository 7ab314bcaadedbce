"""Python's garbage collector on a schedule instead of whenever allocations trigger it.

Why: an automatic full collection walks every live Python object (a model, its hooks, DTensor
metadata) and can stall the host for a noticeable time at a random step. Under torchrun the other
ranks then wait for that rank at the next collective, so every rank pays for every rank's pauses.
Collecting the young generations every N steps puts the pause at the same step on all ranks.
"""
from __future__ import annotations

import gc


class ScheduledGC:
    """`every=0` leaves Python's automatic collection alone; `every=N` disables it for the
    lifetime of the object (a context manager) and collects generations 0-1 every N steps."""

    def __init__(self, every: int) -> None:
        self.every = every
        self._was_enabled = True

    def __enter__(self) -> "ScheduledGC":
        self._was_enabled = gc.isenabled()
        if self.every > 0:
            gc.collect()
            gc.disable()
        return self

    def step(self, step: int) -> None:
        if self.every > 0 and step % self.every == 0:
            gc.collect(1)

    def __exit__(self, *exc: object) -> None:
        if self.every > 0 and self._was_enabled:
            gc.enable()
