"""One home for measurement (torch side): what the pipeline, the CLI and the benchmarks measure.

- `timer.py`: the one timer (Stopwatch, median_seconds, kernel_ms); every timed number goes through it.
- `quality.py`: a placement's quality against the teacher (1 - KL / KL_uniform, top-1 agreement).
- `needle.py`: needle-in-a-haystack retrieval per context length.
- `throughput.py`: decode throughput of placements side by side (CUDA graphs on CUDA).
- `speculative.py`: self-speculative decoding pairs, timed against plain greedy decoding.
- `report.py`: the results table (speed, quality, retrieval, task retention) and speed-quality plot of a pipeline run.
- `linear_mixers.py`, `fla_layer.py`, `kernels.py`, `shapes.py`: the GPU linear-mixer checks and
  timings, fla's layer as a reference, the kernel breakdown, and the measured shapes.
- `training_runs.py`: comparisons of training-benchmark runs.
- `tasks.py`, `lm_eval_model.py`, `bigbench.py`, `retrieval.py`, `placement_metrics.py`: benchmark
  tasks through lm-evaluation-harness, BIG-bench data, long-context retrieval tasks, and the task
  metrics that `eval-placements` records per placement (and the pipeline's report per preset).
- `task_sets.py`: which tasks, lengths and documents a run scores (eval-placements, demo, e2e).

The placement optimiser itself (supernet.placement) stays numpy/scipy: it consumes these numbers.
"""
