"""Self-speculative decoding in our own engine: acceptance, measured speedup and the cost model's prediction.

For every (batch, context, draft, k): held-out prompts (pydocs-eval) of `context` tokens, the target
alone (static decoding) against batched draft-and-verify (supernet/speculative.py), decode phase
only (prefills excluded, both sides), greedy; the output must be the target's own (`lossless`).

Predictions (placement/speculative_cost.py), beside the measurement:
- `predicted`: the formula with this device's costs: a CostTable measured here
  (supernet.measure.costs.measure_costs: per-layer mixer step costs plus the shared part) for C_t and C_d,
  the token cost from timing the target's (k+1)-token step against its 1-token step, and the
  per-token acceptance alpha measured in the run; the rounds are the slowest row's
  (`expected_rounds`, N = new_tokens - 1 per row), recorded as `predicted_rounds` beside the measured
  `rounds` (and `predicted_rounds_per_row_alpha`, with each row's own alpha).
- `analytic`: the same alpha with the analytic memory-bound (GPU) bytes table at this batch and
  context, and `analytic_b64_8k` at batch 64, context 8192 (the issue's GPU goal).

Device: `--device cuda` (the default when a GPU is there) puts the model on the GPU in `--dtype`
(bfloat16 by default there) and replays every decode step as a CUDA graph, the target alone's
(StaticDecoder) and the speculative engine's: graphs are captured before the timed region, and each
timed region is bracketed by torch.cuda.synchronize().

Checkpoint: `--ckpt` (a trained supernet gives meaningful acceptances); otherwise SmolLM2-135M
converted to a supernet and not trained: FA and SWA are the teacher's attention, GDN starts
silent (a GDN layer skips attention), so the drafts here are SWA (a short window) and
layer-skipping drafts; the JSON says which checkpoint was used.

    python benchmarks/bench_speculative.py                       # CPU, a few minutes
    python benchmarks/bench_speculative.py --batches 1,8 --contexts 256 --ks 2,4 --new-tokens 24
    python benchmarks/bench_speculative.py --device cuda --batches 8,64 --contexts 8192 --ks 2,4 \
        --new-tokens 64 --swa-window 512          # the GPU goal (issues 15 and 23)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import device_name, print_table, write_results  # noqa: E402

DATA_DIR = Path(os.environ.get("SUPERNET_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
# held-out text first; long contexts at large batches need more tokens than it has, then the training text
DATA_FILES = [DATA_DIR / "pydocs-eval.jsonl", DATA_DIR / "pydocs-train.jsonl"]


def converted_dir() -> Path:
    from supernet.teacher import cache_dir

    return cache_dir() / "bench-speculative-smollm2"


def load_model(path: Path, device: str, dtype: str):
    """The checkpoint on `device` in `dtype`, eval mode (the library loader; no CLI imports)."""
    import supernet.model  # noqa: F401  (registers the Auto classes)
    from supernet.model import SupernetForCausalLM

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    return SupernetForCausalLM.from_pretrained(path, dtype=torch_dtype).to(device).eval()


def draft_table(num_layers: int) -> dict[str, list[str]]:
    """Drafts that approximate all-fa in a converted (untrained) supernet."""
    every = lambda n, m: [m if i % n == n - 1 else "fa" for i in range(num_layers)]  # noqa: E731
    return {
        "all-fa": ["fa"] * num_layers,
        "all-swa": ["swa"] * num_layers,  # every layer sees only the last swa_window tokens
        "swa-half": every(2, "swa"),
        "skip-1/5": every(5, "gdn"),  # untrained GDN is silent: these layers skip attention
    }


def checkpoint(args) -> tuple[Path, str]:
    if args.ckpt:
        return Path(args.ckpt), f"given: {args.ckpt}"
    demo = Path("/work/main/runs/demo/final")
    if (demo / "config.json").exists():
        return demo, f"the demo's trained checkpoint {demo}"
    CONVERTED = converted_dir()
    if not (CONVERTED / "config.json").exists():
        from supernet.convert import convert_teacher
        from supernet.teacher import smollm2_hf_dir

        print(f"converting SmolLM2-135M into {CONVERTED} ...", flush=True)
        convert_teacher(smollm2_hf_dir(), CONVERTED)
    config = json.loads((CONVERTED / "config.json").read_text())
    config["presets"] = draft_table(config["num_hidden_layers"])
    config["swa_window"] = args.swa_window
    (CONVERTED / "config.json").write_text(json.dumps(config, indent=2))
    return CONVERTED, ("SmolLM2-135M converted to a supernet, untrained (FA/SWA = the teacher's attention, "
                       f"GDN silent = attention skipped), swa_window {args.swa_window}")


def corpus_prompts(tokenizer, batch: int, length: int) -> torch.Tensor:
    from supernet.measure.speculative import corpus_prompts as cut

    texts = [json.loads(line)["text"] for path in DATA_FILES if path.exists() for line in path.open()]
    try:
        return cut(tokenizer, texts, batch, length)
    except ValueError:
        raise SystemExit(f"corpora {[str(p) for p in DATA_FILES]} hold fewer than {batch} x {length} tokens; "
                         "set SUPERNET_DATA to a folder with pydocs-eval.jsonl / pydocs-train.jsonl") from None


def target_alone(model, prompts, target, new_tokens: int, ks) -> tuple[list[list[int]], float, dict[int, float]]:
    """(tokens, seconds of the decode phase, {k: token_fraction}) of the target alone."""
    from supernet.measure.speculative import time_target_alone

    return time_target_alone(model, prompts, target, new_tokens, ks)


def out_path(args) -> Path:
    return Path(args.out) if args.out else Path(__file__).resolve().parent / "results" / f"speculative_{torch.device(args.device).type}.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", help="supernet checkpoint (default: the demo's, else converted SmolLM2-135M)")
    ap.add_argument("--target", default="all-fa")
    ap.add_argument("--drafts", default="all-swa,swa-half,skip-1/5")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--contexts", default="128,512")
    ap.add_argument("--ks", default="2,4")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--swa-window", type=int, default=64, help="converted checkpoint only")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: bfloat16 on CUDA, else float32)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--record", help="write the measured acceptances into this presets.json")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/speculative_<device>.json)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    from supernet.measure.costs import measure_costs
    from supernet.placement.cost import analytic_costs
    from supernet.placement.speculative_cost import expected_rounds, expected_rounds_of_rows, predict, predict_from_costs
    from supernet.speculative import speculative_generate

    path, source = checkpoint(args)
    device = torch.device(args.device)
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    model = load_model(path, args.device, dtype)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    target = model.config.resolve(args.target)
    drafts = {name: model.config.resolve(name) for name in args.drafts.split(",")}
    ks = [int(k) for k in args.ks.split(",")]
    rows, t_start = [], time.time()
    for batch in [int(b) for b in args.batches.split(",")]:
        for context in [int(c) for c in args.contexts.split(",")]:
            prompts = corpus_prompts(tokenizer, batch, context).to(device)
            table = measure_costs(model, context, batch, layers=[0, model.config.num_hidden_layers // 2],
                                  mixers=sorted({m for p in [target, *drafts.values()] for m in p}),
                                  repeats=5, warmup=1, progress=False)
            want, t_step, fractions = target_alone(model, prompts, target, args.new_tokens, ks)
            print(f"[{time.time() - t_start:.0f}s] batch {batch}, context {context}: target {t_step * 1e3:.1f} ms/step "
                  f"(cost table {table.cost(target):.1f}), token fraction {fractions}", flush=True)
            for name, draft in drafts.items():
                for k in ks:
                    got, stats = speculative_generate(model, prompts, draft, target, k=k, max_new_tokens=args.new_tokens,
                                                      cuda_graph=device.type == "cuda")
                    tokens = sum(len(r) - 1 for r in got)  # the first token comes from the prefill
                    measured = t_step / (stats.decode_seconds / (tokens / batch))  # per token of a row
                    alpha = stats.per_token_acceptance
                    fr = fractions[k]
                    # the slowest of the rows sets the rounds: the first token comes from the prefill
                    mine = predict_from_costs(table.cost(target), table.cost(draft), fr * table.cost(target),
                                              fr * table.cost(draft), alpha, k, name=name, batch=batch,
                                              new_tokens=args.new_tokens - 1)
                    analytic = predict(analytic_costs(model.config, context, batch), target, draft, alpha, k,
                                       name=name, config=model.config)
                    gpu_goal = predict(analytic_costs(model.config, 8192, 64), target, draft, alpha, k,
                                       name=name, config=model.config)
                    row = {"batch": batch, "context": context, "draft": name, "k": k,
                           "acceptance": stats.acceptance_rate, "alpha": alpha,
                           "tokens_per_round": stats.tokens_per_round, "measured_speedup": measured,
                           "predicted": mine.speedup, "analytic": analytic.speedup, "analytic_b64_8k": gpu_goal.speedup,
                           "lossless": got == want, "lossless_rows": sum(a == b for a, b in zip(got, want)),
                           "first_difference": min((next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
                                                    for a, b in zip(got, want) if a != b), default=None),
                           "target_ms_per_step": t_step * 1e3,
                           "spec_ms_per_token": stats.decode_seconds / (tokens / batch) * 1e3,
                           "token_fraction": fr, "cost_target": table.cost(target), "cost_draft": table.cost(draft),
                           "rounds": stats.rounds,
                           "predicted_rounds": expected_rounds(alpha, k, args.new_tokens - 1, batch),
                           "predicted_rounds_per_row_alpha": expected_rounds_of_rows(stats.row_alphas, k,
                                                                                     args.new_tokens - 1),
                           "stats": stats.as_dict()}
                    rows.append(row)
                    print(f"  {name} k={k}: acceptance {stats.acceptance_rate:.2f}, x{measured:.2f} measured, "
                          f"x{mine.speedup:.2f} predicted, analytic x{analytic.speedup:.2f}, lossless {row['lossless']} "
                          f"({row['lossless_rows']}/{batch} rows)", flush=True)
                    partial = out_path(args)
                    partial.parent.mkdir(parents=True, exist_ok=True)
                    partial.with_suffix(".partial.json").write_text(json.dumps(rows, indent=1))
    columns = ["batch", "context", "draft", "k", "acceptance", "alpha", "tokens_per_round", "rounds",
               "predicted_rounds", "predicted_rounds_per_row_alpha", "measured_speedup", "predicted", "analytic",
               "analytic_b64_8k", "lossless"]
    print_table(rows, columns, f"self-speculative decoding, target {args.target}, {device_name()}")
    acceptance = {}
    for name in drafts:
        mine = [r for r in rows if r["draft"] == name]
        accepted = sum(r["stats"]["accepted"] for r in mine)
        acceptance[name] = {"alpha": accepted / max(1, accepted + sum(r["stats"]["rejections"] for r in mine)),
                            "drafted": sum(r["stats"]["drafted"] for r in mine),
                            # rows differ (prompts do): the draft choice draws rows from these at batch > 1
                            "row_alphas": [a for r in mine for a in r["stats"]["row_alphas"]]}
    if args.record:
        from supernet.draft_choice import record_acceptance

        record_acceptance(args.record, args.target, acceptance, f"pydocs-eval, {args.new_tokens} tokens x {args.batches} rows")
    out = out_path(args)
    write_results("speculative", {
        "checkpoint": source, "target": args.target, "drafts": {n: p.to_list() for n, p in drafts.items()},
        "new_tokens": args.new_tokens, "torch_device": str(device), "dtype": dtype, "cuda_graphs": device.type == "cuda",
        "threads": torch.get_num_threads(), "seconds": time.time() - t_start,
        "notes": ("decode phase only, greedy; measured_speedup = target ms/step over speculative ms per generated "
                  "token per row; predicted = placement/speculative_cost.py with costs measured here and the run's "
                  "alpha; analytic* = the memory-bound bytes model (GPU), projections only"),
        "acceptance": acceptance, "rows": rows}, out)


if __name__ == "__main__":
    main()
