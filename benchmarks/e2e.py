"""End to end on the real teacher (issue 6): SmolLM2-135M-Instruct -> supernet -> presets -> table.

    python benchmarks/e2e.py --workdir runs/e2e [--step NAME ...] [--distill-steps N]

Steps (each resumes from the files the previous one left in --workdir, and each fits in a 10-minute
call): convert, distill (stage 1 on one GPU, fixed step budget at sequence 2048), evaluate (>= 200
placements on held-out text, active learning included), costs (measured at context 8192, batch 64,
then calibrated inside the whole model: `supernet.measure.costs.calibrate_in_stack`),
presets (surrogate fit + DP at speedups 1.5, 2, 3, 4 and the maximum, plus one preset under
`--require`, retrieval >= 0.9 x the teacher by default), measure (per preset: decode throughput vs
all-fa in the same run, quality retention, needle-in-a-haystack at 2k/4k/8k, the task set's RULER
retrieval at 2K/4K/8K and development / held-out task accuracy, and self-speculative decoding),
report (table + plot). Evaluate records retrieval and development-task scores per placement
(`--task-set e2e`). The results JSON, table and plot are copied to
benchmarks/results/.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from supernet.pipeline import STEPS, PipelineSettings, run_pipeline  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=REPO / "runs" / "e2e")
    ap.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--teacher", default="smollm2", help="teacher path, .gguf, or 'smollm2'")
    ap.add_argument("--step", action="append", choices=STEPS)
    ap.add_argument("--distill-steps", type=int, default=600)
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--eval-n", type=int, default=200)
    ap.add_argument("--no-calibrate", action="store_true",
                    help="keep the single-layer cost table (default: calibrate it in the whole model)")
    ap.add_argument("--task-set", default="e2e", help="benchmark tasks (supernet/measure/task_sets.py)")
    ap.add_argument("--no-tasks", action="store_true", help="no task metrics and no constrained preset")
    ap.add_argument("--require", default="retrieval>=0.9*teacher",
                    help="requirement of the extra constrained preset (with a task set)")
    ap.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args()
    settings = PipelineSettings(
        workdir=args.workdir, teacher=args.teacher,
        train_data=str(args.data_dir / "pydocs-train.jsonl"), eval_data=str(args.data_dir / "pydocs-eval.jsonl"),
        swa_window=512, distill_config=str(REPO / "training" / "configs" / "smollm2_h100.yaml"),
        distill_steps=args.distill_steps,
        distill_set=[f"train.micro_batch_size={args.micro_batch}", "eval.every=0", "checkpoint.every=200"],
        eval_n=args.eval_n, eval_seq_len=1024, eval_sequences=32, eval_batch=16,
        cost_context=8192, cost_batch=64, measure_costs=True, calibrate_costs=not args.no_calibrate,
        speedups=[1.5, 2.0, 3.0, 4.0],
        quality_seq_len=2048, quality_sequences=64, throughput_batch=64, throughput_context=8192,
        throughput_tokens=64, needle_contexts=[2048, 4096, 8192], spec_k=4, spec_tokens=128, spec_prompts=4,
        task_set=None if args.no_tasks else args.task_set, constrained_require=args.require,
    )
    steps = tuple(args.step) if args.step else STEPS
    run_pipeline(settings, steps)
    if "report" in steps:
        args.results.mkdir(parents=True, exist_ok=True)
        for name, target in (("measurements.json", "e2e_measurements.json"), ("results.md", "e2e_results.md"),
                             ("speed_quality.png", "e2e_speed_quality.png"), ("frontier.png", "e2e_frontier.png"),
                             ("presets.json", "e2e_presets.json"), ("costs.json", "e2e_costs.json"),
                             ("presets-constrained.json", "e2e_presets_constrained.json"),
                             ("evaluations.jsonl", "e2e_evaluations.jsonl")):
            if (args.workdir / name).exists():
                shutil.copy(args.workdir / name, args.results / target)


if __name__ == "__main__":
    main()
