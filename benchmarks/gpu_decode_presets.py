"""Decode throughput of presets, side by side in one run (weights do not change decode speed).

Builds a SmolLM2-shaped supernet with random weights (bf16 on GPU), then for each preset of a
presets.json (plus the four uniform placements) measures greedy decode at --batch / --context, in
two passes (the first warms allocator and kernels, the second is reported), both as replayed CUDA
graphs (static decoding, the reported number) and eagerly (kernel by kernel from Python, for
comparison). Also re-measures the per-layer mixer costs with `placement.cost.measure_costs` and
compares the cost model's prediction (fixed + sum of the layers' costs) with each measured step.
First it checks that graphed static decoding gives the eager decoder's tokens (float32).

Usage: python benchmarks/gpu_decode_presets.py --presets benchmarks/results/e2e_presets.json [--smoke]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import print_table, write_results  # noqa: E402
from benchmarks.gpu_model import smollm2_config  # noqa: E402
from placement.cost import measure_costs  # noqa: E402
from supernet.cache import SupernetCache  # noqa: E402
from supernet.model import SupernetForCausalLM  # noqa: E402
from supernet.placement import Placement  # noqa: E402
from supernet.static_decode import StaticDecoder  # noqa: E402
from supernet.throughput import compare_decode  # noqa: E402


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="benchmarks/results/e2e_presets.json")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if args.smoke:
        config = smollm2_config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, swa_window=16,
                                vocab_size=256, num_hidden_layers=30, intermediate_size=128)
        args.batch, args.context, args.tokens = 2, 64, 4
    else:
        config = smollm2_config(swa_window=512)
    presets = json.loads(Path(args.presets).read_text())["presets"]
    placements = {m: Placement.uniform(m, 30) for m in ("fa", "swa", "gdn", "kda")}
    placements = {f"all-{k}": v for k, v in placements.items()}
    placements.update({p["name"]: Placement.parse(p["placement"], 30) for p in presets})
    mixed = {"mixed": Placement.parse(",".join(["fa", "swa", "gdn", "kda", "swa", "gdn"] * 5), 30)}
    check_context = 40 if args.smoke else config.swa_window + 88  # past the window: the ring wraps
    check = check_static_equals_eager(config, device, {**{k: placements[k] for k in list(placements)[:4]}, **mixed},
                                      check_context)
    print_table(check, ["placement", "tokens", "agreement", "cuda_graph"],
                "graphed static decoding vs eager decoding (float32): token agreement")

    model = SupernetForCausalLM(config).to(device, dtype).eval()
    graphed = compare_decode(model, placements, batch=args.batch, context=args.context, new_tokens=args.tokens)
    eager = compare_decode(model, placements, batch=args.batch, context=args.context, new_tokens=args.tokens,
                           cuda_graph=False)
    with torch.inference_mode():
        costs = measure_costs(model, args.context, args.batch, layers=[0], repeats=10, progress=False)
    base, base_eager = graphed["all-fa"]["tokens_per_s"], eager["all-fa"]["tokens_per_s"]
    rows = []
    for n, s_ in graphed.items():
        predicted_ms = costs.cost(placements[n])
        rows.append({
            "preset": n, "placement": placements[n].summary(), "ms_per_step": s_["ms_per_step"],
            "tokens_per_s": s_["tokens_per_s"], "speedup_vs_all_fa": s_["tokens_per_s"] / base,
            "predicted_ms_per_step": predicted_ms,
            "eager_ms_per_step": eager[n]["ms_per_step"],
            "eager_speedup_vs_all_fa": eager[n]["tokens_per_s"] / base_eager,
        })
    print_table(rows, ["preset", "placement", "ms_per_step", "predicted_ms_per_step", "speedup_vs_all_fa",
                       "eager_ms_per_step", "eager_speedup_vs_all_fa"],
                f"decode, batch {args.batch}, context {args.context} (CUDA graphs; eager for comparison)")
    cost_rows = [{"mixer": m, "ms_per_layer_step": float(costs.per_layer[m][0])} for m in costs.mixers]
    cost_rows.append({"mixer": "fixed", "ms_per_layer_step": costs.fixed})
    print_table(cost_rows, ["mixer", "ms_per_layer_step"], "measured per-layer decode cost")
    write_results("gpu_decode_presets" if not args.smoke else "gpu_decode_presets_smoke",
                  {"batch": args.batch, "context": args.context, "static_vs_eager_check": check, "rows": rows,
                   "costs": costs.to_dict()}, args.out)


if __name__ == "__main__":
    main()
