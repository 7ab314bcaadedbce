"""Screen BIG-bench multiple-choice tasks on the real teacher (SmolLM2-135M-Instruct): which ones it
scores clearly above chance, so that a preset's task retention means something. Writes
benchmarks/results/bigbench_screen.json (after every task, so a stopped screen keeps what it measured).

    python benchmarks/screen_bigbench.py --limit 40 --confirm 60 [--tasks a,b,c] [--threads 1]

Two stages, so the pick is not judged on the examples it was picked by:
- screen: the first `--limit` examples of each task (the task files are shuffled once, by task name);
- confirm: tasks whose screen is >= `--z` standard errors above chance are scored again on the next
  `--confirm` examples, which the screen never saw (lm-eval's `samples`); the confirmation's accuracy
  is the unbiased figure, and a task is kept when it too is >= `--z` above chance.

Standard errors: of an accuracy, sqrt(acc (1 - acc) / n); the z against chance uses the null's own
variance, sum_i p_i (1 - p_i) / n^2 with p_i = 1 / #choices of example i.
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Candidates: BIG-bench JSON multiple-choice tasks not screened before (README), cheapest first (tokens
# per example = prompt x choices: the screen runs on a shared 2-core CPU); binary tasks only where a
# 135M model might clear chance by a margin visible at a few dozen examples.
CANDIDATES = (
    "logical_sequence", "entailed_polarity", "anachronisms", "phrase_relatedness", "crass_ai",
    "identify_odd_metaphor", "common_morpheme", "movie_recommendation", "similarities_abstraction",
    "emojis_emotion_prediction", "code_line_description", "english_proverbs", "date_understanding",
    "discourse_marker_prediction", "figure_of_speech_detection", "evaluating_information_essentiality", "physics",
    "intent_recognition", "reasoning_about_colored_objects",
)


def score(rows: list[dict], correct: list[int]) -> dict:
    """Accuracy, its standard error, chance on the same examples and the z of the margin over chance."""
    n = len(correct)
    acc = sum(correct) / n
    p = [1 / len(r["choices"]) for r in rows]
    chance = sum(p) / n
    null_se = math.sqrt(sum(q * (1 - q) for q in p)) / n
    return {"n": n, "acc": acc, "se": math.sqrt(acc * (1 - acc) / n), "chance": chance,
            "z": (acc - chance) / null_se if null_se else 0.0}


def run_one(lm, name: str, indices: list[int], extra: dict) -> tuple[dict, float]:
    from supernet.measure import tasks

    t0 = time.perf_counter()
    res = tasks.run_tasks(lm, [name], samples={name: indices}, extra=extra, log_samples=True, log=lambda *_: None)
    docs = {s["doc_id"]: s for s in res["samples"][name]}
    correct = [int(docs[i]["acc"]) for i in indices]
    return {"correct": correct}, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default=",".join(CANDIDATES), help="BIG-bench task names (comma list)")
    ap.add_argument("--limit", type=int, default=40, help="screen: the first N examples of each task")
    ap.add_argument("--confirm", type=int, default=60, help="confirm: the next N examples (0: no confirmation)")
    ap.add_argument("--z", type=float, default=2.0, help="above chance: this many null standard errors")
    ap.add_argument("--threads", type=int, default=1, help="1 is fastest on a shared 2-core machine")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "bigbench_screen.json")
    args = ap.parse_args()

    import torch

    from supernet.measure import bigbench, tasks
    from supernet.measure.lm_eval_model import SupernetLM
    from supernet.teacher import load_teacher, smollm2_hf_dir

    torch.set_num_threads(args.threads)
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    found = bigbench.fetch_bigbench_tasks(names, missing_ok=True)
    model, tok = load_teacher(smollm2_hf_dir())
    lm = SupernetLM(model, tok, placement=None, progress=False)
    payload = {"teacher": "SmolLM2-135M-Instruct", "command": "python " + " ".join(map(shlex.quote, sys.argv)),
               "limit": args.limit, "confirm": args.confirm, "z": args.z, "threads": args.threads,
               "candidates": names, "not_json_multiple_choice": [n for n in names if n not in found], "rows": []}
    for task in names:
        if task not in found:
            continue
        spec = tasks.bigbench_spec(task)
        extra = {spec.name: spec}
        try:
            root, _ = tasks.prepare([spec.name], extra=extra, log=lambda *_: None)
        except RuntimeError as exc:  # a task of subtasks, or no example with one best choice
            payload["not_json_multiple_choice"].append(task)
            print(f"{task:38s} skipped: {exc}", flush=True)
            continue
        rows = [json.loads(line) for line in (root / f"{spec.name}.jsonl").open()]
        # a small task keeps at least half of its examples for the confirmation
        first = list(range(min(args.limit, (len(rows) + 1) // 2 if args.confirm else len(rows))))
        got, seconds = run_one(lm, spec.name, first, extra)
        row = {"task": task, "examples": len(rows), "screen": score([rows[i] for i in first], got["correct"]),
               "seconds": round(seconds, 1)}
        nxt = list(range(len(first), min(len(first) + args.confirm, len(rows))))
        if args.confirm and row["screen"]["z"] >= args.z and nxt:
            got2, seconds2 = run_one(lm, spec.name, nxt, extra)
            row["confirm"] = score([rows[i] for i in nxt], got2["correct"])
            row["seconds"] = round(seconds + seconds2, 1)
        row["above_chance"] = bool(row.get("confirm", {}).get("z", -1) >= args.z)
        payload["rows"].append(row)
        s, c = row["screen"], row.get("confirm")
        print(f"{task:38s} screen {s['acc']:.3f}±{s['se']:.3f} (chance {s['chance']:.3f}, z {s['z']:+.1f}, n {s['n']})"
              + (f"  confirm {c['acc']:.3f}±{c['se']:.3f} (chance {c['chance']:.3f}, z {c['z']:+.1f}, n {c['n']})"
                 if c else "") + f"  {row['seconds']}s", flush=True)
        args.out.write_text(json.dumps(payload, indent=2) + "\n")
    args.out.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
