"""Where a switchable server's decode step spends its time: vLLM's engine in this process
(VLLM_ENABLE_V1_MULTIPROCESSING=0, so the model runs here), timers wrapped around the model's
parts, decode steps only (one token per request).

Batches: each preset alone, then one mixing them round robin (as `bench_serving.py --mixed`), then
the mixed one again with FA/SWA over the whole step's layout (the code before they ran over their
own rows: `_rows_attention` answering None).
Per batch it prints seconds per decode step in: the whole forward, the route, FA/SWA over all
tokens and over some rows (and vLLM's attention kernel + KV write inside both), GDN/KDA over all
tokens and over some rows (and their core op inside), and the scatter of rows into the step.

    SUPERNET_DATA=/work/shared/data python benchmarks/profile_switchable.py --context 1024 --batch 4
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TIMES: dict[str, float] = defaultdict(float)  # wall seconds
CPU: dict[str, float] = defaultdict(float)  # this thread's CPU seconds: with --threads 1, the step's
# work alone, whatever else the host runs (a shared host's other jobs stretch wall time only)
STATE = {"decode": False, "steps": 0}


def _timed(owner, attr: str, key: str) -> None:
    """Wrap owner.attr so its time (decode steps only) adds to TIMES[key]."""
    original = getattr(owner, attr)

    def wrapper(*args, **kwargs):
        if not STATE["decode"]:
            return original(*args, **kwargs)
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            return original(*args, **kwargs)
        finally:
            TIMES[key] += time.perf_counter() - t0
            CPU[key] += time.thread_time() - c0

    setattr(owner, attr, wrapper)


def install_timers(batch: int) -> None:
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl

    from supernet.serving import linear_layers, routing, vllm_model

    model_forward = vllm_model.SupernetModel.forward

    def forward(self, input_ids, positions, *args, **kwargs):
        # decode steps of the whole batch only (not the ramp-up behind prefills, nor the tail)
        STATE["decode"] = positions.shape[0] == batch and self.router is not None
        if not STATE["decode"]:
            return model_forward(self, input_ids, positions, *args, **kwargs)
        STATE["steps"] += 1
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            return model_forward(self, input_ids, positions, *args, **kwargs)
        finally:
            TIMES["forward"] += time.perf_counter() - t0
            CPU["forward"] += time.thread_time() - c0
            STATE["decode"] = False

    vllm_model.SupernetModel.forward = forward
    _timed(routing.Router, "route", "route")
    _timed(vllm_model.SupernetAttention, "forward", "attn.all_rows")
    _timed(vllm_model.SupernetAttention, "forward_rows", "attn.some_rows")
    _timed(CPUAttentionBackendImpl, "forward", "attn.kernel")
    _timed(CPUAttentionBackendImpl, "do_kv_cache_update", "attn.kv_write")
    _timed(linear_layers.SupernetLinearAttention, "forward", "linear.all_rows")
    _timed(linear_layers.SupernetLinearAttention, "forward_rows", "linear.some_rows")
    _timed(linear_layers, "run_rows", "linear.core")
    _timed(vllm_model.SupernetDecoderLayer, "mix", "mix")
    _timed(vllm_model.SupernetMLP, "forward", "mlp")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=Path.home() / ".cache" / "supernet" / "bench" / "smollm2-supernet")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--decode-tokens", type=int, default=8)
    p.add_argument("--presets", nargs="+", default=["all-fa", "fa+gdn", "fa+kda", "mixed"])
    p.add_argument("--threads", type=int, default=None,
                   help="OpenMP threads of the engine (bound to the first allowed cores); 1: CPU times are the step's work")
    p.add_argument("--work-dir", default="/tmp/supernet-profile-switchable")
    p.add_argument("--out", default=None, help="JSON file for the breakdown")
    args = p.parse_args(argv)

    from benchmarks.bench_serving import bench_checkpoint, corpus_prompts
    from supernet.serving.server import cpu_env

    ckpt = bench_checkpoint(args.checkpoint, 256)
    prompts = corpus_prompts(ckpt, args.batch, args.context)
    os.environ.update(cpu_env(Path(args.work_dir)))
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if args.threads:
        cores = sorted(os.sched_getaffinity(0))[: args.threads]
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, cores))
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    install_timers(args.batch)
    llm = LLM(model=str(ckpt), hf_overrides={"switchable": True}, enforce_eager=True, dtype="float32",
              max_model_len=args.context + args.decode_tokens + 16, max_num_seqs=max(args.batch, 4),
              enable_prefix_caching=False)
    batches = {p: [p] * args.batch for p in args.presets}
    batches["mix"] = [args.presets[i % len(args.presets)] for i in range(args.batch)]
    batches["mix, full layout"] = batches["mix"]
    report = {}
    from supernet.serving import vllm_model

    # warm-up: every batch once on short prompts, so one-time costs (GEMM kernels built for this
    # batch size, first touches of pages) land in no measured step
    for presets in batches.values():
        llm.generate([TokensPrompt(prompt_token_ids=ids[:64]) for ids in prompts],
                     [SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, extra_args={"preset": pr})
                      for pr in presets], use_tqdm=False)

    rows_attention = vllm_model._rows_attention
    for name, presets in batches.items():
        vllm_model._rows_attention = (lambda *a: None) if name == "mix, full layout" else rows_attention
        TIMES.clear()
        CPU.clear()
        STATE["steps"] = 0
        params = [SamplingParams(max_tokens=args.decode_tokens, temperature=0, ignore_eos=True,
                                 extra_args={"preset": pr}) for pr in presets]
        llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompts], params, use_tqdm=False)
        steps = max(STATE["steps"], 1)
        report[name] = {"decode_steps": STATE["steps"], "wall": {k: v / steps for k, v in sorted(TIMES.items())},
                        "cpu": {k: v / steps for k, v in sorted(CPU.items())}}
        print(f"{name}: " + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in report[name]["cpu"].items()) + " (CPU ms/step)",
              flush=True)
    weights = {p: batches["mix"].count(p) / args.batch for p in args.presets}
    weighted = {clock: sum(weights[p] * report[p][clock]["forward"] for p in args.presets) for clock in ("wall", "cpu")}
    for name in ("mix", "mix, full layout"):
        for clock in ("cpu", "wall"):
            print(f"{name}: forward {report[name][clock]['forward'] * 1e3:.1f} ms ({clock}) vs token-weighted "
                  f"{weighted[clock] * 1e3:.1f} ms = {report[name][clock]['forward'] / weighted[clock]:.2f}x", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"context": args.context, "batch": args.batch, "threads": args.threads,
                                              "decode_tokens": args.decode_tokens, "per_step_s": report,
                                              "token_weighted_forward_s": weighted}, indent=2))


if __name__ == "__main__":
    main()
