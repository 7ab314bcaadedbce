"""Stop requests from signals: SIGTERM, SIGINT and SIGUSR1 finish the current step, checkpoint, exit.

Why a flag instead of dying: a cluster preempts with SIGTERM (or `--signal=USR1@N` before the time
limit) and Ctrl-C sends SIGINT; dying there loses everything since the last checkpoint. The handler
only records the request; the training loop reads it once per step, agrees on it over all ranks
(inside the step's existing all-reduce) and saves before leaving. A second SIGINT stops at once
(the user insists) unless it comes within DUPLICATE_S of the first: torchrun forwards the Ctrl-C
that its workers already received from the terminal. Repeated SIGTERM/SIGUSR1 are ignored.
"""
from __future__ import annotations

import signal
import sys
import threading
import time
from types import FrameType

# EX_TEMPFAIL: "try again later". A job script requeues on it (training/launch/slurm.sbatch).
PREEMPTED_EXIT_CODE = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
DUPLICATE_S = 2.0  # a second signal this soon after the first is the same request, delivered twice


class StopRequest:
    """Context manager: while active, the stop signals set `signal_name` instead of killing."""

    def __init__(self, announce: bool = True) -> None:
        self.signal_name: str | None = None
        self._first_at = 0.0
        self.announce = announce
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # signal.signal works only there
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.signal_name is not None:
            if signum == signal.SIGINT and time.monotonic() - self._first_at > DUPLICATE_S:
                raise KeyboardInterrupt
            return
        self.signal_name = name
        self._first_at = time.monotonic()
        if self.announce:
            again = " (Ctrl-C again to stop at once, without a checkpoint)" if signum == signal.SIGINT else ""
            print(f"\nreceived {name}: finishing the current step, then writing a checkpoint and stopping{again}",
                  file=sys.stderr, flush=True)
