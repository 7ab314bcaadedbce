"""The SLURM script's preemption path (with stand-in srun/scontrol) and the stop-request handler."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from supernet.training.preemption import DUPLICATE_S, PREEMPTED_EXIT_CODE, StopRequest

SBATCH = Path(__file__).resolve().parents[1] / "training" / "launch" / "slurm.sbatch"


def _stubs(d: Path, srun_body: str) -> Path:
    d.mkdir()
    (d / "scontrol").write_text('#!/usr/bin/env bash\n'
                                'if [ "$1" = show ]; then echo node1; else echo "scontrol $*" >> "$LOG"; fi\n')
    (d / "srun").write_text("#!/usr/bin/env bash\n" + srun_body)
    for f in d.iterdir():
        f.chmod(0o755)
    return d


def _run(tmp_path: Path, srun_body: str, send: int | None):
    stubs = _stubs(tmp_path / "bin", srun_body)
    log = tmp_path / "log.txt"
    log.touch()
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "LOG": str(log), "SLURM_JOB_ID": "42",
           "SLURM_JOB_NODELIST": "node1", "SLURM_NNODES": "1"}
    proc = subprocess.Popen(["bash", str(SBATCH), "cfg.yaml"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 20
    while "srun started" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.02)
    if send is not None:
        proc.send_signal(send)
    out, _ = proc.communicate(timeout=20)
    return proc.returncode, log.read_text(), out


# a stand-in training: on USR1 it "checkpoints" and exits with the preemption code
TRAINING = f"""trap 'echo "srun got USR1" >> "$LOG"; exit {PREEMPTED_EXIT_CODE}' USR1
echo "srun started $*" >> "$LOG"
for i in $(seq 200); do sleep 0.05; done
exit 0
"""


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_sbatch_forwards_the_stop_signal_and_requeues(tmp_path, sig):
    rc, log, out = _run(tmp_path, TRAINING, sig)
    assert rc == 0, out
    assert "srun got USR1" in log and "scontrol requeue 42" in log, log
    assert "torchrun --nnodes 1 --nproc_per_node 8" in log and "-m supernet.cli.main distill cfg.yaml" in log


def test_sbatch_requeues_on_the_preemption_exit_code_and_passes_other_failures(tmp_path):
    rc, log, _ = _run(tmp_path, f'echo "srun started" >> "$LOG"; exit {PREEMPTED_EXIT_CODE}\n', None)
    assert rc == 0 and "scontrol requeue 42" in log
    other = tmp_path / "other"
    other.mkdir()
    rc, log, _ = _run(other, 'echo "srun started" >> "$LOG"; exit 3\n', None)
    assert rc == 3 and "requeue" not in log


def test_stop_request_records_the_first_signal_and_restores_the_handlers():
    before = signal.getsignal(signal.SIGUSR1)
    with StopRequest(announce=False) as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # ignored: already stopping
        os.kill(os.getpid(), signal.SIGINT)  # within DUPLICATE_S: torchrun's copy of the Ctrl-C
        assert stop.signal_name == "SIGUSR1"
        stop._first_at -= DUPLICATE_S + 1
        with pytest.raises(KeyboardInterrupt):  # a later Ctrl-C: stop at once
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGUSR1) is before
