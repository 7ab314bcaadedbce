"""Decode throughput of presets, side by side in one run (weights do not change decode speed).

Builds a SmolLM2-shaped supernet with random weights (bf16 on GPU), then for each preset of a
presets.json (plus the four uniform placements) measures greedy decode at --batch / --context, in
two passes (the first warms allocator and kernels, the second is reported), both as replayed CUDA
graphs (static decoding, the reported number) and eagerly (kernel by kernel from Python, for
comparison). Also re-measures the per-layer mixer costs with `supernet.measure.costs.measure_costs` and
compares the cost model's prediction (fixed + sum of the layers' costs) with each measured step.
First it checks that graphed static decoding gives the eager decoder's tokens (float32).

Two more tables, side by side in the same run:
- kernels: the uniform placements with fla's fused norm / SwiGLU / conv / gated-norm kernels
  (the default on CUDA) against the pure-torch paths (SUPERNET_FUSED_KERNELS=0), after checking
  that both give the same greedy tokens and close logits (bf16);
- contexts: the per-layer cost table at several contexts, the cost model's all-fa / all-swa / preset
  speedups at each, and measured whole steps at the longest context for all-fa and all-swa, to show
  where the speedup grows as FA's key/value reads grow (speedup_vs_context.png).

Usage: python benchmarks/gpu_decode_presets.py --presets benchmarks/results/e2e_presets.json [--smoke]
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import print_table, write_results  # noqa: E402
from supernet.measure.shapes import smollm2_config  # noqa: E402
from supernet.measure.costs import measure_costs  # noqa: E402
from supernet.cache import SupernetCache  # noqa: E402
from supernet.model import SupernetForCausalLM  # noqa: E402
from supernet.ops.fla_backend import fused_kernels  # noqa: E402
from supernet.layout import MIXERS, Placement  # noqa: E402
from supernet.static_decode import StaticDecoder  # noqa: E402
from supernet.measure.throughput import compare_decode  # noqa: E402


@torch.no_grad()
def check_static_equals_eager(config, device: str, placements: dict[str, Placement], context: int,
                              new_tokens: int = 24, batch: int = 2) -> list[dict]:
    """Greedy tokens of graphed static decoding vs ordinary eager decoding, float32, same weights."""
    torch.manual_seed(0)
    model = SupernetForCausalLM(config).to(device, torch.float32).eval()
    ids = torch.randint(0, config.vocab_size, (batch, context), device=device)
    rows = []
    for name, placement in placements.items():
        tokens = {}
        for mode in ("eager", "static"):
            cache = SupernetCache(config.num_hidden_layers)
            token = model(ids, past_key_values=cache, use_cache=True, placement=placement,
                          logits_to_keep=1).logits[:, -1:].argmax(-1)
            if mode == "static":
                decoder = StaticDecoder(model, placement, cache, max_new_tokens=new_tokens)
                tokens[mode] = decoder.generate(token, new_tokens)
            else:
                out = []
                for _ in range(new_tokens):
                    token = model(token, past_key_values=cache, use_cache=True, placement=placement).logits.argmax(-1)
                    out.append(token)
                tokens[mode] = torch.cat(out, 1)
        same = (tokens["eager"] == tokens["static"]).float().mean().item()
        rows.append({"placement": name, "tokens": new_tokens * batch, "agreement": same,
                     "cuda_graph": device == "cuda"})
    del model
    return rows


@torch.no_grad()
def check_fused_equals_torch(model, placements: dict[str, Placement], context: int, new_tokens: int = 4,
                             batch: int = 2) -> list[dict]:
    """Both kernel paths in the model's dtype against a float32 torch-path reference, same weights.

    Comparing the two bf16 paths with each other is not a test: a 30-layer stack of random-weight
    GDN/KDA layers amplifies bf16 rounding until greedy tokens differ (both paths are then ~0.3-0.6
    away from float32 in relative logit error, on an H200). What must hold is that the fused path is
    no further from float32 than the torch path is.
    """
    device = next(model.parameters()).device
    reference = copy.deepcopy(model).float()
    gen = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (batch, context), generator=gen).to(device)

    def logits(m, placement, fused: bool) -> torch.Tensor:
        with fused_kernels(fused):
            cache = SupernetCache(m.config.num_hidden_layers)
            out = [m(ids, past_key_values=cache, use_cache=True, placement=placement, logits_to_keep=8).logits.float()]
            token = out[0][:, -1:].argmax(-1)
            for _ in range(new_tokens):
                step = m(token, past_key_values=cache, use_cache=True, placement=placement).logits.float()
                out.append(step)
                token = step.argmax(-1)
        return torch.cat(out, 1)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a - b).norm() / b.norm()).item()

    rows = []
    for name, placement in placements.items():
        ref = logits(reference, placement, False)
        torch_path, fused_path = logits(model, placement, False), logits(model, placement, True)
        fp32_fused = logits(reference, placement, True)
        row = {"placement": name, "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
               "torch_path_rel_err": rel(torch_path, ref), "fused_path_rel_err": rel(fused_path, ref),
               "fp32_fused_vs_torch_rel_err": rel(fp32_fused, ref)}
        row["ok"] = row["fused_path_rel_err"] <= 1.25 * row["torch_path_rel_err"] + 1e-3
        rows.append(row)
    del reference
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="benchmarks/results/e2e_presets.json")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--contexts", default="2048,8192,16384,32768",
                    help="contexts of the per-layer cost curve (comma-separated)")
    ap.add_argument("--no-kernel-compare", action="store_true", help="skip the fused-vs-torch tables")
    ap.add_argument("--no-eager", action="store_true", help="skip the eager (kernel-by-kernel) timings")
    ap.add_argument("--no-check", action="store_true", help="skip the graphed-vs-eager token check")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if args.smoke:
        config = smollm2_config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, swa_window=16,
                                vocab_size=256, num_hidden_layers=30, intermediate_size=128)
        args.batch, args.context, args.tokens, args.contexts = 2, 64, 4, "32,64"
    else:
        config = smollm2_config(swa_window=512)
    presets = json.loads(Path(args.presets).read_text())["presets"]
    placements = {m: Placement.uniform(m, 30) for m in MIXERS}
    placements = {f"all-{k}": v for k, v in placements.items()}
    placements.update({p["name"]: Placement.parse(p["placement"], 30) for p in presets})
    mixed = {"mixed": Placement.parse(",".join(["fa", "swa", "gdn", "kda", "swa", "gdn"] * 5), 30)}
    check_context = 40 if args.smoke else config.swa_window + 88  # past the window: the ring wraps
    check = [] if args.no_check else check_static_equals_eager(
        config, device, {**{k: placements[k] for k in list(placements)[:4]}, **mixed}, check_context)
    if check:
        print_table(check, ["placement", "tokens", "agreement", "cuda_graph"],
                    "graphed static decoding vs eager decoding (float32): token agreement")

    model = SupernetForCausalLM(config).to(device, dtype).eval()
    graphed = compare_decode(model, placements, batch=args.batch, context=args.context, new_tokens=args.tokens)
    eager = None if args.no_eager else compare_decode(model, placements, batch=args.batch, context=args.context,
                                                      new_tokens=args.tokens, cuda_graph=False)
    with torch.inference_mode():
        costs = measure_costs(model, args.context, args.batch, layers=[0], repeats=10, progress=False)
    base = graphed["all-fa"]["tokens_per_s"]
    base_eager = eager["all-fa"]["tokens_per_s"] if eager else None
    rows = []
    for n, s_ in graphed.items():
        predicted_ms = costs.cost(placements[n])
        rows.append({
            "preset": n, "placement": placements[n].summary(), "ms_per_step": s_["ms_per_step"],
            "tokens_per_s": s_["tokens_per_s"], "speedup_vs_all_fa": s_["tokens_per_s"] / base,
            "predicted_ms_per_step": predicted_ms,
            "eager_ms_per_step": eager[n]["ms_per_step"] if eager else None,
            "eager_speedup_vs_all_fa": eager[n]["tokens_per_s"] / base_eager if eager else None,
        })
    print_table(rows, ["preset", "placement", "ms_per_step", "predicted_ms_per_step", "speedup_vs_all_fa",
                       "eager_ms_per_step", "eager_speedup_vs_all_fa"],
                f"decode, batch {args.batch}, context {args.context} (CUDA graphs; eager for comparison)")
    cost_rows = [{"mixer": m, "ms_per_layer_step": float(costs.per_layer[m][0])} for m in costs.mixers]
    cost_rows.append({"mixer": "fixed", "ms_per_layer_step": costs.fixed})
    print_table(cost_rows, ["mixer", "ms_per_layer_step"], "measured per-layer decode cost")
    result = {"batch": args.batch, "context": args.context, "static_vs_eager_check": check, "rows": rows,
              "costs": costs.to_dict()}
    name = "gpu_decode_presets" if not args.smoke else "gpu_decode_presets_smoke"
    write_results(name, result, args.out)  # what is done so far survives a later failure

    uniform = {k: placements[k] for k in ("all-fa", "all-swa", "all-gdn", "all-kda")}
    if not args.no_kernel_compare:
        result["fused_vs_torch_check"] = check_fused_equals_torch(model, {**uniform, **mixed}, check_context)
        print_table(result["fused_vs_torch_check"], ["placement", "torch_path_rel_err", "fused_path_rel_err",
                                                     "fp32_fused_vs_torch_rel_err", "ok"],
                    "fused kernels vs torch paths: relative logit error against a float32 torch-path reference")
        timing = {}
        for on in (False, True):
            with fused_kernels(on):
                timing[on] = compare_decode(model, uniform, batch=args.batch, context=args.context,
                                            new_tokens=args.tokens)
        result["kernels"] = [{"placement": n, "torch_ms_per_step": timing[False][n]["ms_per_step"],
                              "fused_ms_per_step": timing[True][n]["ms_per_step"],
                              "fused_speedup": timing[False][n]["ms_per_step"] / timing[True][n]["ms_per_step"]}
                             for n in uniform]
        print_table(result["kernels"], ["placement", "torch_ms_per_step", "fused_ms_per_step", "fused_speedup"],
                    f"graphed decode step, fused kernels vs torch paths (batch {args.batch}, context {args.context})")
        write_results(name, result, args.out)

    def save_curve(curve: dict) -> None:
        result["contexts"] = curve
        write_results(name, result, args.out)

    result["contexts"] = context_curve(model, placements, [int(c) for c in args.contexts.split(",")], args,
                                       save_curve)
    write_results(name, result, args.out)
    plot_context_curve(result["contexts"], Path(args.out).with_name("speedup_vs_context.png") if args.out
                       else Path("benchmarks/results/speedup_vs_context.png"))


def context_curve(model, placements: dict[str, Placement], contexts: list[int], args, save=None) -> dict:
    """Per-layer costs at each context, the cost model's speedups, and measured steps at the longest."""
    table = []
    save = save or (lambda curve: None)
    for n_ctx in contexts:
        with torch.inference_mode():
            costs = measure_costs(model, n_ctx, args.batch, layers=[0], repeats=10, progress=False)
        fa_ms = costs.cost(placements["all-fa"])
        row = {"context": n_ctx, "fixed_ms": costs.fixed,
               **{f"{m}_ms_per_layer": float(costs.per_layer[m][0]) for m in costs.mixers},
               "predicted_speedup": {n: fa_ms / costs.cost(p) for n, p in placements.items()}}
        table.append(row)
        print(f"context {n_ctx}: fixed {costs.fixed:.3f} ms, per layer "
              + ", ".join(f"{m} {float(costs.per_layer[m][0]):.4f}" for m in costs.mixers)
              + " | predicted speedup " + ", ".join(f"{n} {v:.2f}x" for n, v in row["predicted_speedup"].items()))
        save({"batch": args.batch, "table": table, "measured_longest": None})
    longest = max(contexts)
    pair = {k: placements[k] for k in ("all-fa", "all-swa")}
    measured = compare_decode(model, pair, batch=args.batch, context=longest, new_tokens=args.tokens)
    check = {"context": longest, "all_fa_ms": measured["all-fa"]["ms_per_step"],
             "all_swa_ms": measured["all-swa"]["ms_per_step"],
             "measured_all_swa_speedup": measured["all-fa"]["ms_per_step"] / measured["all-swa"]["ms_per_step"],
             "predicted_all_swa_speedup": table[-1]["predicted_speedup"]["all-swa"]}
    print(f"measured at context {longest}: all-fa {check['all_fa_ms']:.2f} ms, all-swa {check['all_swa_ms']:.2f} ms, "
          f"speedup {check['measured_all_swa_speedup']:.2f}x (predicted {check['predicted_all_swa_speedup']:.2f}x)")
    return {"batch": args.batch, "table": table, "measured_longest": check}


def plot_context_curve(curve: dict, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return
    table = curve["table"]
    contexts = [r["context"] for r in table]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name in table[0]["predicted_speedup"]:
        if name == "all-fa":
            continue
        ax.plot(contexts, [r["predicted_speedup"][name] for r in table], marker="o", label=name)
    m = curve["measured_longest"]
    ax.scatter([m["context"]], [m["measured_all_swa_speedup"]], marker="*", s=160, color="k",
               label="all-swa, measured whole step", zorder=5)
    ax.axhline(4.0, color="grey", linestyle=":", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel(f"decode speedup vs all-fa (batch {curve['batch']})")
    ax.set_title("graphed decode step: cost-model speedup by context")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
