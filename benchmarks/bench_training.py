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

Usage (GPU):  python benchmarks/bench_training.py --teacher PATH_OR_smollm2 [--compile]
              torchrun --nproc_per_node 2 benchmarks/bench_training.py --no-baseline --tag fsdp2 ...
Usage (CPU):  python benchmarks/bench_training.py --smoke
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, print_table, write_results  # noqa: E402

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
    if mixer in ("fa", "swa"):
        w = seq if mixer == "fa" else min(cfg.swa_window, seq)
        keys = (seq + 1) / 2 if w >= seq else w - w * w / (2 * seq)  # mean keys per query (causal)
        return 4.0 * keys * cfg.num_attention_heads * cfg.head_dim  # QK^T and PV
    c = 64  # chunk length of the chunked delta rule: state read/update + intra-chunk terms
    if mixer == "gdn":
        h, k, v = cfg.gdn_num_v_heads, cfg.gdn_head_dim, cfg.gdn_v_head_dim
    else:
        h, k, v = cfg.kda_num_heads, cfg.kda_head_dim, cfg.kda_v_head_dim
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
    from training.models import cast_params, load_teacher_model

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
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
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
    from training.config import config_from_dict

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
                  "compile": args.compile, "activation_checkpointing": args.activation_checkpointing},
        "eval": {"num_sequences": args.eval_sequences, "batch_size": args.eval_batch, "placements": list(SINGLE)},
        "checkpoint": {"resume": "none", "save_final": False},
        "log": {"progress": False},
    })


def run_ours(args: argparse.Namespace, cfg: Any, t_start: float) -> dict[str, Any]:
    from training.trainer import Trainer

    trainer = Trainer(cfg)
    env = trainer.env
    dev = env.device
    sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)
    setup_s = time.perf_counter() - t_start
    t0 = time.perf_counter()
    kl_before = trainer.evaluate() if args.budget_tokens else {}
    eval_s = time.perf_counter() - t0
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    losses, placements, counts = [], [], {m: 0 for m in ("fa", "swa", "gdn", "kda")}
    measured_s, measured_tokens = 0.0, 0
    budget_steps = max(args.warmup + args.steps, math.ceil(args.budget_tokens / trainer.tokens_per_step))
    deadline = t_start + args.time_limit
    for i in range(budget_steps):
        placement = trainer.next_placement()
        sync()
        t = time.perf_counter()
        rec = trainer.train_step(placement)
        sync()
        dt = time.perf_counter() - t
        trainer.step += 1
        losses.append(rec["loss"])
        placements.append(str(placement))
        if args.warmup <= i < args.warmup + args.steps:
            measured_s += dt
            measured_tokens += trainer.tokens_per_step
            for m in placement:
                counts[m] += 1
        if i >= args.warmup + args.steps and time.perf_counter() > deadline:
            break
    trained_tokens = len(losses) * trainer.tokens_per_step
    t0 = time.perf_counter()
    kl_after = trainer.evaluate() if args.budget_tokens else {}
    eval_s += time.perf_counter() - t0
    total = sum(counts.values()) or 1
    mix = {m: c / total for m, c in counts.items()}
    tps = measured_tokens / measured_s if measured_s else None
    fpt = flops_per_token(trainer.student, args.seq_len, mix, teacher=cfg.teacher.source != "offline")
    peak = peak_flops()
    return {
        "world_size": env.world_size, "micro_batch": args.batch, "grad_accum": args.grad_accum,
        "global_batch_tokens": trainer.tokens_per_step, "tokens_per_s": tps,
        "tokens_per_s_per_gpu": tps / env.world_size if tps else None,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None,
        "flops_per_token": fpt, "mfu": fpt * tps / (peak * env.world_size) if (peak and tps) else None,
        "mixer_mix_measured": mix, "trained_tokens": trained_tokens, "steps": len(losses),
        "kl_before": kl_before, "kl_after": kl_after, "losses": losses, "placements": placements,
        "setup_s": setup_s, "eval_s": eval_s, "rank": env.rank, "env": env,
        "baseline_flops_per_token": flops_per_token(trainer.student, args.seq_len, {"fa": 1.0}, teacher=True,
                                                    full_backward=True),
        "student_dir": str(trainer.student_dir),
    }


def run_offline(args: argparse.Namespace, cfg: Any, data: list[str], student_dir: str) -> dict[str, Any]:
    """Write a top-K cache for a few windows (teacher throughput, bytes/token), then train from it."""
    import dataclasses

    from training.logit_cache import write_logit_cache
    from training.models import cast_params, load_teacher_model
    from training.trainer import Trainer

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
    sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    timed, tokens = 0.0, 0
    for i in range(args.warmup + args.steps):
        placement = trainer.next_placement()
        sync()
        t = time.perf_counter()
        trainer.train_step(placement)
        sync()
        trainer.step += 1
        if i >= args.warmup:
            timed += time.perf_counter() - t
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


def compare(ours: dict[str, Any], ref_path: str) -> dict[str, Any]:
    ref = json.loads(Path(ref_path).read_text())["ours"]
    n = min(len(ref["losses"]), len(ours["losses"]))
    same_placements = ref["placements"][:n] == ours["placements"][:n]
    rel = [abs(a - b) / max(abs(b), 1e-12) for a, b in zip(ours["losses"][:n], ref["losses"][:n])]
    eff = None
    if ref.get("tokens_per_s") and ours.get("tokens_per_s"):
        eff = ours["tokens_per_s"] / (ref["tokens_per_s"] * ours["world_size"] / ref["world_size"])
    return {"reference": ref_path, "scaling_efficiency": eff, "steps_compared": n,
            "same_placements": same_placements, "max_rel_loss_diff": max(rel) if rel else None,
            "mean_rel_loss_diff": sum(rel) / len(rel) if rel else None}


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
    ap.add_argument("--offline-topk", type=int, default=32, help="top-K of the offline-cache phase (0: skip it)")
    ap.add_argument("--offline-sequences", type=int, default=256, help="windows written to the offline cache")
    ap.add_argument("--compare-to", default=None, help="a previous result JSON (e.g. the 1-GPU run) to compare with")
    ap.add_argument("--tag", default=None, help="result name: benchmarks/results/training_<tag>.json")
    ap.add_argument("--out", default=None, help="write the JSON here instead")
    ap.add_argument("--work-dir", default=None, help="scratch folder (converted student, token cache)")
    args = ap.parse_args()
    t_start = time.perf_counter()

    tmp = None
    if args.smoke:
        from training.testing import write_synthetic_corpus

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

    baseline = None
    if not args.no_baseline and world == 1:
        baseline = run_baseline(args.teacher, args.seq_len, args.baseline_batch, args.warmup, args.steps)
    cfg = build_config(args, str(Path(args.work_dir) / "run"), data, eval_data)
    try:
        ours = run_ours(args, cfg, t_start)
    except torch.cuda.OutOfMemoryError:
        print(f"error: out of GPU memory at micro-batch {args.batch}; try --batch {max(1, args.batch // 2)} "
              f"--grad-accum {args.grad_accum * 2} or --activation-checkpointing", file=sys.stderr)
        write_results(f"training_{tag}", {"args": vars(args), "baseline": baseline,
                                          "ours": {"oom": True, "micro_batch": args.batch}}, args.out)
        sys.exit(1)
    env = ours.pop("env")
    from training.distributed import shutdown

    shutdown(env)
    if ours.pop("rank") != 0:
        return
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    offline = None
    if args.offline_topk and env.world_size == 1:
        offline = run_offline(args, cfg, data, ours["student_dir"])
    result: dict[str, Any] = {"args": {k: v for k, v in vars(args).items()}, "baseline": baseline, "ours": ours,
                              "offline": offline, "elapsed_s": time.perf_counter() - t_start}
    if baseline and baseline.get("tokens_per_s") and ours["tokens_per_s"]:
        fpt = ours["baseline_flops_per_token"]
        peak = peak_flops()
        baseline["flops_per_token"] = fpt
        baseline["mfu"] = fpt * baseline["tokens_per_s"] / peak if peak else None
        result["speedup_vs_baseline"] = ours["tokens_per_s"] / baseline["tokens_per_s"]
    if args.compare_to:
        result["comparison"] = compare(ours, args.compare_to)

    rows = []
    if baseline:
        rows.append({"run": "baseline (HF, full-vocab fp32 KL)", "batch": baseline["batch"],
                     "tok/s": baseline.get("tokens_per_s"), "MFU": baseline.get("mfu"), "peak GiB": baseline.get("peak_mem_gib")})
    rows.append({"run": f"ours ({cfg.teacher.source}, {env.world_size} proc)", "batch": args.batch,
                 "tok/s": ours["tokens_per_s"], "MFU": ours["mfu"], "peak GiB": ours["peak_mem_gib"]})
    print_table(rows, ["run", "batch", "tok/s", "MFU", "peak GiB"], f"stage-1 throughput, seq {args.seq_len}")
    if "speedup_vs_baseline" in result:
        print(f"speed-up vs baseline: {result['speedup_vs_baseline']:.2f}x")
    if offline:
        print(f"\noffline top-{offline['top_k']}: cache {offline['bytes_per_token']:.0f} bytes/token, teacher pass "
              f"{offline['cache_tokens_per_s'] or 0:,.0f} tokens/s; training from the cache "
              f"{offline['train_tokens_per_s'] or 0:,.0f} tokens/s")
    if ours["kl_before"]:
        print_table([{"placement": p, "KL before": ours["kl_before"].get(p), "KL after": ours["kl_after"].get(p)}
                     for p in SINGLE], ["placement", "KL before", "KL after"],
                    f"held-out KL(teacher || student), {ours['trained_tokens']:,} training tokens")
    if "comparison" in result:
        c = result["comparison"]
        print(f"\nvs {c['reference']}: scaling efficiency {c['scaling_efficiency']}, max relative loss difference "
              f"{c['max_rel_loss_diff']} over {c['steps_compared']} steps (same placements: {c['same_placements']})")
    write_results(f"training_{tag}", result, args.out)


if __name__ == "__main__":
    main()
