"""The HF teacher (SmolLM2-135M-Instruct) on our lm-eval tasks, against chance: which tasks can tell
presets apart at all. Prints a table; writes benchmarks/results/teacher_tasks.json.

    python benchmarks/teacher_tasks.py --tasks bigbench,retrieval_2k --limit 0   # 0 = every example
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from supernet.measure import tasks
from supernet.measure.lm_eval_model import SupernetLM
from supernet.teacher import load_teacher, smollm2_hf_dir


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", default="bigbench,retrieval_2k")
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="1 is fastest on a shared 2-core machine")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "teacher_tasks.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_teacher(smollm2_hf_dir())
    lm = SupernetLM(model, tok, placement=None, progress=False)
    rows = []
    for name in tasks.expand(args.tasks):
        t0 = time.perf_counter()
        res = tasks.run_tasks(lm, [name], limit=args.limit or None)
        r = res["results"][name]
        rows.append({"task": name, "split": tasks.registry()[name].split, "acc": r["acc,none"],
                     "chance": res["supernet_chance"][name], "n": res["n-samples"][name]["effective"],
                     "seconds": round(time.perf_counter() - t0, 1)})
        print(f"{name:28s} {rows[-1]['split']:10s} acc {r['acc,none']:.3f}  chance {rows[-1]['chance']:.3f}  "
              f"n {rows[-1]['n']}  {rows[-1]['seconds']}s", flush=True)
    Path(args.out).write_text(json.dumps({"teacher": "SmolLM2-135M-Instruct", "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
