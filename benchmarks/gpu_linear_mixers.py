"""GPU check and timing of the linear mixers, Gated DeltaNet (gdn) and Kimi Delta Attention (kda).

1. Correctness, relative error ||out - ref|| / ||ref|| with fresh random inputs per check:
   - the fused pieces on the device (bf16, < 1e-2): fla's short conv (prefill, prefill from a tail,
     the in-place decode update) and gated RMSNorm against our torch paths on the same GPU, and
     the delta rule with the gates computed inside fla's kernels (raw gate input + A_log, dt_bias,
     beta logits) against the same kernels fed precomputed gates (chunk and fused recurrent);
   - each mixer's CUDA path (fla's Triton kernels, bf16) against its CPU torch path (float32) with
     the same weights (< 1e-2): prefill through the chunk kernel (T=300) and the fused recurrent
     kernel (T=40), prefill + token-by-token decode with the cache, decode steps replayed as a CUDA
     graph against the same steps run eagerly, and a training step (outputs and gradients). Plus the
     raw ops in float32 against the torch ops (argument conventions, < 1e-3).
2. Timing per layer (median of triton's do_bench): prefill (with a fresh decode cache) and one
   decode step, for our whole mixer layer (projections, convs, gates, kernel, norm, o_proj) and
   for the raw fla op alone on the same shapes (precomputed gates). Decode is timed eagerly and as a
   CUDA graph replay (the layer's one-token step captured with its static cache, as
   supernet/static_decode.py serves; the raw op captured alike): eager decode is launch-bound.
   Each layer time is also taken with the fused paths off (SUPERNET_FUSED_KERNELS=0: torch conv,
   norm and gates, the layer as it was before them), in the same run on the same device.
   Second reference: fla's own complete layer (fla.layers.GatedDeltaNet / KimiDeltaAttention) with
   the same shapes (`fla_layer_kwargs`) and our mixer's weights, timed alike on the same input
   (fla_layer_ms, layer_over_fla_layer; decode eager only, through fla's Cache); built once per
   (shape, mixer) and cross-checked against ours (fla_layer_rel_err). The raw op is a floor no layer
   with seven projection GEMMs reaches; fla's layer does the same work as ours. A failure there is
   recorded in the row (fla_layer_error), not as an item error. Not on the CPU (--smoke).
   - SmolLM2 layer (hidden 576, 9 heads x 64): prefill batch 1 at 2k/8k/32k tokens and batch 64 at
     2k/8k (then 64 x 32k and batch 8 if time is left); decode batch 1 and 64 at context 2k/8k/32k.
   - FACTS.md's shape (16 heads x 128, hidden 2048): prefill batch 4 at 2k, decode batch 64 at
     4k/32k (then prefill batch 4 at 8k/32k), to compare with FACTS.md (GDN 0.59/1.24/4.29 ms,
     KDA 0.74/2.29/8.86 ms for prefill batch 4 at 2k/8k/32k).
   A linear mixer's decode state has the same size at every context, so the decode cases start
   from a synthetic state (random conv tails and recurrent matrix) instead of a real prefill; the
   context column is a label that shows the cost does not depend on it.
3. Kernel breakdown (torch.profiler) of one SmolLM2 prefill (batch 1, 2048 tokens) and one eager
   decode step (batch 1 and 64), layer, raw op and layer with the fused paths off: kernels per call,
   GPU kernel time per call, wall
   time per call, and the top kernels by time, so the gap between layer and op can be attributed.

Robustness (the first run of every new kernel shape pays Triton compilation and fla's autotuning,
tens of seconds each, so a time-boxed run may not finish):
  - the work is a list of items run in order of importance: (a) checks of the fused pieces and of
    inference (prefill, decode with the cache, graphed decode) for gdn and kda on the SmolLM2 shape,
    which also compile and autotune the forward kernels the timings reuse; (b) the required
    timings: SmolLM2 prefill batch 1 and 64, decode batch 1 and 64, the kernel breakdown, then the
    FACTS shape's decode batch 64 and prefill batch 4 at 2k; (c) the rest: SmolLM2 prefill 64 x 32k
    and batch 8, the training-step checks (backward kernels: a new set to compile), the fp32 raw-op
    checks (another dtype and head count, so a new set too), FACTS prefill at 8k/32k;
  - within a mixer the rows share kernel shapes (fla's autotune keys hold heads and head size,
    not batch or length; its gated norm also keys on the row count in buckets of 65536 rows), so
    mostly only the first row of each group pays the autotuning;
  - after every check row and every timing row the output JSON is rewritten (atomically) with all
    done so far and "complete": false; "complete": true once every item ran or was skipped;
  - --time-limit: no new item starts after that many seconds; the rest are recorded under
    "skipped" with reason "skipped (time limit)". An item that raises is recorded under "errors"
    and the run goes on.

Usage: python benchmarks/gpu_linear_mixers.py [--out FILE] [--time-limit S] [--only-smollm2] [--smoke]
  --smoke: tiny shapes on the CPU (the "device path" is then the torch path in bf16, decode is not
  graphed, the breakdown lists CPU ops); for testing the script itself.
  benchmarks/gpu/run_linear.sh runs it on a GPU machine.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, device_name, print_table  # noqa: E402
from supernet.measure.fla_layer import (FLA_CHECK_TOKENS, FLA_LAYER_CLASSES, FLA_LAYER_OFF_CUDA,  # noqa: E402
                                        fla_layer_differences, fla_layer_kwargs)
from supernet.measure.kernels import profile_mixer  # noqa: E402
from supernet.measure.linear_mixers import (MIXERS, Emit, TimingMixers, check_fused_ops, check_inference,  # noqa: E402
                                            check_ops, check_train, free_memory, time_decode, time_prefill)
from supernet.measure.shapes import LINEAR_SHAPES, linear_config  # noqa: E402
from supernet.measure.timer import DO_BENCH_REP_MS, DO_BENCH_WARMUP_MS  # noqa: E402
from supernet.ops import delta_rule  # noqa: E402
from supernet.ops.fla_backend import ENV_SWITCH  # noqa: E402

SKIPPED_TIME = "skipped (time limit)"

# Per shape: "prefill" [(batch, tokens)] and "decode" [(batch, context)] are section (b), run before
# everything but the checks; "extra_prefill" goes to section (c). "profile": the kernel breakdown
# (prefill (batch, tokens) and decode batches) of the main shape, in section (b).
FULL = {
    "shapes": {
        "smollm2": dict(**LINEAR_SHAPES["smollm2"],
                        prefill=[(1, 2048), (1, 8192), (1, 32768), (64, 2048), (64, 8192)],
                        decode=[(b, c) for b in (1, 64) for c in (2048, 8192, 32768)],
                        extra_prefill=[(64, 32768), (8, 2048), (8, 8192), (8, 32768)]),
        "facts-16x128": dict(**LINEAR_SHAPES["facts-16x128"],
                             prefill=[(4, 2048)], decode=[(64, 4096), (64, 32768)],
                             extra_prefill=[(4, 8192), (4, 32768)]),
    },
    "main_shape": "smollm2",
    "profile": dict(prefill=(1, 2048), decode_batches=(1, 64)),
}
SMOKE = {
    "shapes": {
        "tiny": dict(hidden=64, heads=2, head_dim=32, prefill=[(1, 64), (1, 130), (4, 64)],
                     decode=[(1, 64), (4, 130)], extra_prefill=[(2, 130)]),
        "tiny-wide": dict(hidden=64, heads=1, head_dim=64, prefill=[(2, 64)], decode=[(4, 130)],
                          extra_prefill=[(2, 130)]),
    },
    "main_shape": "tiny",
    "profile": dict(prefill=(1, 64), decode_batches=(1, 4)),
}


# ---------------------------------------------------------------------------------- plan and results


class Item:
    """One unit of work: a check (emits several rows) or one timing row."""

    def __init__(self, name: str, group: str, section: str, run: Callable[[Emit], None]) -> None:
        self.name, self.group, self.section, self.run = name, group, section, run


def build_plan(plan: dict, device: str, dtype: torch.dtype, only_main: bool) -> list[Item]:
    """The items in the order they run: (a) checks, (b) required timings and the kernel breakdown,
    (c) the rest (see the module docstring)."""
    shapes, main = plan["shapes"], plan["main_shape"]
    main_spec = shapes[main]
    others = {} if only_main else {name: spec for name, spec in shapes.items() if name != main}
    check_config = linear_config(main_spec["hidden"], main_spec["heads"], main_spec["head_dim"])
    seeds = {kind: 100 * (i + 1) for i, kind in enumerate(MIXERS)}
    mixers = TimingMixers(device, dtype)
    items: list[Item] = []

    def prefill(group: str, shape_name: str, spec: dict, kind: str, B: int, T: int) -> None:
        items.append(Item(f"prefill {shape_name} {kind} batch={B} tokens={T}", group, "prefill",
                          lambda emit: emit(time_prefill(mixers, shape_name, spec, kind, B, T))))

    def decode(group: str, shape_name: str, spec: dict, kind: str, B: int, ctx: int) -> None:
        items.append(Item(f"decode {shape_name} {kind} batch={B} context={ctx}", group, "decode",
                          lambda emit: emit(time_decode(mixers, shape_name, spec, kind, B, ctx))))

    # (a) checks: also compile + autotune the forward kernels that (b) uses
    items.append(Item("check fused pieces (conv, norm, in-kernel gates)", "a", "correctness",
                      lambda emit: check_fused_ops(main_spec, check_config, device, dtype, 7, emit)))
    for kind in MIXERS:
        items.append(Item(f"check {kind} inference", "a", "correctness",
                          lambda emit, k=kind: check_inference(k, check_config, device, dtype, seeds[k], emit)))
    # (b) required timings, one (shape, kind) at a time (its kernels autotune once); the kernel
    # breakdown right after the first prefill row, which has compiled everything it runs
    for kind in MIXERS:
        first, *rest = main_spec["prefill"]
        prefill("b", main, main_spec, kind, *first)
        items.append(Item(f"profile {main} {kind}", "b", "profile",
                          lambda emit, k=kind: profile_mixer(mixers, main, main_spec, k, plan["profile"], emit)))
        for B, ctx in main_spec["decode"]:
            decode("b", main, main_spec, kind, B, ctx)
        for B, T in rest:
            prefill("b", main, main_spec, kind, B, T)
    for shape_name, spec in others.items():  # decode first: no chunk kernels to autotune for a new shape
        for kind in MIXERS:
            for B, ctx in spec["decode"]:
                decode("b", shape_name, spec, kind, B, ctx)
        for kind in MIXERS:
            for B, T in spec["prefill"]:
                prefill("b", shape_name, spec, kind, B, T)
    # (c) the rest: the main shape's extra prefills, training and raw-op checks, other shapes' extras
    for kind in MIXERS:
        for B, T in main_spec.get("extra_prefill", ()):
            prefill("c", main, main_spec, kind, B, T)
    for kind in MIXERS:
        items.append(Item(f"check {kind} training step", "c", "correctness",
                          lambda emit, k=kind: check_train(k, check_config, device, dtype, seeds[k], emit)))
    for kind in MIXERS:
        items.append(Item(f"check {kind} raw ops fp32", "c", "correctness",
                          lambda emit, k=kind: check_ops(k, device, seeds[k] + 50, emit)))
    for shape_name, spec in others.items():
        for kind in MIXERS:
            for B, T in spec.get("extra_prefill", ()):
                prefill("c", shape_name, spec, kind, B, T)
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
    parser.add_argument("--items", default=None, metavar="REGEX",
                        help="run only the items whose name matches (after the (a) checks, which always run), "
                             "e.g. 'prefill smollm2 .* batch=64 tokens=32768' for rows a time box left out")
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
    if args.items:
        try:
            wanted = re.compile(args.items)
        except re.error as exc:
            print(f"error: --items is not a regular expression ({exc}); quote it, e.g. --items 'tokens=32768'",
                  file=sys.stderr)
            return 2
        items = [item for item in items if item.group == "a" or wanted.search(item.name)]
        if all(item.group == "a" for item in items):
            print(f"error: --items {args.items!r} matches no item; names look like "
                  "'prefill smollm2 gdn batch=64 tokens=32768' or 'decode smollm2 kda batch=1 context=2048'",
                  file=sys.stderr)
            return 2
    shapes = {n: s for n, s in plan["shapes"].items() if not args.only_smollm2 or n == plan["main_shape"]}

    results: dict[str, list] = {"correctness": [], "prefill": [], "decode": [], "profile": []}
    item_log: list[dict] = []
    skipped: list[dict] = []
    errors: list[dict] = []
    header = {
        "device": device_name(), "torch": torch.__version__, **versions(),
        "date": time.strftime("%Y-%m-%d %H:%M"), "smoke": args.smoke, "dtype": str(dtype),
        "kernels": "fla chunk_gated_delta_rule / fused_recurrent_gated_delta_rule, chunk_kda / fused_recurrent_kda; "
                   "layer: fla causal_conv1d(_update), rms_norm_gated, gates inside the delta-rule kernels"
                   if device == "cuda" else "torch (supernet.ops)",
        "time_limit_s": args.time_limit, "only_smollm2": args.only_smollm2, "items_filter": args.items,
        "bench": f"triton do_bench median, warmup {DO_BENCH_WARMUP_MS} ms, rep {DO_BENCH_REP_MS} ms, after one "
                 "untimed call (compilation, autotuning); *_graph_ms: the same of one CUDA graph replay"
                 if device == "cuda" else "perf_counter median of 3",
        "shapes": shapes, "profile_cases": plan["profile"],
        "fla_layer": {
            name: {kind: {"class": f"fla.layers.{FLA_LAYER_CLASSES[kind]}",
                          "kwargs": fla_layer_kwargs(spec, kind, cfg),
                          "differences": fla_layer_differences(kind, cfg)}
                   for kind in MIXERS}
            for name, spec in shapes.items()
            for cfg in [linear_config(spec["hidden"], spec["heads"], spec["head_dim"])]
        },
        "order": "(a) checks: fused pieces, inference incl. graphed decode; (b) main shape: prefill batch 1, "
                 "kernel breakdown, decode (eager + graph), prefill batch 64 at 2k/8k; other shapes' decode, then "
                 "prefill rows; "
                 "(c) main shape's extra prefills, training-step checks, fp32 raw-op checks, other shapes' extras",
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
                f"layer_torch_ms / layer_torch_graph_ms / 'layer (torch paths)': the same layer with {ENV_SWITCH}=0 "
                "(torch conv, norm and gates: the layer before the fused paths), same run and device",
                "prefill runs with a fresh decode cache (final states kept), inference mode",
                "decode starts from a synthetic state: a linear mixer's state is the same size at any context",
                "decode *_graph_ms: one step captured as a CUDA graph (supernet.static_decode.GraphedStep) and replayed; "
                "layer_ms/op_ms are eager (launch-bound for small batches)",
                "profile: torch.profiler, per call: kernels_per_call, kernel_ms_per_call (sum of GPU kernel times), "
                "wall_ms_per_call (includes profiler overhead), top kernels, by_category_ms (from kernel names)",
                "items[].seconds: wall time of each item, compilation and autotuning included",
                "fla_layer_ms: fla's own layer (header fla_layer: class, kwargs, differences) with our mixer's "
                "weights, same input, dtype, inference mode and bench as layer_ms; prefill with a fresh fla Cache "
                "per call (use_cache=True), decode eager from a random state in fla's Cache (no CUDA graph); "
                "layer_over_fla_layer = layer_ms / fla_layer_ms (eager both); fla_layer_rel_err: fla's layer vs "
                f"ours on {FLA_CHECK_TOKENS} tokens, batch 2, same weights (bf16 both; recorded, not a check); "
                "fla_layer_error: why a row has no fla_layer_ms"
                + ("" if device == "cuda" else f"; this run: {FLA_LAYER_OFF_CUDA}"),
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
            elif item.section == "profile":
                print(f"[{time.perf_counter() - started:6.1f}s] profile {row['shape']} {row['mixer']} {row['case']} "
                      f"{row['target']}: {row['kernels_per_call']:g} kernels, {row['kernel_ms_per_call']:.4g} ms in "
                      f"kernels, {row['wall_ms_per_call']:.4g} ms wall", flush=True)
            else:
                where = f"tokens={row['tokens']}" if "tokens" in row else f"context={row['context']}"
                graph = (f"; graph: layer {row['layer_graph_ms']:.4g} ms, op {row['op_graph_ms']:.4g} ms"
                         if row.get("layer_graph_ms") is not None else "")
                if row.get("fla_layer_ms") is not None:
                    fla = f"; fla layer {row['fla_layer_ms']:.4g} ms (ours x{row['layer_over_fla_layer']:.3g})"
                elif row.get("fla_layer_error"):
                    fla = f"; fla layer failed: {row['fla_layer_error'][:200]}"
                else:
                    fla = ""
                print(f"[{time.perf_counter() - started:6.1f}s] {item.section} {row['shape']} {row['mixer']} "
                      f"batch={row['batch']} {where}: layer {row['layer_ms']:.4g} ms, op {row['op_ms']:.4g} ms"
                      f"{graph}{fla}", flush=True)
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
        ("prefill", ["shape", "mixer", "batch", "tokens", "layer_ms", "op_ms", "layer_over_op", "fla_layer_ms",
                     "layer_over_fla_layer", "fla_layer_rel_err", "layer_torch_ms", "layer_tokens_per_s"],
         "prefill per layer (ms, median)"),
        ("decode", ["shape", "mixer", "batch", "context", "layer_ms", "op_ms", "layer_graph_ms", "op_graph_ms",
                    "graph_layer_over_op", "fla_layer_ms", "layer_over_fla_layer", "layer_torch_ms",
                    "layer_torch_graph_ms"],
         "decode step per layer (ms, median; *_graph_ms: CUDA graph replay; fla_layer_ms: fla's layer, eager)"),
        ("profile", ["shape", "mixer", "case", "target", "kernels_per_call", "kernel_ms_per_call", "wall_ms_per_call"],
         "kernel breakdown per call (top kernels in the JSON)"),
    )
    for section, columns, title in tables:
        if results[section]:  # print_table needs at least one row
            print_table(results[section], columns, title)
    timed = results["prefill"] + results["decode"]
    for note in sorted({r.get("fla_layer_error") or r.get("fla_layer_skipped") for r in timed} - {None}):
        print(f"fla layer: {note[:300]}")
    ok = bool(results["correctness"]) and all(r["ok"] for r in results["correctness"]) and not errors
    elapsed = time.perf_counter() - started
    print(f"\nwrote {out_path}")
    print(f"{'all checks passed' if ok else 'SOME CHECKS FAILED OR ERRORS'}; {len(item_log)} items done, "
          f"{len(skipped)} skipped, {len(errors)} errors; {elapsed:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
