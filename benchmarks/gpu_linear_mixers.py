"""GPU check and timing of the linear mixers, Gated DeltaNet (gdn) and Kimi Delta Attention (kda).

1. Correctness: each mixer's CUDA path (fla's Triton kernels, bf16) against its CPU torch path
   (float32) with the same weights, relative error ||out - ref|| / ||ref|| < 1e-2, fresh random
   inputs per check: prefill through the chunk kernel (T=300) and the fused recurrent kernel
   (T=40), prefill + token-by-token decode with the cache, and a training step (outputs and
   gradients). Plus the raw ops in float32 against the torch ops (argument conventions, < 1e-3).
2. Timing per layer (median of triton's do_bench): prefill (with a fresh decode cache) and one
   decode step, for our whole mixer layer (projections, convs, gates, kernel, norm, o_proj) and
   for the raw fla op alone on the same shapes.
   - SmolLM2 layer (hidden 576, 9 heads x 64): prefill batch 1 and 8 at 2k/8k/32k tokens
     (batch 64 x 32k would need ~40 GB of activations per layer; batch 8 keeps every case
     under ~6 GB); decode batch 1 and 64 at context 2k/8k/32k.
   - FACTS.md's shape (16 heads x 128, hidden 2048): prefill batch 4 at 2k/8k/32k, decode batch 64,
     to compare with the numbers measured there (GDN 0.59/1.24/4.29 ms, KDA 0.74/2.29/8.86 ms).
   A linear mixer's decode state has the same size at every context, so the decode cases start
   from a synthetic state (random conv tails and recurrent matrix) instead of a real prefill; the
   context column is a label that shows the cost does not depend on it.

Robustness (the first run of every new kernel shape pays Triton compilation and fla's autotuning,
tens of seconds each, so a time-boxed run may not finish):
  - the work is a list of items run in order of importance: (a) inference checks (prefill, decode
    with the cache) for gdn and kda on the SmolLM2 shape, which also compile and autotune the
    forward kernels the timings reuse; (b) SmolLM2 prefill batch 1 at 2k/8k/32k and decode batch
    1 and 64; (c) the rest: SmolLM2 prefill batch 8, the training-step checks (backward kernels:
    a new set to compile), the fp32 raw-op checks (another dtype and head count, so a new set
    too), and the FACTS shape (new head count and size: a new set again);
  - within a mixer the rows share kernel shapes (fla's autotune keys hold heads and head size,
    not batch or length), so only the first row of each group pays the autotuning;
  - after every check row and every timing row the output JSON is rewritten (atomically) with all
    done so far and "complete": false; "complete": true once every item ran or was skipped;
  - --time-limit: no new item starts after that many seconds; the rest are recorded under
    "skipped" with reason "skipped (time limit)". An item that raises is recorded under "errors"
    and the run goes on.

Usage: python benchmarks/gpu_linear_mixers.py [--out FILE] [--time-limit S] [--only-smollm2] [--smoke]
  --smoke: tiny shapes on the CPU (the "device path" is then the torch path in bf16); for testing
  the script itself. benchmarks/gpu/run_linear.sh runs it on a GPU machine.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, device_name, print_table, time_fn  # noqa: E402
from supernet.cache import SupernetCache  # noqa: E402
from supernet.config import SupernetConfig  # noqa: E402
from supernet.mixers.gdn import GatedDeltaNetMixer  # noqa: E402
from supernet.mixers.kda import KimiDeltaAttentionMixer  # noqa: E402
from supernet.ops import delta_rule  # noqa: E402

MIXERS = {"gdn": GatedDeltaNetMixer, "kda": KimiDeltaAttentionMixer}
OUTPUT_TOL = 1e-2
GRAD_TOL = 5e-2  # bf16 gradients through a few hundred steps of recurrence
OP_TOL = 1e-3  # float32 kernels vs float32 torch
BENCH_WARMUP_MS, BENCH_REP_MS = 5, 20  # do_bench budgets; the median of >= a few calls either way
SKIPPED_TIME = "skipped (time limit)"

# "required_*": the rows of section (b), run before everything else but the inference checks
FULL = {
    "shapes": {
        "smollm2": dict(hidden=576, heads=9, head_dim=64, prefill_batches=(1, 8), decode_batches=(1, 64),
                        required_prefill_batches=(1,), required_decode_batches=(1, 64)),
        "facts-16x128": dict(hidden=2048, heads=16, head_dim=128, prefill_batches=(4,), decode_batches=(64,)),
    },
    "lengths": (2048, 8192, 32768),
    "main_shape": "smollm2",
}
SMOKE = {
    "shapes": {
        "tiny": dict(hidden=64, heads=2, head_dim=32, prefill_batches=(1, 2), decode_batches=(1, 4),
                     required_prefill_batches=(1,), required_decode_batches=(1, 4)),
        "tiny-wide": dict(hidden=64, heads=1, head_dim=64, prefill_batches=(2,), decode_batches=(4,)),
    },
    "lengths": (64, 130),
    "main_shape": "tiny",
}


# ---------------------------------------------------------------------------------- helpers


def linear_config(hidden: int, heads: int, head_dim: int) -> SupernetConfig:
    return SupernetConfig(
        vocab_size=256, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=1,
        num_attention_heads=heads, num_key_value_heads=heads, head_dim=head_dim,
        max_position_embeddings=65536,
    )


@torch.no_grad()
def random_mixer(kind: str, config: SupernetConfig, seed: int) -> torch.nn.Module:
    """A float32 CPU mixer whose every parameter matters: O(1) projections, varied decays and gates."""
    torch.manual_seed(seed)
    mixer = MIXERS[kind](config, 0)
    for module in mixer.modules():
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, std=module.in_features**-0.5)
        elif isinstance(module, torch.nn.Conv1d):
            torch.nn.init.normal_(module.weight, std=0.5)
    mixer.A_log.add_(torch.randn_like(mixer.A_log) * 0.5)
    mixer.o_norm.weight.add_(torch.randn_like(mixer.o_norm.weight) * 0.1)
    return mixer.eval()


def on_device(mixer: torch.nn.Module, device: str, dtype: torch.dtype) -> torch.nn.Module:
    return copy.deepcopy(mixer).to(device=device, dtype=dtype)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def bench_ms(fn: Callable[[], Any], device: str) -> float:
    """Median milliseconds per call: triton's do_bench on CUDA, perf_counter on CPU."""
    if device == "cuda":
        import triton.testing

        fn()  # compile / autotune outside the measurement
        torch.cuda.synchronize()
        return float(triton.testing.do_bench(fn, warmup=BENCH_WARMUP_MS, rep=BENCH_REP_MS, return_mode="median"))
    return time_fn(fn, warmup=1, repeat=3) * 1e3


def free_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def fla_ops(device: str) -> dict[str, Callable]:
    """The raw kernels our dispatch calls: fla's on CUDA, our torch dispatch in smoke mode."""
    if device == "cuda":
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
        from fla.ops.kda import chunk_kda, fused_recurrent_kda

        return {"gdn_chunk": chunk_gated_delta_rule, "gdn_recurrent": fused_recurrent_gated_delta_rule,
                "kda_chunk": chunk_kda, "kda_recurrent": fused_recurrent_kda}
    return {"gdn_chunk": delta_rule.gated_delta_rule, "gdn_recurrent": delta_rule.gated_delta_rule,
            "kda_chunk": delta_rule.kda_rule, "kda_recurrent": delta_rule.kda_rule}


def op_inputs(kind: str, B: int, T: int, H: int, K: int, device: str, dtype: torch.dtype, seed: int,
              state: bool = False) -> dict[str, Any]:
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen)

    g_shape = (B, T, H, K) if kind == "kda" else (B, T, H)
    inputs = dict(
        q=rnd(B, T, H, K).to(device, dtype), k=rnd(B, T, H, K).to(device, dtype), v=rnd(B, T, H, K).to(device, dtype),
        g=(F.logsigmoid(rnd(*g_shape)) * 0.2).to(device), beta=torch.sigmoid(rnd(B, T, H)).to(device),
    )
    if state:
        inputs["initial_state"] = (rnd(B, H, K, K) * 0.1).to(device)
    return inputs


def call_op(op: Callable, inputs: dict[str, Any], K: int, device: str) -> Any:
    kwargs = dict(scale=K**-0.5, output_final_state=True)
    if device == "cuda":
        kwargs["use_qk_l2norm_in_kernel"] = True
    else:
        kwargs["use_qk_l2norm"] = True
    return op(**inputs, **kwargs)


# ---------------------------------------------------------------------------------- correctness

Emit = Callable[[dict], None]


def check_row(kind: str, check: str, err: float, tol: float, **extra: Any) -> dict[str, Any]:
    return {"mixer": kind, "check": check, "rel_err": err, "tol": tol, "ok": bool(err < tol), **extra}


def check_mixer_pair(kind: str, config: SupernetConfig, device: str, dtype: torch.dtype, seed: int):
    dev_mixer = on_device(random_mixer(kind, config, seed), device, dtype)
    # the reference computes in float32 with the very same (bf16-rounded) weights
    return dev_mixer, on_device(dev_mixer, "cpu", torch.float32)


def check_inference(kind: str, config: SupernetConfig, device: str, dtype: torch.dtype, seed: int,
                    emit: Emit) -> None:
    """Prefill (chunk and fused recurrent kernels), prefill with the cache, decode, final state."""
    D = config.hidden_size
    dev_mixer, ref_mixer = check_mixer_pair(kind, config, device, dtype, seed)

    # prefill without a cache: chunk kernel (T > 64) and fused recurrent kernel (T <= 64, no grad)
    for T, path in ((300, "chunk"), (40, "fused_recurrent")):
        torch.manual_seed(seed + T)
        x = torch.randn(2, T, D).to(dtype)
        with torch.inference_mode():
            out = dev_mixer(x.to(device))
            ref = ref_mixer(x.float())
        emit(check_row(kind, f"prefill T={T} ({path})", rel_err(out, ref), OUTPUT_TOL))

    # prefill 100 with the cache, then 4 decode steps; every step compared
    torch.manual_seed(seed + 1)
    x = torch.randn(2, 104, D).to(dtype)
    with torch.inference_mode():
        for mixer, xs, store in ((dev_mixer, x.to(device), "dev"), (ref_mixer, x.float(), "ref")):
            cache, outs = SupernetCache(1), []
            for a, b in ((0, 100), (100, 101), (101, 102), (102, 103), (103, 104)):
                outs.append(mixer(xs[:, a:b], cache=cache))
                cache.advance(b - a)
            if store == "dev":
                dev_outs, dev_state = outs, cache.mixer_state(0, kind)["recurrent"]
            else:
                ref_outs, ref_state = outs, cache.mixer_state(0, kind)["recurrent"]
    errs = [rel_err(o, r) for o, r in zip(dev_outs, ref_outs)]
    emit(check_row(kind, "prefill 100 with cache", errs[0], OUTPUT_TOL))
    decode_err = rel_err(torch.cat(dev_outs[1:], 1), torch.cat(ref_outs[1:], 1))
    emit(check_row(kind, "4 decode steps after it", decode_err, OUTPUT_TOL,
                   per_step=[round(e, 6) for e in errs[1:]]))
    emit(check_row(kind, "recurrent state after decode", rel_err(dev_state, ref_state), OUTPUT_TOL))


def check_train(kind: str, config: SupernetConfig, device: str, dtype: torch.dtype, seed: int,
                emit: Emit) -> None:
    """A training step: chunk kernel forward + backward (same weights as check_inference's)."""
    D = config.hidden_size
    dev_mixer, ref_mixer = check_mixer_pair(kind, config, device, dtype, seed)
    torch.manual_seed(seed + 2)
    x = torch.randn(2, 200, D).to(dtype)
    w = torch.randn(2, 200, D)
    grads = {}
    for name, mixer, xs in (("dev", dev_mixer, x.to(device)), ("ref", ref_mixer, x.float())):
        mixer.train()
        mixer.zero_grad()
        xs = xs.clone().requires_grad_()
        out = mixer(xs)
        (out.float() * w.to(out.device)).sum().backward()
        grads[name] = (out, xs.grad, {n: p.grad for n, p in mixer.named_parameters()})
        mixer.eval()
    emit(check_row(kind, "train forward T=200", rel_err(grads["dev"][0], grads["ref"][0]), OUTPUT_TOL))
    emit(check_row(kind, "train grad wrt input", rel_err(grads["dev"][1], grads["ref"][1]), GRAD_TOL))
    per_param = {n: rel_err(grads["dev"][2][n], grads["ref"][2][n]) for n in grads["ref"][2]}
    worst = max(per_param, key=per_param.get)
    emit(check_row(kind, "train grad wrt parameters (worst)", per_param[worst], GRAD_TOL, worst_param=worst))


def check_ops(kind: str, device: str, seed: int, emit: Emit) -> None:
    """float32 raw ops (fla on CUDA) vs our torch path on CPU: catches argument-convention slips."""
    ops = fla_ops(device)
    torch_op = delta_rule.gated_delta_rule if kind == "gdn" else delta_rule.kda_rule
    H, K = 4, 64
    for T, path in ((1, "recurrent"), (150, "chunk")):
        dev_in = op_inputs(kind, 2, T, H, K, device, torch.float32, seed + T, state=True)
        cpu_in = {n: t.cpu() for n, t in dev_in.items()}
        with torch.inference_mode():
            o, s = call_op(ops[f"{kind}_{path}"], dev_in, K, device)
            o_ref, s_ref = call_op(torch_op, cpu_in, K, "cpu")
        emit(check_row(kind, f"raw op fp32 T={T} ({path}) output", rel_err(o, o_ref), OP_TOL))
        emit(check_row(kind, f"raw op fp32 T={T} ({path}) final state", rel_err(s, s_ref), OP_TOL))


# ---------------------------------------------------------------------------------- timing


def synthetic_state(mixer: torch.nn.Module, kind: str, B: int, device: str, dtype: torch.dtype) -> SupernetCache:
    """A cache as if some context had been read: the state's size does not depend on its length."""
    cache = SupernetCache(1)
    state = cache.mixer_state(0, kind)
    W = mixer.config.linear_conv_size
    for name, conv in (("conv_q", mixer.q_conv1d), ("conv_k", mixer.k_conv1d), ("conv_v", mixer.v_conv1d)):
        state[name] = torch.randn(B, conv.in_channels, W - 1, device=device, dtype=dtype)
    heads = getattr(mixer, "num_v_heads", mixer.num_heads)
    state["recurrent"] = torch.randn(B, heads, mixer.head_dim, mixer.v_head_dim, device=device) * 0.1
    return cache


class TimingMixers:
    """The timing mixer of one (shape, kind) at a time: rows are grouped by it, so it is built once."""

    def __init__(self, device: str, dtype: torch.dtype) -> None:
        self.device, self.dtype = device, dtype
        self.key: tuple | None = None
        self.mixer: torch.nn.Module | None = None

    def get(self, shape_name: str, spec: dict, kind: str) -> torch.nn.Module:
        if self.key != (shape_name, kind):
            self.mixer = None
            free_memory(self.device)
            config = linear_config(spec["hidden"], spec["heads"], spec["head_dim"])
            self.mixer = on_device(random_mixer(kind, config, seed=0), self.device, self.dtype)
            self.key = (shape_name, kind)
        return self.mixer


def time_prefill(mixers: TimingMixers, shape_name: str, spec: dict, kind: str, B: int, T: int) -> dict:
    device, dtype = mixers.device, mixers.dtype
    H, K, D = spec["heads"], spec["head_dim"], spec["hidden"]
    mixer = mixers.get(shape_name, spec, kind)
    x = torch.randn(B, T, D, device=device, dtype=dtype)
    try:
        with torch.inference_mode():
            layer_ms = bench_ms(lambda: mixer(x, cache=SupernetCache(1)), device)
            inputs = op_inputs(kind, B, T, H, K, device, dtype, seed=T)
            op_ms = bench_ms(lambda: call_op(fla_ops(device)[f"{kind}_chunk"], inputs, K, device), device)
    finally:
        del x
        inputs = None
        free_memory(device)
    return {"shape": shape_name, "mixer": kind, "batch": B, "tokens": T, "layer_ms": layer_ms, "op_ms": op_ms,
            "layer_tokens_per_s": B * T / layer_ms * 1e3}


def time_decode(mixers: TimingMixers, shape_name: str, spec: dict, kind: str, B: int, ctx: int) -> dict:
    device, dtype = mixers.device, mixers.dtype
    H, K, D = spec["heads"], spec["head_dim"], spec["hidden"]
    mixer = mixers.get(shape_name, spec, kind)
    x = torch.randn(B, 1, D, device=device, dtype=dtype)
    cache = synthetic_state(mixer, kind, B, device, dtype)
    with torch.inference_mode():
        layer_ms = bench_ms(lambda: mixer(x, cache=cache), device)
        inputs = op_inputs(kind, B, 1, H, K, device, dtype, seed=ctx, state=True)
        op_ms = bench_ms(lambda: call_op(fla_ops(device)[f"{kind}_recurrent"], inputs, K, device), device)
    return {"shape": shape_name, "mixer": kind, "batch": B, "context": ctx, "layer_ms": layer_ms, "op_ms": op_ms}


# ---------------------------------------------------------------------------------- plan and results


class Item:
    """One unit of work: a check (emits several rows) or one timing row."""

    def __init__(self, name: str, group: str, section: str, run: Callable[[Emit], None]) -> None:
        self.name, self.group, self.section, self.run = name, group, section, run


def build_plan(plan: dict, device: str, dtype: torch.dtype, only_main: bool) -> list[Item]:
    """The items in the order they run: (a) inference checks, (b) main-shape timings, (c) the rest."""
    shapes, lengths, main = plan["shapes"], plan["lengths"], plan["main_shape"]
    main_spec = shapes[main]
    check_config = linear_config(main_spec["hidden"], main_spec["heads"], main_spec["head_dim"])
    seeds = {kind: 100 * (i + 1) for i, kind in enumerate(MIXERS)}
    mixers = TimingMixers(device, dtype)
    items: list[Item] = []

    def timing_items(group: str, shape_name: str, spec: dict, kind: str, prefill_bs, decode_bs) -> None:
        # one (shape, kind) at a time: the same kernels, autotuned once for the group
        for B in prefill_bs:
            for T in lengths:
                items.append(Item(f"prefill {shape_name} {kind} batch={B} tokens={T}", group, "prefill",
                                  lambda emit, s=shape_name, sp=spec, k=kind, b=B, t=T:
                                  emit(time_prefill(mixers, s, sp, k, b, t))))
        for B in decode_bs:
            for ctx in lengths:
                items.append(Item(f"decode {shape_name} {kind} batch={B} context={ctx}", group, "decode",
                                  lambda emit, s=shape_name, sp=spec, k=kind, b=B, c=ctx:
                                  emit(time_decode(mixers, s, sp, k, b, c))))

    # (a) inference checks: also compile + autotune the forward kernels that (b) uses
    for kind in MIXERS:
        items.append(Item(f"check {kind} inference", "a", "correctness",
                          lambda emit, k=kind: check_inference(k, check_config, device, dtype, seeds[k], emit)))
    # (b) the main shape's required timings
    for kind in MIXERS:
        timing_items("b", main, main_spec, kind, main_spec.get("required_prefill_batches", ()),
                     main_spec.get("required_decode_batches", ()))
    # (c) the rest: main-shape extra batches, training and raw-op checks, the other shapes
    extra_prefill = [b for b in main_spec["prefill_batches"] if b not in main_spec.get("required_prefill_batches", ())]
    extra_decode = [b for b in main_spec["decode_batches"] if b not in main_spec.get("required_decode_batches", ())]
    for kind in MIXERS:
        timing_items("c", main, main_spec, kind, extra_prefill, extra_decode)
    for kind in MIXERS:
        items.append(Item(f"check {kind} training step", "c", "correctness",
                          lambda emit, k=kind: check_train(k, check_config, device, dtype, seeds[k], emit)))
    for kind in MIXERS:
        items.append(Item(f"check {kind} raw ops fp32", "c", "correctness",
                          lambda emit, k=kind: check_ops(k, device, seeds[k] + 50, emit)))
    if not only_main:
        for shape_name, spec in shapes.items():
            if shape_name != main:
                for kind in MIXERS:
                    timing_items("c", shape_name, spec, kind, spec["prefill_batches"], spec["decode_batches"])
    return items


def write_json_atomic(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)


def versions() -> dict[str, str | None]:
    out = {}
    for name in ("fla", "triton"):
        try:
            out[name] = getattr(__import__(name), "__version__", None)
        except Exception:
            out[name] = None
    return out


# ---------------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/gpu_linear_mixers.json)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, to test the script")
    parser.add_argument("--time-limit", type=float, default=210.0,
                        help="seconds after which no new item starts (the rest are recorded as skipped); "
                             "0 = no limit (default 210)")
    parser.add_argument("--only-smollm2", action="store_true",
                        help="leave out the other shapes (FACTS 16x128; in --smoke mode the second tiny shape)")
    args = parser.parse_args()
    started = time.perf_counter()

    plan = SMOKE if args.smoke else FULL
    if args.smoke:
        device = "cpu"
        torch.set_num_threads(1)  # tiny ops: thread barriers would dominate, worse on a shared CPU
    else:
        if not torch.cuda.is_available():
            print("error: no CUDA device; run on a GPU machine, or pass --smoke for a CPU test run", file=sys.stderr)
            return 2
        if not delta_rule.fla_available():
            print("error: fla is not importable (pip install flash-linear-attention / fla-core and triton); "
                  "the CUDA path would fall back to torch", file=sys.stderr)
            return 2
        device = "cuda"
    dtype = torch.bfloat16
    out_path = Path(args.out) if args.out else RESULTS / "gpu_linear_mixers.json"
    items = build_plan(plan, device, dtype, args.only_smollm2)
    shapes = {n: s for n, s in plan["shapes"].items() if not args.only_smollm2 or n == plan["main_shape"]}

    results: dict[str, list] = {"correctness": [], "prefill": [], "decode": []}
    item_log: list[dict] = []
    skipped: list[dict] = []
    errors: list[dict] = []
    header = {
        "device": device_name(), "torch": torch.__version__, **versions(),
        "date": time.strftime("%Y-%m-%d %H:%M"), "smoke": args.smoke, "dtype": str(dtype),
        "kernels": "fla chunk_gated_delta_rule / fused_recurrent_gated_delta_rule, chunk_kda / fused_recurrent_kda"
                   if device == "cuda" else "torch (supernet.ops.delta_rule)",
        "time_limit_s": args.time_limit, "only_smollm2": args.only_smollm2,
        "bench": f"triton do_bench median, warmup {BENCH_WARMUP_MS} ms, rep {BENCH_REP_MS} ms, after one "
                 "untimed call (compilation, autotuning)" if device == "cuda" else "perf_counter median of 3",
        "shapes": shapes, "lengths": plan["lengths"],
        "order": "(a) inference checks; (b) main shape: prefill batch 1, decode; (c) main shape's other batches, "
                 "training-step checks, fp32 raw-op checks, other shapes",
    }

    def save(complete: bool) -> None:
        checks = results["correctness"]
        check_errors = [e for e in errors if e["section"] == "correctness"]
        write_json_atomic(out_path, {
            **header, "complete": complete,
            "all_checks_ok": bool(checks) and all(r["ok"] for r in checks) and not check_errors,
            "seconds": round(time.perf_counter() - started, 1),
            **results, "items": item_log, "skipped": skipped, "errors": errors,
            "notes": [
                "layer = whole mixer (projections, short convs, gates, kernel, gated norm, o_proj); op = raw kernel",
                "prefill runs with a fresh decode cache (final states kept), inference mode",
                "decode starts from a synthetic state: a linear mixer's state is the same size at any context",
                "items[].seconds: wall time of each item, compilation and autotuning included",
            ],
        })

    def emitter(item: Item) -> Emit:
        def emit(row: dict) -> None:
            results[item.section].append(row)
            if item.section == "correctness":
                extra = f" worst={row['worst_param']}" if "worst_param" in row else ""
                print(f"[{time.perf_counter() - started:6.1f}s] check {row['mixer']} {row['check']}: "
                      f"rel_err {row['rel_err']:.3g} (tol {row['tol']:g}) {'ok' if row['ok'] else 'FAIL'}{extra}",
                      flush=True)
            else:
                where = f"tokens={row['tokens']}" if "tokens" in row else f"context={row['context']}"
                print(f"[{time.perf_counter() - started:6.1f}s] {item.section} {row['shape']} {row['mixer']} "
                      f"batch={row['batch']} {where}: layer {row['layer_ms']:.4g} ms, op {row['op_ms']:.4g} ms",
                      flush=True)
            save(False)
        return emit

    print(f"{len(items)} items on {header['device']}; time limit {args.time_limit:g} s", flush=True)
    save(False)
    for item in items:
        elapsed = time.perf_counter() - started
        if args.time_limit > 0 and elapsed > args.time_limit:
            skipped.append({"item": item.name, "group": item.group, "reason": SKIPPED_TIME})
            continue
        t0 = time.perf_counter()
        failed = False
        try:
            item.run(emitter(item))
            item_log.append({"item": item.name, "group": item.group, "seconds": round(time.perf_counter() - t0, 2)})
        except Exception as exc:  # one failing item (OOM, a kernel error) must not lose the others
            failed = True
            errors.append({"item": item.name, "group": item.group, "section": item.section,
                           "seconds": round(time.perf_counter() - t0, 2),
                           "error": f"{type(exc).__name__}: {exc}"[:2000],
                           "traceback": traceback.format_exc(limit=6)[-4000:]})
            print(f"[{time.perf_counter() - started:6.1f}s] ERROR in {item.name}: {type(exc).__name__}: {exc}",
                  flush=True)
        if failed:  # out of the except block: the traceback no longer holds the item's tensors
            free_memory(device)
        save(False)
    if skipped:
        print(f"[{time.perf_counter() - started:6.1f}s] time limit: skipped {len(skipped)} items "
              f"(first: {skipped[0]['item']})", flush=True)
    save(True)

    tables = (
        ("correctness", ["mixer", "check", "rel_err", "tol", "ok"],
         "correctness: device path (bf16) vs CPU torch path (fp32)"),
        ("prefill", ["shape", "mixer", "batch", "tokens", "layer_ms", "op_ms", "layer_tokens_per_s"],
         "prefill per layer (ms, median)"),
        ("decode", ["shape", "mixer", "batch", "context", "layer_ms", "op_ms"], "decode step per layer (ms, median)"),
    )
    for section, columns, title in tables:
        if results[section]:  # print_table needs at least one row
            print_table(results[section], columns, title)
    ok = bool(results["correctness"]) and all(r["ok"] for r in results["correctness"]) and not errors
    elapsed = time.perf_counter() - started
    print(f"\nwrote {out_path}")
    print(f"{'all checks passed' if ok else 'SOME CHECKS FAILED OR ERRORS'}; {len(item_log)} items done, "
          f"{len(skipped)} skipped, {len(errors)} errors; {elapsed:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
