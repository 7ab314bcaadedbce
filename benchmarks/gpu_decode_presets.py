"""Decode throughput of presets, side by side in one run (weights do not change decode speed).

Builds a SmolLM2-shaped supernet with random weights (bf16 on GPU), then for each preset of a
presets.json (plus the four uniform placements) measures greedy decode at --batch / --context, in
two passes (the first warms allocator and kernels, the second is reported). Also re-measures the
per-layer mixer costs with `placement.cost.measure_costs`.

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
from supernet.model import SupernetForCausalLM  # noqa: E402
from supernet.placement import Placement  # noqa: E402
from supernet.throughput import compare_decode  # noqa: E402


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
    model = SupernetForCausalLM(config).to(device, dtype).eval()
    presets = json.loads(Path(args.presets).read_text())["presets"]
    placements = {m: Placement.uniform(m, 30) for m in ("fa", "swa", "gdn", "kda")}
    placements = {f"all-{k}": v for k, v in placements.items()}
    placements.update({p["name"]: Placement.parse(p["placement"], 30) for p in presets})
    speeds = compare_decode(model, placements, batch=args.batch, context=args.context, new_tokens=args.tokens)
    base = speeds["all-fa"]["tokens_per_s"]
    rows = [{"preset": n, "placement": placements[n].summary(), "ms_per_step": s["ms_per_step"],
             "tokens_per_s": s["tokens_per_s"], "speedup_vs_all_fa": s["tokens_per_s"] / base}
            for n, s in speeds.items()]
    print_table(rows, ["preset", "placement", "ms_per_step", "tokens_per_s", "speedup_vs_all_fa"],
                f"decode, batch {args.batch}, context {args.context}")
    with torch.inference_mode():
        costs = measure_costs(model, args.context, args.batch, layers=[0], repeats=10, progress=False)
    cost_rows = [{"mixer": m, "ms_per_layer_step": float(costs.per_layer[m][0])} for m in costs.mixers]
    cost_rows.append({"mixer": "fixed", "ms_per_layer_step": costs.fixed})
    print_table(cost_rows, ["mixer", "ms_per_layer_step"], "measured per-layer decode cost")
    write_results("gpu_decode_presets" if not args.smoke else "gpu_decode_presets_smoke",
                  {"batch": args.batch, "context": args.context, "rows": rows, "costs": costs.to_dict()}, args.out)


if __name__ == "__main__":
    main()
