"""Where a layer's time goes: torch.profiler's kernels per call, grouped by origin."""
from __future__ import annotations

from typing import Any, Callable

import torch

from supernet.cache import SupernetCache
from supernet.measure.linear_mixers import (Emit, TimingMixers, call_op, fla_ops, free_memory, op_inputs,
                                           synthetic_state)
from supernet.measure.timer import Stopwatch, synchronize
from supernet.ops.fla_backend import fused_kernels

PROFILE_ITERS = 3  # calls per profiled case (the breakdown is per call)
PROFILE_TOP = 15  # kernels listed per case


def kernel_category(name: str) -> str:
    """Rough origin of a GPU kernel, from its name."""
    low = name.lower()
    if low.startswith(("memcpy", "memset")):
        return "memcpy/memset"
    if any(tag in low for tag in ("gemm", "cutlass", "xmma", "cublas", "splitk", "nvjet")):
        return "gemm"
    if "at::native" in low or low.startswith("void at::") or "elementwise" in low or "reduce_kernel" in low:
        return "torch (aten)"
    return "triton (fla) / other"


def kernel_breakdown(fn: Callable[[], Any], device: str) -> dict[str, Any]:
    """torch.profiler over PROFILE_ITERS calls of `fn` (after one untimed call), per call: GPU kernels
    by total time (in --smoke mode, CPU ops by self time), their count, and the wall time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        with Stopwatch(device) as watch:
            for _ in range(PROFILE_ITERS):
                fn()
        wall_ms = watch.ms / PROFILE_ITERS
    totals: dict[str, list[float]] = {}  # name -> [microseconds, count]
    for evt in prof.events():
        if device == "cuda":
            if evt.device_type != DeviceType.CUDA:
                continue
            us = evt.time_range.elapsed_us()
        else:
            if evt.device_type != DeviceType.CPU:
                continue
            us = evt.self_cpu_time_total
        entry = totals.setdefault(evt.name, [0.0, 0])
        entry[0] += us
        entry[1] += 1
    total_us = sum(t for t, _ in totals.values())
    by_category: dict[str, float] = {}
    for name, (us, _) in totals.items():
        category = kernel_category(name) if device == "cuda" else "cpu op"
        by_category[category] = by_category.get(category, 0.0) + us / PROFILE_ITERS / 1e3
    top = sorted(totals.items(), key=lambda kv: -kv[1][0])[:PROFILE_TOP]
    return {
        "kernels_per_call": sum(n for _, n in totals.values()) / PROFILE_ITERS,
        "kernel_ms_per_call": total_us / PROFILE_ITERS / 1e3,
        "wall_ms_per_call": wall_ms,
        "by_category_ms": {k: round(v, 5) for k, v in sorted(by_category.items(), key=lambda kv: -kv[1])},
        "top": [{"name": name[:160], "calls_per_call": n / PROFILE_ITERS, "ms_per_call": us / PROFILE_ITERS / 1e3,
                 "share": us / total_us if total_us else 0.0} for name, (us, n) in top],
    }


def profile_mixer(mixers: TimingMixers, shape_name: str, spec: dict, kind: str, profile_spec: dict,
                  emit: Emit) -> None:
    """Kernel breakdown of one prefill and one eager decode step per batch, layer and raw op."""
    device, dtype = mixers.device, mixers.dtype
    H, K, D = spec["heads"], spec["head_dim"], spec["hidden"]
    mixer = mixers.get(shape_name, spec, kind)
    B, T = profile_spec["prefill"]
    cases = [(f"prefill batch={B} tokens={T}", B, T)] + [(f"decode batch={b}", b, 1) for b in profile_spec["decode_batches"]]
    for case, B, T in cases:
        x = torch.randn(B, T, D, device=device, dtype=dtype)
        decode = case.startswith("decode")
        inputs = op_inputs(kind, B, T, H, K, device, dtype, seed=T, state=decode)
        op = fla_ops(device)[f"{kind}_{'recurrent' if decode else 'chunk'}"]
        with torch.inference_mode():
            if decode:
                cache = synthetic_state(mixer, kind, B, device, dtype)
                layer_fn = lambda: mixer(x, cache=cache)  # noqa: E731
            else:
                layer_fn = lambda: mixer(x, cache=SupernetCache(1))  # noqa: E731
            for target, fn in (("layer", layer_fn), ("op", lambda: call_op(op, inputs, K, device)),
                               ("layer (torch paths)", layer_fn)):
                with fused_kernels(target != "layer (torch paths)"):
                    emit({"shape": shape_name, "mixer": kind, "case": case, "target": target,
                          **kernel_breakdown(fn, device)})
        del x, inputs
        free_memory(device)
