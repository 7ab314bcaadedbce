"""Rounds of batched self-speculative decoding: measured against the slowest-row model.

With B rows drafting together a batch runs until its slowest row is done, so the rounds are more
than a row's average N / tokens_per_round. placement/speculative_cost.py predicts
E[max over rows of R_N] (`expected_rounds`: rows i.i.d. with one alpha; `expected_rounds_of_rows`:
each row with its own measured alpha; `expected_rounds_mixed`: rows drawn from measured per-row
alphas, what the draft choice uses). This script prints them beside the measured rounds:

1. `archived`: the committed runs (benchmarks/results/speculative_cuda.json, H200, and
   speculative_cpu.json) — they record rounds, alpha and the row average, not per-row alphas;
2. `fresh`: greedy speculative decoding (supernet/speculative.py) on this machine at the given
   batches, rounds only (nothing is timed, so a loaded machine does not matter), with per-row alphas.

    python benchmarks/bench_speculative_rounds.py                  # converted SmolLM2, CPU, a few minutes
    python benchmarks/bench_speculative_rounds.py --batches 8 --ks 2,4 --new-tokens 64 --context 128
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import RESULTS, print_table, write_results  # noqa: E402

PARTIAL = Path(tempfile.gettempdir()) / "speculative_rounds.partial.json"
COLUMNS = ["source", "batch", "context", "draft", "k", "alpha", "rounds", "row_mean_rounds", "predicted_one_row",
           "predicted_iid_max", "predicted_per_row_max", "predicted_mixed"]


def archived_rows() -> list[dict]:
    from supernet.placement.speculative_cost import expected_rounds

    out = []
    runs = []
    cuda = RESULTS / "speculative_cuda.json"
    if cuda.exists():
        data = json.loads(cuda.read_text())
        for key, run in data.get("bfloat16", {}).items():
            runs.append((f"H200 bf16 ({key})", run.get("new_tokens", data.get("new_tokens")), run["rows"]))
    cpu = RESULTS / "speculative_cpu.json"
    if cpu.exists():
        data = json.loads(cpu.read_text())
        runs.append(("CPU", data["new_tokens"], data["rows"]))
    for source, new_tokens, rows in runs:
        n = new_tokens - 1  # the first token comes from the prefill
        for r in rows:
            alpha, k, b = r["alpha"], r["k"], r["batch"]
            out.append({"source": source, "batch": b, "context": r["context"], "draft": r["draft"], "k": k,
                        "alpha": alpha, "rounds": r["stats"]["rounds"], "row_mean_rounds": n / r["tokens_per_round"],
                        "predicted_one_row": expected_rounds(alpha, k, n, 1),
                        "predicted_iid_max": expected_rounds(alpha, k, n, b), "predicted_per_row_max": None,
                        "predicted_mixed": None})
    return out


def fresh_rows(args) -> list[dict]:
    from transformers import AutoTokenizer

    from benchmarks.bench_speculative import checkpoint, corpus_prompts, load_model
    from supernet.placement.speculative_cost import expected_rounds, expected_rounds_mixed, expected_rounds_of_rows
    from supernet.speculative import speculative_generate

    path, source = checkpoint(args)
    model = load_model(path, "cpu", "float32")
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    target = model.config.resolve(args.target)
    n = args.new_tokens - 1
    out, t0 = [], time.time()
    for batch in [int(b) for b in args.batches.split(",")]:
        prompts = corpus_prompts(tokenizer, batch, args.context)
        for name in args.drafts.split(","):
            for k in [int(x) for x in args.ks.split(",")]:
                _, stats = speculative_generate(model, prompts, model.config.resolve(name), target, k=k,
                                                max_new_tokens=args.new_tokens)
                alpha = stats.per_token_acceptance
                row = {"source": f"fresh CPU ({source.split(',')[0]})", "batch": batch, "context": args.context,
                       "draft": name, "k": k, "alpha": alpha, "rounds": stats.rounds,
                       "row_mean_rounds": sum(stats.row_rounds_needed) / batch,
                       "predicted_one_row": expected_rounds(alpha, k, n, 1),
                       "predicted_iid_max": expected_rounds(alpha, k, n, batch),
                       "predicted_per_row_max": expected_rounds_of_rows(stats.row_alphas, k, n),
                       "predicted_mixed": expected_rounds_mixed(stats.row_alphas, k, n, batch),
                       "row_alphas": stats.row_alphas, "row_rounds_needed": stats.row_rounds_needed}
                out.append(row)
                PARTIAL.write_text(json.dumps(out, indent=1))  # a long run keeps what it measured
                print(f"[{time.time() - t0:.0f}s] batch {batch} {name} k={k}: alpha {alpha:.3f}, rounds {stats.rounds} "
                      f"(row mean {row['row_mean_rounds']:.1f}); predicted max {row['predicted_iid_max']:.1f} i.i.d., "
                      f"{row['predicted_per_row_max']:.1f} per-row alphas", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", help="supernet checkpoint (default: the demo's, else converted SmolLM2-135M)")
    ap.add_argument("--target", default="all-fa")
    ap.add_argument("--drafts", default="all-swa,skip-1/5")
    ap.add_argument("--batches", default="8")
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--ks", default="2,4")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--swa-window", type=int, default=64, help="converted checkpoint only")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--skip-fresh", action="store_true", help="only the archived runs")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/speculative_rounds.json)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = archived_rows()
    print_table(rows, COLUMNS, "archived runs: measured rounds against the slowest-row model")
    fresh = [] if args.skip_fresh else fresh_rows(args)
    if fresh:
        print_table(fresh, COLUMNS, "fresh runs (rounds only, greedy)")
    write_results("speculative_rounds", {
        "notes": ("rounds = measured rounds of the batch; row_mean_rounds = a row's average; predicted_one_row = "
                  "E[R_N] of one row; predicted_iid_max = E[max of B rows] with the run's alpha for every row; "
                  "predicted_per_row_max = the same with each row's own alpha; predicted_mixed = rows drawn "
                  "from the run's per-row alphas (what the draft choice uses); N = new_tokens - 1"),
        "new_tokens": args.new_tokens, "archived": rows, "fresh": fresh}, args.out)


if __name__ == "__main__":
    main()
