"""Stage-1 training throughput and quality (issue 4), time-boxed.

One run, on one device (or N GPUs under torchrun, FSDP2):
1. baseline (single process only; skip with --no-baseline): HF Llama teacher forward (no grad) +
   an HF Llama student (same weights, all trainable) forward/backward, full-vocabulary fp32 KL,
   fused AdamW, bf16 autocast: tokens/s, peak memory, MFU.
2. ours: `training.Trainer` (sampled placement per step, fused chunked KL, frozen shared weights):
   tokens/s, peak memory, MFU over --steps steps after --warmup steps.
3. quality: held-out KL(teacher || student) for all-fa / all-swa / all-gdn / all-kda before, and
   after training on --budget-tokens tokens (stops early at --time-limit seconds; the JSON says how
   many tokens were actually trained).
4. offline (single process; --offline-topk 0 skips): write a top-K cache of --offline-sequences
   windows (teacher tokens/s, bytes/token), then train from it without a teacher (tokens/s).
Losses and placements of every step go into the JSON, so two runs (1 GPU vs 2 GPUs with the same
global batch) can be compared with --compare-to: scaling efficiency and loss-curve difference.

MFU counts the FLOPs the algorithm needs (matmuls and attention; see `flops_per_token`), divided by
the dense bf16 peak (989 TFLOP/s for H100/H200 SXM). For ours the backward of frozen weights
costs only the input gradient (one matmul), which the count reflects.

The JSON is rewritten as phases finish; a run stopped by the time limit or by SIGTERM (`timeout`)
keeps what it measured, marked `partial: true`. With --compile every variant is compiled before
the timed steps (`precompile_s`), `compiles_during_timing` says whether any compilation slipped in,
and --eager-control also measures the eager run on the same card (it is also the fallback when
the compiled run fails).

Usage (GPU):  python benchmarks/bench_training.py --teacher PATH_OR_smollm2 [--compile [--eager-control]]
              torchrun --nproc_per_node 2 benchmarks/bench_training.py --no-baseline --tag fsdp2 ...
Usage (CPU):  python benchmarks/bench_training.py --smoke
"""
from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, device_name, print_table, write_results  # noqa: E402
from supernet.layout import MIXERS  # noqa: E402
from supernet.mixers.registry import spec  # noqa: E402
from supernet.measure.timer import Stopwatch, synchronize  # noqa: E402
from supernet.measure.training_runs import compare_runs, timeline_breakdown  # noqa: E402

PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}
SINGLE = ("all-fa", "all-swa", "all-gdn", "all-kda")


def peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


# ---------------------------------------------------------------------------------------------
# FLOP model
# ---------------------------------------------------------------------------------------------
def _linear_flops(module: torch.nn.Module) -> tuple[float, float]:
    """(forward matmul FLOPs per token of all Linear/Conv1d weights, those that are trainable)."""
    total = trainable = 0.0
    for m in module.modules():
        if isinstance(m, torch.nn.Linear):
            f = 2.0 * m.in_features * m.out_features
        elif isinstance(m, torch.nn.Conv1d):
            f = 2.0 * m.weight.numel()
        else:
            continue
        total += f
        if m.weight.requires_grad:
            trainable += f
    return total, trainable


def _core_flops(mixer: str, cfg: Any, seq: int) -> float:
    """Forward FLOPs per token of the token-mixing core (attention scores / recurrence)."""
    if spec(mixer).family == "attention":
        w = min(spec(mixer).window(cfg) or seq, seq)
        keys = (seq + 1) / 2 if w >= seq else w - w * w / (2 * seq)  # mean keys per query (causal)
        return 4.0 * keys * cfg.num_attention_heads * cfg.head_dim  # QK^T and PV
    c = 64  # chunk length of the chunked delta rule: state read/update + intra-chunk terms
    d = spec(mixer).dims(cfg)
    h, k, v = d["HV"], d["K"], d["V"]
    return h * (6.0 * k * v + 4.0 * c * (k + v))


def flops_per_token(student: torch.nn.Module, seq: int, mixer_mix: dict[str, float], teacher: bool = True,
                    full_backward: bool = False) -> float:
    """Teacher forward + student forward + student backward, per token (see module docstring)."""
    cfg = student.config
    layer = student.model.layers[0]
    shared, shared_tr = _linear_flops(layer.mlp)
    head = 2.0 * cfg.vocab_size * cfg.hidden_size
    head_tr = head if student.lm_head.weight.requires_grad else 0.0
    fa_lin, _ = _linear_flops(layer.mixers["fa"])
    fa_core = _core_flops("fa", cfg, seq)
    total = 0.0
    if teacher:
        total += cfg.num_hidden_layers * (shared + fa_lin + fa_core) + head
    for m, frac in mixer_mix.items():
        lin, lin_tr = _linear_flops(layer.mixers[m])
        core = _core_flops(m, cfg, seq)
        fwd = shared + lin + core
        if full_backward:
            bwd = 2 * (shared + lin) + 2 * core
        else:  # input gradients everywhere, weight gradients only where trainable
            bwd = shared + shared_tr + lin + lin_tr + 2 * core
        total += frac * cfg.num_hidden_layers * (fwd + bwd)
    total += head + (2 * head if full_backward else head + head_tr)
    return total


# ---------------------------------------------------------------------------------------------
# the baseline: plain HF Llama distillation step
# ---------------------------------------------------------------------------------------------
def run_baseline(teacher_path: str, seq: int, batch: int, warmup: int, steps: int) -> dict[str, Any]:
    from supernet.training.models import cast_params, load_teacher_model

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = dev.type == "cuda"
    teacher, _ = load_teacher_model(teacher_path)
    student, _ = load_teacher_model(teacher_path)
    cast_params(teacher, torch.bfloat16 if bf16 else torch.float32).to(dev)
    student.to(dev).train().requires_grad_(True)
    vocab = teacher.config.vocab_size
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5, fused=dev.type == "cuda")
    gen = torch.Generator().manual_seed(0)
    ctx = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else (lambda: torch.autocast("cpu", enabled=False))
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    def step() -> float:
        x = torch.randint(0, vocab, (batch, seq), generator=gen).to(dev)
        with ctx():
            with torch.no_grad():
                t_logits = teacher(input_ids=x).logits
            s_logits = student(input_ids=x).logits
        kl = F.kl_div(F.log_softmax(s_logits.float(), -1).flatten(0, 1), F.log_softmax(t_logits.float(), -1).flatten(0, 1),
                      log_target=True, reduction="batchmean")
        kl.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return kl.item()

    try:
        for _ in range(warmup):
            step()
        with Stopwatch(dev) as watch:
            for _ in range(steps):
                step()
        dt = watch.seconds
        out = {"tokens_per_s": batch * seq * steps / dt, "batch": batch, "seq_len": seq,
               "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None}
    except torch.cuda.OutOfMemoryError:
        out = {"tokens_per_s": None, "batch": batch, "seq_len": seq, "oom": True}
    del teacher, student, opt
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return out


# ---------------------------------------------------------------------------------------------
# ours
# ---------------------------------------------------------------------------------------------
def build_config(args: argparse.Namespace, out_dir: str, data: list[str], eval_data: list[str]) -> Any:
    from supernet.training.config import config_from_dict

    return config_from_dict({
        "out_dir": out_dir, "seed": 0,
        "teacher": {"source": args.teacher_mode, "path": args.teacher},
        "student": {"path": args.student, "overrides": {"swa_window": args.swa_window}},
        "data": {"train": data, "eval": eval_data, "seq_len": args.seq_len,
                 "cache_dir": str(Path(args.work_dir) / "data-cache"), "max_documents": args.max_documents},
        "loss": {"chunk_tokens": args.chunk_tokens},
        "sampling": {"presets": ["all-swa", "all-gdn", "all-kda"], "preset_prob": 0.1},
        "train": {"train_mixers": ["swa", "gdn", "kda"], "mixer_lr_scale": {"swa": 0.1}, "micro_batch_size": args.batch,
                  "grad_accum": args.grad_accum, "max_steps": 10**6, "lr": args.lr, "warmup_steps": 20,
                  "compile": args.compile, "activation_checkpointing": args.activation_checkpointing,
                  "gc_every": args.gc_every},
        "eval": {"num_sequences": args.eval_sequences, "batch_size": args.eval_batch, "placements": list(SINGLE)},
        "distributed": {"shard_teacher": not args.replicate_teacher, "layers_per_unit": args.layers_per_unit},
        "checkpoint": {"resume": "none", "save_final": False},
        "log": {"progress": False},
    })


class Interrupted(BaseException):  # not an Exception: compilers must not swallow it
    """SIGTERM/SIGINT (e.g. from `timeout`): stop where we are and write what was measured."""


def _raise_interrupted(signum: int, _frame: Any) -> None:
    raise Interrupted(f"signal {signum}")


class Report:
    """The result JSON, rewritten (atomically) as phases progress, so a run that is cut short
    still leaves its measurements behind, marked `partial: true`."""

    def __init__(self, path: Path, args: argparse.Namespace) -> None:
        self.path = path
        self.result: dict[str, Any] = {"partial": True, "phase": "start", "args": dict(vars(args))}
        self.t_start = time.perf_counter()

    def flush(self, phase: str | None = None) -> None:
        if phase is not None:
            self.result["phase"] = phase
        self.result["elapsed_s"] = time.perf_counter() - self.t_start
        payload = {"device": device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M"),
                   **self.result}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
        os.replace(tmp, self.path)


def _compile_stats() -> dict[str, int] | None:
    try:
        from supernet.training.compile import compile_stats

        return compile_stats()
    except Exception:  # noqa: BLE001 - statistics only
        return None


def run_ours(args: argparse.Namespace, cfg: Any, live: dict[str, Any], flush: Any, deadline: float) -> dict[str, Any]:
    """Train with `training.Trainer`; `live` is filled in as it goes (it is the partial result)."""
    from supernet.training.gc_control import ScheduledGC
    from supernet.training.trainer import Trainer

    t_run = time.perf_counter()
    live.update(status="setting up", compile=bool(cfg.train.compile), micro_batch=args.batch,
                grad_accum=args.grad_accum)
    trainer = Trainer(cfg)
    env = trainer.env
    dev = env.device
    sync = functools.partial(synchronize, dev)
    live.update(setup_s=time.perf_counter() - t_run, world_size=env.world_size, rank=env.rank,
                global_batch_tokens=trainer.tokens_per_step, status="compiling" if cfg.train.compile else "training")
    flush()
    live["precompile_s"] = trainer.precompile()  # every compiled variant, before anything is timed
    live.update(status="evaluating (before)" if args.budget_tokens else "training")
    flush()
    t0 = time.perf_counter()
    kl_before = trainer.evaluate() if args.budget_tokens else {}
    eval_s = time.perf_counter() - t0
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    losses: list[float] = []
    placements: list[str] = []
    step_s: list[float] = []
    counts = {m: 0 for m in MIXERS}
    measured_s, measured_tokens, measured_steps = 0.0, 0, 0
    budget_steps = max(args.warmup + args.steps, math.ceil(args.budget_tokens / trainer.tokens_per_step))
    compile_before_timing = compile_after_timing = None
    live.update(status="training", kl_before=kl_before, losses=losses, placements=placements, step_s=step_s,
                requested_timed_steps=args.steps, warmup_steps=args.warmup)
    stopped = None
    with ScheduledGC(cfg.train.gc_every) as collector:  # as Trainer.train: the same pauses on every rank
        for i in range(budget_steps):
            if i == args.warmup:
                compile_before_timing = _compile_stats()
            placement = trainer.next_placement()
            with Stopwatch(dev) as watch:
                rec = trainer.train_step(placement)
            dt = watch.seconds
            trainer.step += 1
            collector.step(trainer.step)
            losses.append(rec["loss"])
            placements.append(str(placement))
            step_s.append(dt)
            timed = args.warmup <= i < args.warmup + args.steps
            if timed:
                measured_s += dt
                measured_tokens += trainer.tokens_per_step
                measured_steps += 1
                for m in placement:
                    counts[m] += 1
                if measured_steps == args.steps:
                    compile_after_timing = _compile_stats()
            if i < args.warmup + args.steps or i % 10 == 0:
                live.update(timed_steps=measured_steps,
                            tokens_per_s=measured_tokens / measured_s if measured_s else None,
                            compile_stats_before_timing=compile_before_timing)
                flush()
            now = time.perf_counter()
            if now > deadline:
                if i >= args.warmup + args.steps - 1:
                    break  # the quality phase ends at the time limit
                if measured_steps >= 1 or now > deadline + 60:
                    stopped = f"time limit reached after {measured_steps} of {args.steps} timed steps"
                    break
    if compile_after_timing is None and measured_steps:
        compile_after_timing = _compile_stats()
    if args.profile_steps and stopped is None and dev.type == "cuda":
        live["profile"] = profile_steps(trainer, args.profile_steps, sync)
        flush()
    trained_tokens = len(losses) * trainer.tokens_per_step
    t0 = time.perf_counter()
    kl_after = trainer.evaluate() if args.budget_tokens and stopped is None else {}
    eval_s += time.perf_counter() - t0
    total = sum(counts.values()) or 1
    mix = {m: c / total for m, c in counts.items()}
    tps = measured_tokens / measured_s if measured_s else None
    fpt = flops_per_token(trainer.student, args.seq_len, mix, teacher=cfg.teacher.source != "offline")
    peak = peak_flops()
    compiles_during_timing = None
    if compile_before_timing and compile_after_timing:
        compiles_during_timing = compile_after_timing["unique_graphs"] - compile_before_timing["unique_graphs"]
    live.update({
        "status": "done" if stopped is None else "stopped: " + stopped,
        "world_size": env.world_size, "micro_batch": args.batch, "grad_accum": args.grad_accum,
        "global_batch_tokens": trainer.tokens_per_step, "tokens_per_s": tps, "timed_steps": measured_steps,
        "tokens_per_s_per_gpu": tps / env.world_size if tps else None,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None,
        "flops_per_token": fpt, "mfu": fpt * tps / (peak * env.world_size) if (peak and tps) else None,
        "mixer_mix_measured": mix, "trained_tokens": trained_tokens, "steps": len(losses),
        "kl_before": kl_before, "kl_after": kl_after, "losses": losses, "placements": placements,
        "step_s": step_s, "first_step_s": step_s[0] if step_s else None,
        "compile_stats_before_timing": compile_before_timing, "compile_stats_after_timing": compile_after_timing,
        "compiles_during_timing": compiles_during_timing,
        "eval_s": eval_s, "rank": env.rank, "env": env,
        "baseline_flops_per_token": flops_per_token(trainer.student, args.seq_len, {"fa": 1.0}, teacher=True,
                                                    full_backward=True),
        "student_dir": str(trainer.student_dir),
    })
    if stopped is not None:
        live["partial"] = True
    return live


def profile_steps(trainer: Any, steps: int, sync: Any, top: int = 15) -> dict[str, Any]:
    """torch.profiler over a few more steps: GPU busy time against wall time, and the top operators.

    Tells a step bound by the GPU (busy ~ wall) from one bound by the host or by waiting on other
    ranks (busy << wall), and which operators take the time.
    """
    from torch.profiler import ProfilerActivity, profile

    sync()
    t = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            trainer.train_step(trainer.next_placement())
            trainer.step += 1
        sync()
    wall = time.perf_counter() - t
    events = prof.key_averages()

    def device_us(e: Any) -> float:
        return float(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0)))

    kernels_us = sum(device_us(e) for e in events)
    rows = sorted(events, key=device_us, reverse=True)[:top]
    cpu_rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    try:  # where the wall time went on the GPU's timeline (all streams): compute, communication alone, nothing
        from torch.autograd import DeviceType

        spans = [(e.time_range.start, e.time_range.end, "nccl" in e.name.lower())
                 for e in prof.events() if e.device_type == DeviceType.CUDA]
        timeline = {f"{k}_s_per_step": v / 1e6 / steps
                    for k, v in timeline_breakdown(spans, wall * 1e6).items()}
    except Exception as exc:  # the profiler's event API differs between torch releases
        timeline = {"timeline_error": f"{type(exc).__name__}: {exc}"}
    return {
        "steps": steps, "wall_s_per_step": wall / steps, "gpu_busy_s_per_step": kernels_us / 1e6 / steps,
        **timeline,
        "top_device_ops": [{"op": e.key, "count": e.count, "device_ms": device_us(e) / 1e3} for e in rows],
        "top_cpu_ops": [{"op": e.key, "count": e.count, "cpu_ms": e.self_cpu_time_total / 1e3} for e in cpu_rows],
    }


def run_offline(args: argparse.Namespace, cfg: Any, data: list[str], student_dir: str) -> dict[str, Any]:
    """Write a top-K cache for a few windows (teacher throughput, bytes/token), then train from it."""
    import dataclasses

    from supernet.training.logit_cache import write_logit_cache
    from supernet.training.models import cast_params, load_teacher_model
    from supernet.training.trainer import Trainer

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cache_dir = Path(args.work_dir) / f"topk{args.offline_topk}"
    teacher, tok = load_teacher_model(args.teacher)
    if dev.type == "cuda":
        cast_params(teacher, torch.bfloat16)
    t0 = time.perf_counter()
    index = write_logit_cache(teacher, tok, data, cache_dir, top_k=args.offline_topk, seq_len=args.seq_len,
                              batch_size=args.batch, shard_sequences=64, max_sequences=args.offline_sequences,
                              max_documents=args.max_documents, device=dev, progress=False)
    cache_s = time.perf_counter() - t0
    del teacher
    gc.collect()
    off = dataclasses.replace(cfg, out_dir=str(Path(args.work_dir) / "run-offline"),
                              teacher=dataclasses.replace(cfg.teacher, source="offline", cache_dir=str(cache_dir)),
                              student=dataclasses.replace(cfg.student, path=student_dir))
    trainer = Trainer(off)
    trainer.precompile()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    timed, tokens = 0.0, 0
    for i in range(args.warmup + args.steps):
        placement = trainer.next_placement()
        with Stopwatch(dev) as watch:
            trainer.train_step(placement)
        trainer.step += 1
        if i >= args.warmup:
            timed += watch.seconds
            tokens += trainer.tokens_per_step
    out = {"top_k": args.offline_topk, "bytes_per_token": index["bytes_per_token"],
           "cache_tokens": index["num_tokens"], "cache_write_s": cache_s,
           "cache_tokens_per_s": index["throughput_tokens_per_s"],
           "train_tokens_per_s": tokens / timed if timed else None,
           "train_peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None}
    del trainer
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny teacher and shapes on the CPU (for tests)")
    ap.add_argument("--teacher", default="smollm2", help="HF folder, .gguf file, smollm2, builtin:tiny-llama")
    ap.add_argument("--student", default=None, help="supernet checkpoint (default: convert the teacher)")
    ap.add_argument("--teacher-mode", default="online", choices=["online", "self-fa"])
    ap.add_argument("--data", default=None, help="train jsonl (default ../shared/data/pydocs-train.jsonl)")
    ap.add_argument("--eval-data", default=None, help="held-out jsonl (default ../shared/data/pydocs-eval.jsonl)")
    ap.add_argument("--max-documents", type=int, default=None)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=16, help="micro-batch (sequences per GPU)")
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--baseline-batch", type=int, default=16)
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=15, help="timed steps (after warm-up)")
    ap.add_argument("--budget-tokens", type=int, default=12_000_000, help="training tokens between the KL evals (0: no quality phase)")
    ap.add_argument("--time-limit", type=float, default=300.0, help="seconds from start after which training stops")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--swa-window", type=int, default=512)
    ap.add_argument("--chunk-tokens", type=int, default=8192)
    ap.add_argument("--eval-sequences", type=int, default=32)
    ap.add_argument("--eval-batch", type=int, default=8)
    ap.add_argument("--compile", action="store_true", help="torch.compile every decoder layer")
    ap.add_argument("--activation-checkpointing", action="store_true")
    ap.add_argument("--eager-control", action="store_true",
                    help="with --compile: also measure the eager run on the same card, if time is left")
    ap.add_argument("--eager-min-s", type=float, default=75.0,
                    help="seconds that must be left before the time limit to start the eager run")
    ap.add_argument("--offline-topk", type=int, default=32, help="top-K of the offline-cache phase (0: skip it)")
    ap.add_argument("--offline-sequences", type=int, default=256, help="windows written to the offline cache")
    ap.add_argument("--replicate-teacher", action="store_true",
                    help="FSDP2: every rank holds the whole teacher (distributed.shard_teacher: false)")
    ap.add_argument("--layers-per-unit", type=int, default=0,
                    help="FSDP2 unit size (distributed.layers_per_unit): 0 one unit per mixer, K layers per unit")
    ap.add_argument("--gc-every", type=int, default=50,
                    help="train.gc_every: Python GC of the young generations every N steps (0: automatic)")
    ap.add_argument("--profile-steps", type=int, default=0,
                    help="after the timed steps, profile this many more (GPU busy vs wall time, top operators)")
    ap.add_argument("--compare-to", default=None, help="a previous result JSON (e.g. the 1-GPU run) to compare with")
    ap.add_argument("--tag", default=None, help="result name: benchmarks/results/training_<tag>.json")
    ap.add_argument("--out", default=None, help="write the JSON here instead")
    ap.add_argument("--work-dir", default=None, help="scratch folder (converted student, token cache)")
    args = ap.parse_args()
    t_start = time.perf_counter()

    tmp = None
    if args.smoke:
        from supernet.training.tiny import write_synthetic_corpus

        tmp = tempfile.mkdtemp(prefix="bench-training-")
        tr, ev = write_synthetic_corpus(tmp, 60, 8)
        args.teacher = "builtin:tiny-llama" if args.teacher == "smollm2" else args.teacher
        data, eval_data = [str(tr)], [str(ev)]
        args.seq_len, args.batch, args.baseline_batch = min(args.seq_len, 64), min(args.batch, 2), min(args.baseline_batch, 2)
        args.warmup, args.steps = min(args.warmup, 1), min(args.steps, 3)
        args.budget_tokens = min(args.budget_tokens, 6 * args.batch * args.seq_len * args.grad_accum)
        args.eval_sequences, args.eval_batch, args.swa_window, args.chunk_tokens = 4, 2, 8, 64
        args.offline_topk, args.offline_sequences = min(args.offline_topk, 8), min(args.offline_sequences, 16)
    else:
        repo = Path(__file__).resolve().parents[1]
        shared = next((d for d in (repo.parent / "shared" / "data", repo / "shared" / "data") if d.is_dir()),
                      repo.parent / "shared" / "data")
        data = [args.data or str(shared / "pydocs-train.jsonl")]
        eval_data = [args.eval_data or str(shared / "pydocs-eval.jsonl")]
    args.work_dir = args.work_dir or tmp or tempfile.mkdtemp(prefix="bench-training-")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    tag = args.tag or ("smoke" if args.smoke else ("h100" if world == 1 else f"fsdp2_{world}gpu"))

    out_path = Path(args.out) if args.out else RESULTS / f"training_{tag}.json"
    report = Report(out_path, args)
    report.t_start = t_start
    result = report.result
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _raise_interrupted)
    deadline = t_start + args.time_limit
    is_main = int(os.environ.get("RANK", "0")) == 0
    flush = report.flush if is_main else (lambda *a, **k: None)
    cfg = build_config(args, str(Path(args.work_dir) / "run"), data, eval_data)
    env = None
    exit_code = 0
    try:
        baseline = None
        if not args.no_baseline and world == 1:
            result["baseline"] = {"status": "running"}
            flush("baseline")
            baseline = run_baseline(args.teacher, args.seq_len, args.baseline_batch, args.warmup, args.steps)
            result["baseline"] = baseline
        result["ours"] = {}
        flush("ours")
        try:
            run_ours(args, cfg, result["ours"], flush, deadline)
        except (Interrupted, torch.cuda.OutOfMemoryError):
            raise
        except Exception as exc:  # noqa: BLE001 - a compiled run that fails still leaves the eager one
            if not args.compile or world != 1:
                raise
            import traceback

            result["ours"].update(status="failed", error=f"{type(exc).__name__}: {exc}"[:2000],
                                  traceback=traceback.format_exc()[-6000:])
            print(f"error: the compiled run failed ({type(exc).__name__}: {str(exc)[:300]}); "
                  f"measuring the eager one", file=sys.stderr)
        env = result["ours"].pop("env", None)
        result["ours"].pop("rank", None)
        # the eager run on the same card: a control for --compile, or the fallback when it failed
        ours_failed = result["ours"].get("tokens_per_s") is None
        left = deadline - time.perf_counter()
        want_eager = args.compile and world == 1 and (ours_failed or args.eager_control)
        if want_eager and left > args.eager_min_s:
            torch._dynamo.reset()  # drop the compiled run's graphs (and what they hold on the GPU)
            _release_gpu()
            import dataclasses

            result["ours_eager"] = {}
            flush("ours (eager)")
            eager_cfg = dataclasses.replace(cfg, out_dir=str(Path(args.work_dir) / "run-eager"),
                                            train=dataclasses.replace(cfg.train, compile=False),
                                            student=dataclasses.replace(
                                                cfg.student, path=result["ours"].get("student_dir") or cfg.student.path))
            eager_args = argparse.Namespace(**{**vars(args), "budget_tokens": 0})
            run_ours(eager_args, eager_cfg, result["ours_eager"], flush, deadline)
            result["ours_eager"].pop("env", None)
            result["ours_eager"].pop("rank", None)
            for k in ("losses", "placements", "kl_before", "kl_after"):
                result["ours_eager"].pop(k, None)
        elif want_eager:
            result["ours_eager"] = {"status": f"skipped: {left:.0f} s left before the time limit"}
        if args.offline_topk and world == 1 and result["ours"].get("student_dir"):
            _release_gpu()
            flush("offline")
            result["offline"] = run_offline(args, cfg, data, result["ours"]["student_dir"])
        result["partial"] = bool(result["ours"].get("partial"))
    except Interrupted as exc:
        exit_code = 3
        result["interrupted"] = f"{exc} during phase {result.get('phase')!r}"
        print(f"\ninterrupted ({exc}) during {result.get('phase')}: writing the partial results", file=sys.stderr)
    except torch.cuda.OutOfMemoryError:
        print(f"error: out of GPU memory at micro-batch {args.batch}; try --batch {max(1, args.batch // 2)} "
              f"--grad-accum {args.grad_accum * 2} or --activation-checkpointing", file=sys.stderr)
        result.setdefault("ours", {}).update(oom=True, micro_batch=args.batch)
        exit_code = 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    if env is not None and exit_code == 0:
        from supernet.training.distributed import shutdown

        shutdown(env)
    if not is_main:
        return
    summarize(result, args)
    flush("done" if exit_code == 0 else result.get("phase"))
    print(f"\nwrote {out_path}" + (" (partial)" if result.get("partial") else ""))
    if exit_code:
        sys.exit(exit_code)


def _release_gpu() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def summarize(result: dict[str, Any], args: argparse.Namespace) -> None:
    """Speed-ups, MFU of the baseline, and the printed tables."""
    baseline = result.get("baseline") or None
    ours = result.get("ours") or {}
    eager = result.get("ours_eager") or {}
    peak = peak_flops()
    fpt = ours.get("baseline_flops_per_token") or eager.get("baseline_flops_per_token")
    if baseline and baseline.get("tokens_per_s") and fpt:
        baseline["flops_per_token"] = fpt
        baseline["mfu"] = fpt * baseline["tokens_per_s"] / peak if peak else None
    for key, run in (("speedup_vs_baseline", ours), ("speedup_eager_vs_baseline", eager)):
        if baseline and baseline.get("tokens_per_s") and run.get("tokens_per_s"):
            result[key] = run["tokens_per_s"] / baseline["tokens_per_s"]
    if ours.get("tokens_per_s") and eager.get("tokens_per_s"):
        result["compile_speedup"] = ours["tokens_per_s"] / eager["tokens_per_s"]
    if args.compare_to and ours.get("losses"):
        result["comparison"] = compare_runs(ours, args.compare_to)

    rows = []
    if baseline:
        rows.append({"run": "baseline (HF, full-vocab fp32 KL)", "batch": baseline.get("batch"),
                     "tok/s": baseline.get("tokens_per_s"), "MFU": baseline.get("mfu"),
                     "peak GiB": baseline.get("peak_mem_gib"), "status": baseline.get("status", "done")})
    for name, run in (("ours" + (" (compiled)" if args.compile else ""), ours), ("ours (eager)", eager)):
        if run:
            rows.append({"run": name, "batch": args.batch, "tok/s": run.get("tokens_per_s"), "MFU": run.get("mfu"),
                         "peak GiB": run.get("peak_mem_gib"), "first step s": run.get("first_step_s"),
                         "timed steps": run.get("timed_steps"), "status": run.get("status")})
    print_table(rows, ["run", "batch", "tok/s", "MFU", "peak GiB", "first step s", "timed steps", "status"],
                f"stage-1 throughput, seq {args.seq_len}")
    for key, label in (("speedup_vs_baseline", "speed-up vs baseline"),
                       ("speedup_eager_vs_baseline", "speed-up of the eager run vs baseline"),
                       ("compile_speedup", "compiled vs eager")):
        if key in result:
            print(f"{label}: {result[key]:.2f}x")
    prof = ours.get("profile") or {}
    if "compute_busy_s_per_step" in prof:
        print(f"profile, per step: wall {prof['wall_s_per_step']:.3f} s = compute {prof['compute_busy_s_per_step']:.3f}"
              f" + communication alone {prof['comm_only_s_per_step']:.3f} + GPU idle {prof['gpu_idle_s_per_step']:.3f}"
              " (profiled steps run slower than timed ones)")
    if ours.get("tokens_per_s"):
        ok = result.get("speedup_vs_baseline", 0) >= 1.5 and ours["tokens_per_s"] >= 150_000
        print(f"issue-4 target (>= 1.5x the baseline and >= 150k tokens/s): {'met' if ok else 'not met'}")
    if ours.get("compiles_during_timing"):
        print(f"warning: {ours['compiles_during_timing']} graphs were compiled during the timed steps")
    offline = result.get("offline")
    if offline:
        print(f"\noffline top-{offline['top_k']}: cache {offline['bytes_per_token']:.0f} bytes/token, teacher pass "
              f"{offline['cache_tokens_per_s'] or 0:,.0f} tokens/s; training from the cache "
              f"{offline['train_tokens_per_s'] or 0:,.0f} tokens/s")
    if ours.get("kl_before"):
        print_table([{"placement": p, "KL before": ours["kl_before"].get(p), "KL after": (ours.get("kl_after") or {}).get(p)}
                     for p in SINGLE], ["placement", "KL before", "KL after"],
                    f"held-out KL(teacher || student), {ours.get('trained_tokens', 0):,} training tokens")
    if "comparison" in result:
        c = result["comparison"]
        if "error" in c:
            print(f"\nno comparison: {c['error']}")
            return
        print(f"\nvs {c['reference']}: scaling efficiency {c['scaling_efficiency']}, max relative loss difference "
              f"{c['max_rel_loss_diff']} over {c['steps_compared']} steps (same placements: {c['same_placements']})")

if __name__ == "__main__":
    main()
