"""Where a switchable server's decode step spends its time: vLLM's engine in this process
(VLLM_ENABLE_V1_MULTIPROCESSING=0, so the model runs here), timers wrapped around the model's
parts, decode steps only (one token per request).

Batches: each preset alone, then one mixing them round robin (as `bench_serving.py --mixed`), then
the mixed one again with FA/SWA over the whole step's layout (the code before they ran over their
own rows: `_rows_attention` answering None). With `--rounds R` every batch runs once per round,
and the mixed/token-weighted ratio is taken within each round (a shared host drifts between
rounds more than within one); the report gives each round and the medians.
Per batch it prints seconds per decode step in: the whole forward, the route, FA/SWA over all
tokens and over some rows (and vLLM's attention kernel + KV write inside both), GDN/KDA over all
tokens and over some rows (and their core op inside), and the scatter of rows into the step; and
the CPU time of all the batch's other steps together (its prefill chunks): the long-prompt regime.

    SUPERNET_DATA=/work/shared/data python benchmarks/profile_switchable.py --context 1024 --batch 4
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TIMES: dict[str, float] = defaultdict(float)  # wall seconds
CPU: dict[str, float] = defaultdict(float)  # this thread's CPU seconds: with --threads 1, the step's
# work alone, whatever else the host runs (a shared host's other jobs stretch wall time only)
STATE = {"decode": False, "steps": 0}


def _clocked(key: str, fn, *args, **kwargs):
    """fn(*args, **kwargs), its wall and CPU time added to TIMES[key] and CPU[key]."""
    t0, c0 = time.perf_counter(), time.thread_time()
    try:
        return fn(*args, **kwargs)
    finally:
        TIMES[key] += time.perf_counter() - t0
        CPU[key] += time.thread_time() - c0


def _timed(owner, attr: str, key: str) -> None:
    """Wrap owner.attr so its time (decode steps only) adds to TIMES[key]."""
    original = getattr(owner, attr)

    def wrapper(*args, **kwargs):
        if not STATE["decode"]:
            return original(*args, **kwargs)
        return _clocked(key, original, *args, **kwargs)

    setattr(owner, attr, wrapper)


def install_timers(batch: int) -> None:
    import torch
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl

    from supernet.serving import linear_layers, routing, vllm_model

    model_forward = vllm_model.SupernetModel.forward

    def forward(self, input_ids, positions, *args, **kwargs):
        # decode steps of the whole batch only (not the ramp-up behind prefills, nor the tail)
        STATE["decode"] = positions.shape[0] == batch and self.router is not None
        if not STATE["decode"]:
            if not STATE.get("measuring"):
                return model_forward(self, input_ids, positions, *args, **kwargs)
            # the other steps of a measured batch (prefill chunks, with the decodes of rows already
            # prefilled): their total, for the long-prompt regime
            return _clocked("prefill_steps_total", model_forward, self, input_ids, positions, *args, **kwargs)
        STATE["steps"] += 1
        STATE["threads"] = torch.get_num_threads()  # what the model's ops ran on
        try:
            return _clocked("forward", model_forward, self, input_ids, positions, *args, **kwargs)
        finally:
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
                   help="torch threads of the engine, the process bound to as many cores; 1: CPU times are the step's work")
    p.add_argument("--first-core", type=int, default=0,
                   help="with --threads: bind to the allowed cores from this one on (two runs side by side)")
    p.add_argument("--work-dir", default="/tmp/supernet-profile-switchable")
    p.add_argument("--rounds", type=int, default=1, help="run every batch once per round; ratios within rounds")
    p.add_argument("--skip-full-layout", action="store_true", help="leave out the mixed batch over the whole layout")
    p.add_argument("--out", default=None, help="JSON file for the breakdown")
    args = p.parse_args(argv)
    import torch

    from benchmarks.bench_serving import bench_checkpoint, corpus_prompts
    from supernet.serving.server import cpu_env

    ckpt = bench_checkpoint(args.checkpoint, 256)
    prompts = corpus_prompts(ckpt, args.batch, args.context)
    os.environ.update(cpu_env(Path(args.work_dir)))
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if args.threads:
        # The in-process engine (no worker process) never applies VLLM_CPU_OMP_THREADS_BIND: vLLM
        # binds through the environment of the worker processes it starts. Without this the model
        # ran on torch's default threads (2 here), and this thread's CPU time missed the other's.
        cores = sorted(os.sched_getaffinity(0))[args.first_core : args.first_core + args.threads]
        os.sched_setaffinity(0, cores)
        torch.set_num_threads(args.threads)
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, cores))
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    install_timers(args.batch)
    llm = LLM(model=str(ckpt), hf_overrides={"switchable": True}, enforce_eager=True, dtype="float32",
              max_model_len=args.context + args.decode_tokens + 16, max_num_seqs=max(args.batch, 4),
              enable_prefix_caching=False)
    batches = {p: [p] * args.batch for p in args.presets}
    batches["mix"] = [args.presets[i % len(args.presets)] for i in range(args.batch)]
    if not args.skip_full_layout:
        batches["mix, full layout"] = batches["mix"]
    from supernet.serving import vllm_model

    # warm-up: every batch once on short prompts, so one-time costs (GEMM kernels built for this
    # batch size, first touches of pages) land in no measured step
    for presets in batches.values():
        llm.generate([TokensPrompt(prompt_token_ids=ids[:64]) for ids in prompts],
                     [SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, extra_args={"preset": pr})
                      for pr in presets], use_tqdm=False)

    rows_attention = vllm_model._rows_attention
    weights = {p: batches["mix"].count(p) / args.batch for p in args.presets}
    mixed = [name for name in ("mix", "mix, full layout") if name in batches]
    rounds = []
    for number in range(1, args.rounds + 1):
        report = {}
        for name, presets in batches.items():
            vllm_model._rows_attention = (lambda *a: None) if name == "mix, full layout" else rows_attention
            TIMES.clear()
            CPU.clear()
            STATE["steps"] = 0
            params = [SamplingParams(max_tokens=args.decode_tokens, temperature=0, ignore_eos=True,
                                     extra_args={"preset": pr}) for pr in presets]
            STATE["measuring"] = True
            llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompts], params, use_tqdm=False)
            STATE["measuring"] = False
            prefill = {"wall": TIMES.pop("prefill_steps_total", 0.0), "cpu": CPU.pop("prefill_steps_total", 0.0)}
            steps = max(STATE["steps"], 1)
            report[name] = {"decode_steps": STATE["steps"], "wall": {k: v / steps for k, v in sorted(TIMES.items())},
                            "cpu": {k: v / steps for k, v in sorted(CPU.items())}, "prefill_steps_total_s": prefill}
            print(f"round {number} {name}: " + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in report[name]["cpu"].items())
                  + " (CPU ms/step)", flush=True)
        weighted = {clock: sum(weights[p] * report[p][clock]["forward"] for p in args.presets) for clock in ("wall", "cpu")}
        ratios = {name: {clock: report[name][clock]["forward"] / weighted[clock] for clock in ("wall", "cpu")}
                  for name in mixed}
        weighted_prefill = {clock: sum(weights[p] * report[p]["prefill_steps_total_s"][clock] for p in args.presets)
                            for clock in ("wall", "cpu")}
        prefill_ratios = {name: {clock: report[name]["prefill_steps_total_s"][clock] / weighted_prefill[clock]
                                 for clock in ("wall", "cpu")} for name in mixed}
        for name in mixed:
            print(f"round {number} {name}: forward {report[name]['cpu']['forward'] * 1e3:.1f} ms (cpu) vs token-weighted "
                  f"{weighted['cpu'] * 1e3:.1f} ms = {ratios[name]['cpu']:.2f}x (wall {ratios[name]['wall']:.2f}x); "
                  f"prefill steps {report[name]['prefill_steps_total_s']['cpu']:.1f} s vs token-weighted "
                  f"{weighted_prefill['cpu']:.1f} s = {prefill_ratios[name]['cpu']:.2f}x", flush=True)
        rounds.append({"per_step_s": report, "token_weighted_forward_s": weighted, "mixed_over_weighted": ratios,
                       "token_weighted_prefill_steps_s": weighted_prefill, "prefill_mixed_over_weighted": prefill_ratios})
    medians = {name: {clock: statistics.median(r["mixed_over_weighted"][name][clock] for r in rounds)
                      for clock in ("wall", "cpu")} for name in mixed}
    prefill_medians = {name: {clock: statistics.median(r["prefill_mixed_over_weighted"][name][clock] for r in rounds)
                              for clock in ("wall", "cpu")} for name in mixed}
    for name in mixed:
        print(f"{name}: median over {args.rounds} round(s): decode step {medians[name]['cpu']:.2f}x (cpu), "
              f"{medians[name]['wall']:.2f}x (wall); prefill steps {prefill_medians[name]['cpu']:.2f}x (cpu)", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"context": args.context, "batch": args.batch, "threads": args.threads,
                                              "torch_threads_in_forward": STATE.get("threads"),
                                              "decode_tokens": args.decode_tokens, "rounds": rounds,
                                              "median_mixed_over_weighted": medians,
                                              "median_prefill_mixed_over_weighted": prefill_medians,
                                              # the first round's breakdown, where the earlier runs kept it
                                              "per_step_s": rounds[0]["per_step_s"],
                                              "token_weighted_forward_s": rounds[0]["token_weighted_forward_s"]},
                                             indent=2))


if __name__ == "__main__":
    main()
