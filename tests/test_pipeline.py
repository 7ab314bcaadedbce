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
        distill_set=["data.max_documents=60", "data.seq_len=32", "eval.every=0", "checkpoint.every=0",
                     "loss.activation_weight=0.8"],
        # the recipe: layer-local transfer first, then distillation from its result with the activation loss
        transfer_steps=2, transfer_config=str(REPO / "training" / "configs" / "transfer_smoke_cpu.yaml"),
        transfer_set=["data.max_documents=60", "data.seq_len=32", "eval.every=0", "checkpoint.every=0",
                      "train.grad_accum=1"],
        eval_n=14, eval_seq_len=32, eval_sequences=2, eval_batch=2, cost_context=256, cost_batch=8,
        measure_costs=False, speedups=[1.2], quality_seq_len=32, quality_sequences=2, throughput_batch=1,
        throughput_context=32, throughput_tokens=3, needle_contexts=[96], spec_k=2, spec_tokens=6, spec_prompts=1,
        extra_contexts=[48], measure_uniform=True,
        # every preset drafts (min_speedup 0), so the batched engine and the cost model's pick both run
        spec_batches=[2], spec_context=32, spec_ks=[2], spec_batched_tokens=6, spec_min_speedup=0.0,
        device="cpu",
    )
    run_pipeline(settings)
    run = settings.workdir
    for name in ("evaluations.jsonl", "costs.json", "presets.json", "frontier.png", "measurements.json",
                 "results.md", "speed_quality.png", "speculative.json", "transfer/final/config.json"):
        assert (run / name).exists(), name
    assert f"student.path={run / 'transfer' / 'final'}" in (run / "log.txt").read_text()  # distill starts from transfer
    assert sum(1 for _ in (run / "evaluations.jsonl").open()) >= 14
    measured = json.loads((run / "measurements.json").read_text())
    names = [r["preset"] for r in measured["presets"]]
    assert names[0] == "all-fa" and len(names) >= 2
    base = measured["presets"][0]
    assert base["quality_retention"] == pytest.approx(1.0) and base["decode_speedup"] == pytest.approx(1.0)
    for pair in measured["speculative"]["pairs"]:
        assert pair["lossless"], pair  # float32 on the CPU: speculative output equals the target's
    config = json.loads((settings.final / "config.json").read_text())
    uniform = {f"all-{m}" for m in ("swa", "gdn", "kda")}
    assert set(names) - uniform <= set(config["presets"])
    assert {tuple(r["placement"]) for r in measured["presets"]} >= {(m,) * config["num_hidden_layers"]
                                                                    for m in ("swa", "gdn", "kda")}
    for row in measured["presets"]:  # every row timed at both contexts, against all-fa in the same pass
        assert set(row["speed_by_context"]) == {"32", "48"}
        assert row["speed_by_context"]["32"]["ms_per_step"] == pytest.approx(row["ms_per_step"])
        assert row["speed_by_context"]["48"]["speedup"] > 0
    assert measured["presets"][0]["speed_by_context"]["48"]["speedup"] == pytest.approx(1.0)
    spec = json.loads((run / "speculative.json").read_text())["batches"]["2"]
    for row in measured["presets"]:  # a placement measured under two names: the second row copies the first
        if "same_as" in row:
            first = measured["presets"][names.index(row["same_as"])]
            assert row["placement"] == first["placement"] and row["ms_per_step"] == first["ms_per_step"]
    assert {r["draft"] for r in spec["rows"]} == {r["preset"] for r in measured["presets"][1:]
                                                  if "same_as" not in r and r["placement"] != base["placement"]}
    for r in spec["rows"]:
        assert r["lossless"], r  # float32 on the CPU: the batched engine's output equals the target's
    assert spec["best_measured"]["speedup"] == max(r["speedup"] for r in spec["rows"])
    table = (run / "results.md").read_text()
    assert all(f"| {n} |" in table for n in names)
    assert "speedup@48" in table and "Self-speculative decoding in the batched engine" in table
    for row in measured["presets"][1:]:  # each preset: measured speedup with its window range, predicted beside it
        low, high = row["decode_speedup_range"]
        assert low <= row["decode_speedup"] <= high
        assert f"{row['decode_speedup']:.2f}x ({low:.2f}-{high:.2f}) | {row['predicted_speedup']:.2f}x |" in table
    # a second run finds every step's files and does nothing
    before = (run / "measurements.json").stat().st_mtime
    run_pipeline(settings)
    assert (run / "measurements.json").stat().st_mtime == before


def test_a_step_over_its_time_budget_is_interrupted_and_reported(tmp_path):
    """eval_seconds: the evaluate step stops at its budget (SIGINT) and the pipeline goes on."""
    import sys
    import time

    from supernet.pipeline import _run

    script = "import time\nfor i in range(600):\n    print(i, flush=True)\n    time.sleep(0.05)\n"
    t0 = time.monotonic()
    finished = _run([sys.executable, "-c", script], tmp_path / "log.txt", seconds=1.0)
    assert not finished and time.monotonic() - t0 < 20
    assert _run([sys.executable, "-c", "print('done')"], tmp_path / "log.txt", seconds=30.0)
    with pytest.raises(RuntimeError, match="step failed"):
        _run([sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "log.txt", seconds=30.0)
