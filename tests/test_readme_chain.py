"""The README's chain, command by command as a user types it: convert -> distill -> eval-placements
-> costs -> placement optimize -> install-presets -> serve, then one greedy request to an installed
preset, whose tokens must equal our reference model's with that preset.

Tiny sizes: a tiny Llama teacher with head_dim 32 (vLLM's CPU attention minimum), two distillation
steps, 14 evaluated placements, analytic costs; the vLLM CPU server dominates the time.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from supernet.serving.server import VllmServer, cpu_env, free_port
from supernet.training.tiny import tiny_teacher_dir, write_synthetic_corpus

pytestmark = [pytest.mark.slow, pytest.mark.vllm]
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def command(name: str) -> list[str]:
    """The installed console script (`supernet`, `placement`), as the README runs it."""
    script = BIN / name
    if script.exists():
        return [str(script)]
    found = shutil.which(name)
    assert found, f"console script {name!r} is not installed; pip install -e ."
    return [found]


def sh(*args, cwd: Path) -> str:
    t0 = time.monotonic()
    proc = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=600)
    print(f"{time.monotonic() - t0:6.1f}s  {' '.join(map(str, args[1:3]))}")  # shown when the test fails
    assert proc.returncode == 0, f"{' '.join(map(str, args[:3]))}: " + proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout + proc.stderr


def test_convert_distill_evaluate_optimize_install_and_serve(tmp_path, tmp_path_factory):
    teacher = tiny_teacher_dir(num_attention_heads=2, num_key_value_heads=1)  # hidden 64 -> head_dim 32
    train, evaluation = write_synthetic_corpus(tmp_path / "data", n_train=40, n_eval=12)
    supernet, placement = command("supernet"), command("placement")
    work = tmp_path
    sh(*supernet, "convert", teacher, "out/ckpt", "--swa-window", 8, cwd=work)
    sh(*supernet, "distill", REPO / "training/configs/smoke_cpu.yaml", "--out-dir", "out/distill", "--max-steps", 2,
       "--set", "student.path=out/ckpt", "--set", f"teacher.path={teacher}", "--set", f"data.train=[{train}]",
       "--set", f"data.eval=[{evaluation}]", "--set", "data.seq_len=32", "--set", "eval.every=0",
       "--set", "checkpoint.every=0", cwd=work)
    ckpt = work / "out/distill/final"
    assert (ckpt / "config.json").exists()
    sh(*supernet, "eval-placements", ckpt, "--data", evaluation, "--n", 14, "--out", "evaluations.jsonl",
       "--seq-len", 32, "--sequences", 2, "--batch-size", 2, "--device", "cpu", cwd=work)
    sh(*supernet, "costs", ckpt, "--context", 256, "--batch", 8, "--out", "costs.json", cwd=work)
    sh(*placement, "optimize", "--evaluations", "evaluations.jsonl", "--costs", "costs.json", "--speedup", 1.2,
       "--out", "presets.json", cwd=work)
    presets = json.loads((work / "presets.json").read_text())["presets"]
    assert presets, "optimize wrote no preset"
    out = sh(*supernet, "install-presets", ckpt, "presets.json", cwd=work)
    name, expected_placement = presets[0]["name"], presets[0]["placement"]
    assert f"--preset {name}" in out
    assert json.loads((ckpt / "config.json").read_text())["presets"][name] == expected_placement

    # the reference: our model, the installed preset, greedy
    from supernet.model import SupernetForCausalLM
    from supernet.generation import greedy_tokens

    model = SupernetForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    prompt = [1] + list(b"the quick cat sees the")
    expected = greedy_tokens(model, torch.tensor([prompt]), name, 8)

    port = free_port()
    serve_dir = tmp_path_factory.mktemp("vllm")  # short: vLLM's IPC socket paths live under TMPDIR
    env = {**cpu_env(serve_dir), "SUPERNET_SERVE_DIR": str(serve_dir)}
    cmd = [*supernet, "serve", str(ckpt), "--preset", name, "--port", str(port),
           "--max-model-len", "128", "--dtype", "float32", "--enforce-eager", "--max-num-seqs", "2"]
    server = VllmServer(cmd, env, serve_dir / "server.log", "127.0.0.1", port).start(timeout=420)
    try:
        from openai import OpenAI

        client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        assert f"supernet:{name}" in {m.id for m in client.models.list().data}
        reply = client.completions.create(model=f"supernet:{name}", prompt=prompt, max_tokens=8, temperature=0,
                                          extra_body={"return_token_ids": True, "ignore_eos": True})
        assert list(reply.choices[0].token_ids) == list(expected)
    finally:
        server.stop()
