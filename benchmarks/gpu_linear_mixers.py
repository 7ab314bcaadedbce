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

Usage: python benchmarks/gpu_linear_mixers.py [--out FILE] [--smoke]
  --smoke: tiny shapes on the CPU (the "device path" is then the torch path in bf16); for testing
  the script itself. On an H100 the full run takes about 1-2 minutes (mostly Triton compilation).
"""
from __future__ import annotations

import argparse
import copy
import gc
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import print_table, time_fn, write_results  # noqa: E402
from supernet.cache import SupernetCache  # noqa: E402
from supernet.config import SupernetConfig  # noqa: E402
from supernet.mixers.gdn import GatedDeltaNetMixer  # noqa: E402
from supernet.mixers.kda import KimiDeltaAttentionMixer  # noqa: E402
from supernet.ops import delta_rule  # noqa: E402

MIXERS = {"gdn": GatedDeltaNetMixer, "kda": KimiDeltaAttentionMixer}
OUTPUT_TOL = 1e-2
GRAD_TOL = 5e-2  # bf16 gradients through a few hundred steps of recurrence
OP_TOL = 1e-3  # float32 kernels vs float32 torch

FULL = {
    "shapes": {
        "smollm2": dict(hidden=576, heads=9, head_dim=64,
                        prefill_batches=(1, 8), decode_batches=(1, 64)),
        "facts-16x128": dict(hidden=2048, heads=16, head_dim=128,
                             prefill_batches=(4,), decode_batches=(64,)),
    },
    "lengths": (2048, 8192, 32768),
    "check_shape": "smollm2",
}
SMOKE = {
    "shapes": {
        "tiny": dict(hidden=64, heads=2, head_dim=32, prefill_batches=(1, 2), decode_batches=(1, 4)),
    },
    "lengths": (64, 130),
    "check_shape": "tiny",
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
        return float(triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median"))
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


def check_row(kind: str, check: str, err: float, tol: float, **extra: Any) -> dict[str, Any]:
    return {"mixer": kind, "check": check, "rel_err": err, "tol": tol, "ok": bool(err < tol), **extra}


def check_mixer(kind: str, config: SupernetConfig, device: str, dtype: torch.dtype, seed: int) -> list[dict]:
    rows = []
    D = config.hidden_size
    dev_mixer = on_device(random_mixer(kind, config, seed), device, dtype)
    # the reference computes in float32 with the very same (bf16-rounded) weights
    ref_mixer = on_device(dev_mixer, "cpu", torch.float32)

    # prefill without a cache: chunk kernel (T > 64) and fused recurrent kernel (T <= 64, no grad)
    for T, path in ((300, "chunk"), (40, "fused_recurrent")):
        torch.manual_seed(seed + T)
        x = torch.randn(2, T, D).to(dtype)
        with torch.inference_mode():
            out = dev_mixer(x.to(device))
            ref = ref_mixer(x.float())
        rows.append(check_row(kind, f"prefill T={T} ({path})", rel_err(out, ref), OUTPUT_TOL))

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
    rows.append(check_row(kind, "prefill 100 with cache", errs[0], OUTPUT_TOL))
    decode_err = rel_err(torch.cat(dev_outs[1:], 1), torch.cat(ref_outs[1:], 1))
    rows.append(check_row(kind, "4 decode steps after it", decode_err, OUTPUT_TOL,
                          per_step=[round(e, 6) for e in errs[1:]]))
    rows.append(check_row(kind, "recurrent state after decode", rel_err(dev_state, ref_state), OUTPUT_TOL))

    # training step: chunk kernel forward + backward
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
    rows.append(check_row(kind, "train forward T=200", rel_err(grads["dev"][0], grads["ref"][0]), OUTPUT_TOL))
    rows.append(check_row(kind, "train grad wrt input", rel_err(grads["dev"][1], grads["ref"][1]), GRAD_TOL))
    per_param = {n: rel_err(grads["dev"][2][n], grads["ref"][2][n]) for n in grads["ref"][2]}
    worst = max(per_param, key=per_param.get)
    rows.append(check_row(kind, "train grad wrt parameters (worst)", per_param[worst], GRAD_TOL, worst_param=worst))
    return rows


def check_ops(kind: str, device: str, seed: int) -> list[dict]:
    """float32 raw ops (fla on CUDA) vs our torch path on CPU: catches argument-convention slips."""
    rows = []
    ops = fla_ops(device)
    torch_op = delta_rule.gated_delta_rule if kind == "gdn" else delta_rule.kda_rule
    H, K = 4, 64
    for T, path in ((1, "recurrent"), (150, "chunk")):
        dev_in = op_inputs(kind, 2, T, H, K, device, torch.float32, seed + T, state=True)
        cpu_in = {n: t.cpu() for n, t in dev_in.items()}
        with torch.inference_mode():
            o, s = call_op(ops[f"{kind}_{path}"], dev_in, K, device)
            o_ref, s_ref = call_op(torch_op, cpu_in, K, "cpu")
        rows.append(check_row(kind, f"raw op fp32 T={T} ({path}) output", rel_err(o, o_ref), OP_TOL))
        rows.append(check_row(kind, f"raw op fp32 T={T} ({path}) final state", rel_err(s, s_ref), OP_TOL))
    return rows


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


def time_shape(
    shape_name: str, spec: dict, lengths: tuple[int, ...], device: str, dtype: torch.dtype
) -> tuple[list, list]:
    prefill_rows, decode_rows = [], []
    config = linear_config(spec["hidden"], spec["heads"], spec["head_dim"])
    H, K, D = spec["heads"], spec["head_dim"], spec["hidden"]
    ops = fla_ops(device)
    for kind in MIXERS:
        mixer = on_device(random_mixer(kind, config, seed=0), device, dtype)
        for B in spec["prefill_batches"]:
            for T in lengths:
                x = torch.randn(B, T, D, device=device, dtype=dtype)
                with torch.inference_mode():
                    layer_ms = bench_ms(lambda: mixer(x, cache=SupernetCache(1)), device)
                    inputs = op_inputs(kind, B, T, H, K, device, dtype, seed=T)
                    op_ms = bench_ms(lambda: call_op(ops[f"{kind}_chunk"], inputs, K, device), device)
                prefill_rows.append({"shape": shape_name, "mixer": kind, "batch": B, "tokens": T,
                                     "layer_ms": layer_ms, "op_ms": op_ms,
                                     "layer_tokens_per_s": B * T / layer_ms * 1e3})
                del x, inputs
                free_memory(device)
        for B in spec["decode_batches"]:
            for ctx in lengths:
                x = torch.randn(B, 1, D, device=device, dtype=dtype)
                cache = synthetic_state(mixer, kind, B, device, dtype)
                with torch.inference_mode():
                    layer_ms = bench_ms(lambda: mixer(x, cache=cache), device)
                    inputs = op_inputs(kind, B, 1, H, K, device, dtype, seed=ctx, state=True)
                    op_ms = bench_ms(lambda: call_op(ops[f"{kind}_recurrent"], inputs, K, device), device)
                decode_rows.append({"shape": shape_name, "mixer": kind, "batch": B, "context": ctx,
                                    "layer_ms": layer_ms, "op_ms": op_ms})
        del mixer
        free_memory(device)
    return prefill_rows, decode_rows


# ---------------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/gpu_linear_mixers.json)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, to test the script")
    args = parser.parse_args()

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
    started = time.perf_counter()

    check_spec = plan["shapes"][plan["check_shape"]]
    check_config = linear_config(check_spec["hidden"], check_spec["heads"], check_spec["head_dim"])
    checks = []
    for i, kind in enumerate(MIXERS):
        checks += check_mixer(kind, check_config, device, dtype, seed=100 * (i + 1))
        checks += check_ops(kind, device, seed=100 * (i + 1) + 50)
    print_table(checks, ["mixer", "check", "rel_err", "tol", "ok"],
                "correctness: device path (bf16) vs CPU torch path (fp32)")

    prefill, decode = [], []
    for shape_name, spec in plan["shapes"].items():
        p, d = time_shape(shape_name, spec, plan["lengths"], device, dtype)
        prefill += p
        decode += d
    print_table(prefill, ["shape", "mixer", "batch", "tokens", "layer_ms", "op_ms", "layer_tokens_per_s"],
                "prefill per layer (ms, median)")
    print_table(decode, ["shape", "mixer", "batch", "context", "layer_ms", "op_ms"],
                "decode step per layer (ms, median)")

    fla_version = None
    try:
        import fla

        fla_version = getattr(fla, "__version__", None)
    except Exception:
        pass
    ok = all(row["ok"] for row in checks)
    elapsed = time.perf_counter() - started
    write_results("gpu_linear_mixers", {
        "smoke": args.smoke, "dtype": str(dtype), "fla": fla_version, "all_checks_ok": ok,
        "seconds": round(elapsed, 1),
        "kernels": "fla chunk_gated_delta_rule / fused_recurrent_gated_delta_rule, chunk_kda / fused_recurrent_kda"
                   if device == "cuda" else "torch (supernet.ops.delta_rule)",
        "shapes": plan["shapes"], "correctness": checks, "prefill": prefill, "decode": decode,
        "notes": [
            "layer = whole mixer (projections, short convs, gates, kernel, gated norm, o_proj); op = raw kernel",
            "prefill runs with a fresh decode cache (final states kept), inference mode",
            "decode starts from a synthetic state: a linear mixer's state is the same size at any context",
        ],
    }, args.out)
    print(f"{'all checks passed' if ok else 'SOME CHECKS FAILED'}; {elapsed:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
