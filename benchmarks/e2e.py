"""End to end on the real teacher (issues 6 and 23): SmolLM2-135M-Instruct -> supernet -> presets -> table.

    python benchmarks/e2e.py --workdir runs/e2e [--step NAME ...] [--transfer-steps N] [--distill-steps N]

Steps (each resumes from the files the previous one left in --workdir): convert; transfer (the
recipe's first stage, layer-local: every trainable mixer of every layer regresses the teacher
attention's output, sequence 2048); distill (stage 1, stochastic end to end with the mixer-output
activation loss beside the KL, from transfer's result); evaluate (placements on held-out text with
retrieval and development-task scores, as many as fit in --eval-seconds, active learning included);
costs (measured at context 8192, batch 64, then calibrated inside the whole model:
`supernet.measure.costs.calibrate_in_stack`); presets (surrogate fit + DP at speedups 1.5, 2, 3, 4
and the maximum, plus one preset under `--require`, retrieval >= 0.9 x the teacher by default);
measure (per preset and for all-swa/all-gdn/all-kda: decode throughput vs all-fa at 8192 and at
--extra-contexts in the same run, quality retention, needle-in-a-haystack at 2k/4k/8k, the task
set's RULER retrieval at 2K/4K/8K and development / held-out task accuracy); speculative (the
batched, graphed self-speculative engine at batch 8 and 64, context 8192: every preset >= 1.5x as a
draft at k = 4, and the cost model's pick of draft and k); report (table + plot). The results JSON, table
and plots are copied to benchmarks/results/.

Training budget: the first table trained 600 steps of 16 x 2048 tokens end to end (19.7M tokens);
the default recipe here runs 150 transfer steps (each trains every mixer of every layer, so it
costs more than an end-to-end step) then 350 end-to-end steps, eagerly (at this length compiling
costs more minutes than it saves); the log has each stage's wall time. The whole run is sized for
one GPU allocation of about 30 minutes (evaluate is cut at --eval-seconds).
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
    ap.add_argument("--transfer-steps", type=int, default=150, help="layer-local transfer steps (0: none)")
    ap.add_argument("--distill-steps", type=int, default=350)
    ap.add_argument("--activation-weight", type=float, default=0.8,
                    help="mixer-output activation loss beside the KL in distill (0: KL only)")
    ap.add_argument("--compile", action="store_true", help="compile the distill step (about 3 minutes first)")
    ap.add_argument("--eval-seconds", type=float, default=300.0,
                    help="time budget of the evaluate step (at least 40 placements); 0: until --eval-n")
    ap.add_argument("--extra-contexts", default="32768", help="further contexts timed for every preset (comma list)")
    ap.add_argument("--spec-batches", default="8,64", help="batches of the batched self-speculation step ('' skips)")
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--eval-n", type=int, default=300)
    ap.add_argument("--no-calibrate", action="store_true",
                    help="keep the single-layer cost table (default: calibrate it in the whole model)")
    ap.add_argument("--task-set", default="e2e", help="benchmark tasks (supernet/measure/task_sets.py)")
    ap.add_argument("--no-tasks", action="store_true", help="no task metrics and no constrained preset")
    ap.add_argument("--require", default="retrieval>=0.9*teacher",
                    help="requirement of the extra constrained preset (with a task set)")
    ap.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    # e2e_* is the first table (issue 6), which placement/observations.py fits the H200 profile on
    ap.add_argument("--results-prefix", default="e2e2", help="file prefix of the copies in --results")
    args = ap.parse_args()
    settings = PipelineSettings(
        workdir=args.workdir, teacher=args.teacher,
        train_data=str(args.data_dir / "pydocs-train.jsonl"), eval_data=str(args.data_dir / "pydocs-eval.jsonl"),
        swa_window=512, distill_config=str(REPO / "training" / "configs" / "smollm2_h100.yaml"),
        distill_steps=args.distill_steps,
        distill_set=[f"train.micro_batch_size={args.micro_batch}", "eval.every=0", "checkpoint.every=200",
                     f"loss.activation_weight={args.activation_weight}", f"train.compile={str(args.compile).lower()}"],
        transfer_steps=args.transfer_steps, transfer_config=str(REPO / "training" / "configs" / "transfer_smollm2_h100.yaml"),
        transfer_set=[f"train.micro_batch_size={args.micro_batch}", "eval.every=0", "checkpoint.every=200"],
        eval_n=args.eval_n, eval_seq_len=1024, eval_sequences=32, eval_batch=16,
        eval_seconds=args.eval_seconds or None,
        cost_context=8192, cost_batch=64, measure_costs=True, calibrate_costs=not args.no_calibrate,
        speedups=[1.5, 2.0, 3.0, 4.0],
        quality_seq_len=2048, quality_sequences=64, throughput_batch=64, throughput_context=8192,
        throughput_tokens=64, needle_contexts=[2048, 4096, 8192], spec_k=4, spec_tokens=64, spec_prompts=2,
        extra_contexts=[int(c) for c in args.extra_contexts.split(",") if c], measure_uniform=True,
        spec_batches=[int(b) for b in args.spec_batches.split(",") if b], spec_context=8192, spec_ks=[4], extra_context_rounds=1,
        spec_batched_tokens=64,
        task_set=None if args.no_tasks else args.task_set, constrained_require=args.require,
    )
    steps = tuple(args.step) if args.step else STEPS
    run_pipeline(settings, steps)
    if "report" in steps:
        args.results.mkdir(parents=True, exist_ok=True)
        for name in ("measurements.json", "results.md", "summary.md", "speed_quality.png", "frontier.png", "presets.json",
                     "costs.json", "presets-constrained.json", "speculative.json", "surrogates.json",
                     "evaluations.jsonl"):
            target = f"{args.results_prefix}_{name}"
            if (args.workdir / name).exists():
                shutil.copy(args.workdir / name, args.results / target)


if __name__ == "__main__":
    main()
