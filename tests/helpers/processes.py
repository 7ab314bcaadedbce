"""A training stage run as a real `supernet` process and preempted, as a cluster would preempt it."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path


def sigterm_after_records(stage: str, config: Path, metrics: Path, records: int = 2,
                          timeout: float = 120.0) -> tuple[int, str]:
    """Run `supernet STAGE CONFIG`, send SIGTERM once `metrics` holds `records` lines (or at the
    deadline), and return (exit code, combined output)."""
    proc = subprocess.Popen([sys.executable, "-m", "supernet.cli.main", stage, str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            if metrics.is_file() and len(metrics.read_text().splitlines()) >= records:
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, output
