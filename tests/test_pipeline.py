"""The whole pipeline (what `supernet demo` and benchmarks/e2e.py run), end to end on a tiny teacher."""
from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


def test_pipeline_runs_every_step_and_resumes(tmp_path):
    from supernet.pipeline import PipelineSettings, run_pipeline
    from tests.conftest import REPO
    from supernet.training.tiny import tiny_teacher_dir, write_synthetic_corpus

    train, evaluation = write_synthetic_corpus(tmp_path / "data", n_train=60, n_eval=12)
    settings = PipelineSettings(
        workdir=tmp_path / "run", teacher=str(tiny_teacher_dir()), train_data=str(train), eval_data=str(evaluation),
        swa_window=8, distill_config=str(REPO / "training" / "configs" / "smoke_cpu.yaml"), distill_steps=4,
        distill_set=["data.max_documents=60", "data.seq_len=32", "eval.every=0", "checkpoint.every=0"],
        eval_n=14, eval_seq_len=32, eval_sequences=2, eval_batch=2, cost_context=256, cost_batch=8,
        measure_costs=False, speedups=[1.2], quality_seq_len=32, quality_sequences=2, throughput_batch=1,
        throughput_context=32, throughput_tokens=3, needle_contexts=[96], spec_k=2, spec_tokens=6, spec_prompts=1,
        device="cpu",
    )
    run_pipeline(settings)
    run = settings.workdir
    for name in ("evaluations.jsonl", "costs.json", "presets.json", "frontier.png", "measurements.json",
                 "results.md", "speed_quality.png"):
        assert (run / name).exists(), name
    assert sum(1 for _ in (run / "evaluations.jsonl").open()) >= 14
    measured = json.loads((run / "measurements.json").read_text())
    names = [r["preset"] for r in measured["presets"]]
    assert names[0] == "all-fa" and len(names) >= 2
    base = measured["presets"][0]
    assert base["quality_retention"] == pytest.approx(1.0) and base["decode_speedup"] == pytest.approx(1.0)
    for pair in measured["speculative"]["pairs"]:
        assert pair["lossless"], pair  # float32 on the CPU: speculative output equals the target's
    config = json.loads((settings.final / "config.json").read_text())
    assert set(names) <= set(config["presets"])
    table = (run / "results.md").read_text()
    assert all(f"| {n} |" in table for n in names)
    for row in measured["presets"][1:]:  # each preset: measured speedup with its window range, predicted beside it
        low, high = row["decode_speedup_range"]
        assert low <= row["decode_speedup"] <= high
        assert f"{row['decode_speedup']:.2f}x ({low:.2f}-{high:.2f}) | {row['predicted_speedup']:.2f}x |" in table
    # a second run finds every step's files and does nothing
    before = (run / "measurements.json").stat().st_mtime
    run_pipeline(settings)
    assert (run / "measurements.json").stat().st_mtime == before
