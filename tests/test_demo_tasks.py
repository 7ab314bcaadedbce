"""The pipeline's task columns (issue 16 item 4): per preset a retrieval score, development and held-out
task accuracy and their retention against the teacher's row, and one preset optimised under a retrieval
requirement, whose verdict the report states from the measured values.

Runs the presets, measure and report steps on a tiny converted teacher (as test_demo_agreement does:
the converted checkpoint stands in for the trained one, planted evaluations for `eval-placements`), with
a small task set. The measured task scores are recomputed through lm-eval's `simple_evaluate`
(`supernet eval-tasks`' path), so the table's figures are shown to be measurements, not constants.
"""
from __future__ import annotations

import json
import re
import shutil

import pytest

pytestmark = pytest.mark.slow
pytest.importorskip("lm_eval")

TINY_SET = dict(retrieval=("ruler_niah_256", "ruler_multikey_256"), dev=("bb_general_knowledge",),
                heldout=("bb_human_organs_senses",), placement_limit=1, report_docs=3, report_examples=6)


def planted_truth(p) -> dict:
    """Quality: every cheap layer costs a little. Retrieval: a threshold, kept (0.8) while at most one
    layer of the second half is not FA, else 0.1 (what an additive surrogate mispredicts)."""
    penalty = {"fa": 0.0, "swa": 0.002, "gdn": 0.006, "kda": 0.005}
    lost = sum(m != "fa" for m in p[len(p) // 2:])
    return {"quality": 1.0 - sum(penalty[m] for m in p), "retrieval": 0.8 if lost <= 1 else 0.1,
            "metric": "planted", "tasks_spec": "planted"}


class PlantedScorer:
    """Stands in for eval-placements' scorer in the constrained preset's verification (no model)."""

    probe = {"metric": "planted", "tasks_spec": "planted"}
    model = tokenizer = None

    def __init__(self) -> None:
        self.measured = []

    def __call__(self, placement) -> dict:
        self.measured.append(placement.to_list())
        return planted_truth(list(placement))


def write_planted_evaluations(path, num_layers: int, n: int = 48) -> None:
    import numpy as np

    from supernet.layout import MIXERS

    rng = np.random.default_rng(1)
    rows = [["fa"] * num_layers] + [[MIXERS[i] for i in rng.integers(0, 4, num_layers)] for _ in range(n - 1)]
    with path.open("w") as fh:
        for p in rows:
            row = planted_truth(p)
            row["quality"] += 1e-4 * rng.normal()
            fh.write(json.dumps({"placement": p, **row}) + "\n")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from supernet.measure import placement_metrics, task_sets
    from supernet.pipeline import PipelineSettings, step_convert, step_measure, step_presets, step_report
    from supernet.placement.cost import analytic_costs, load_config
    from supernet.threads import torch_threads
    from supernet.training.tiny import tiny_teacher_dir, write_synthetic_corpus

    root = tmp_path_factory.mktemp("demo_tasks")
    train, evaluation = write_synthetic_corpus(root / "data", n_train=4, n_eval=40)
    s = PipelineSettings(
        workdir=root / "run", teacher=str(tiny_teacher_dir()), train_data=str(train), eval_data=str(evaluation),
        swa_window=8, eval_batch=2, cost_context=256, cost_batch=8, measure_costs=False, speedups=[1.3, 1.6, 1.9],
        quality_seq_len=32, quality_sequences=2, throughput_batch=1, throughput_context=32, throughput_tokens=2,
        throughput_rounds=1, throughput_windows=1, needle_contexts=[], spec_k=2, spec_tokens=4, spec_prompts=1,
        task_set="tiny", constrained_require="retrieval>=0.9*teacher", device="cpu", constrained_confirm=False,
    )
    saved = dict(task_sets.TASK_SETS)
    task_sets.TASK_SETS["tiny"] = task_sets.TaskSet("tiny", note="test", **TINY_SET)
    scorer = PlantedScorer()
    try:
        with torch_threads(1), pytest.MonkeyPatch.context() as mp:
            mp.setattr(placement_metrics, "build_placement_scorer", lambda *a, **k: scorer)
            s.workdir.mkdir(parents=True)
            step_convert(s)
            shutil.copytree(s.ckpt_init, s.trained)  # stands in for the distilled checkpoint
            L = json.loads((s.trained / "config.json").read_text())["num_hidden_layers"]
            write_planted_evaluations(s.workdir / "evaluations.jsonl", L)
            analytic_costs(load_config(s.trained), s.cost_context, s.cost_batch).save(s.workdir / "costs.json")
            for step in (step_presets, step_measure, step_report):
                step(s)
    finally:
        task_sets.TASK_SETS.clear()
        task_sets.TASK_SETS.update(saved)
    s.planted_measured = scorer.measured
    return s


def test_constrained_preset_is_verified_by_measurement(tiny_run):
    presets = json.loads((tiny_run.workdir / "presets.json").read_text())
    constrained = [p for p in presets["presets"] if p.get("requirements")]
    assert len(constrained) == 1
    row = constrained[0]
    assert row["name"].endswith("-retrieval") and row["requirements"] == ["retrieval>=0.9*teacher"]
    assert row["verified"] is True and presets["constrained"]["verified"] is True
    assert set(row["predicted"]) == {"quality", "retrieval"}
    teacher = row["teacher"]["retrieval"]
    # kept by measurement: the planted truth of the preset's placement meets the requirement
    assert row["measured"]["retrieval"] == planted_truth(row["placement"])["retrieval"] >= 0.9 * teacher - 1e-9
    assert row["speedup"] >= row["target_speedup"] - 1e-9
    # every candidate measured was appended to evaluations.jsonl (the refit saw it)
    rows = [json.loads(line) for line in (tiny_run.workdir / "evaluations.jsonl").open()]
    assert [r["placement"] for r in rows if r.get("design") == "verify"] == tiny_run.planted_measured
    checks = presets["constrained"]["checks"]  # what was judged, and the kept one among those that met it
    assert any(ch["meets"] and ch["placement"] == row["placement"] for ch in checks)
    free = [p for p in presets["presets"] if not p.get("requirements")]
    assert all("retrieval" in p["predicted"] for p in free)  # unconstrained presets record every metric too
    # the planted retrieval needs FA in the second half, so the unconstrained fastest preset loses it
    assert planted_truth(max(free, key=lambda p: p["speedup"])["placement"])["retrieval"] < 0.9 * teacher
    config = json.loads((tiny_run.final / "config.json").read_text())
    assert row["name"] in config["presets"]  # installed into the checkpoint like the others


def test_report_task_columns_are_the_measured_scores(tiny_run):
    from supernet.cli.model_cmds import load_checkpoint
    from supernet.measure import tasks as T
    from supernet.measure.lm_eval_model import SupernetLM
    from supernet.measure.report import check_requirement

    run = tiny_run.workdir
    measured = json.loads((run / "measurements.json").read_text())
    rows = measured["presets"]
    base = rows[0]
    assert base["preset"] == "all-fa" and base["tasks"]["dev_tasks_retention"] == pytest.approx(1.0)
    table = (run / "results.md").read_text()
    assert "| retrieval@256 | retrieval retention | dev acc | dev retention | held-out acc | held-out retention |" in table
    model, tok = load_checkpoint(str(tiny_run.final))
    distinct = set()
    for r in rows:
        t = r["tasks"]
        # the columns: retrieval at each length, retention against the all-fa row, dev and held-out accuracy
        assert t["retrieval"] == pytest.approx((t["task_scores"]["ruler_niah_256"]
                                                + t["task_scores"]["ruler_multikey_256"]) / 2)
        assert t["retrieval_by_length"]["256"] == pytest.approx(t["retrieval"])
        assert t["dev_tasks"] == t["task_scores"]["bb_general_knowledge"]
        assert t["heldout_tasks"] == t["task_scores"]["bb_human_organs_senses"]
        if base["tasks"]["heldout_tasks"]:
            assert t["heldout_tasks_retention"] == pytest.approx(t["heldout_tasks"] / base["tasks"]["heldout_tasks"])
        assert t["task_n"] == {"ruler_niah_256": 3, "ruler_multikey_256": 3, "bb_general_knowledge": 6,
                               "bb_human_organs_senses": 6}
        line = next(ln for ln in table.splitlines() if ln.startswith(f"| {r['preset']} |"))
        assert f"| {t['dev_tasks']:.3f} |" in line and f"| {t['heldout_tasks']:.3f} |" in line
        assert f"| {100 * t['retrieval_by_length']['256']:.0f}% |" in line
        distinct.add(json.dumps(t["task_scores"], sort_keys=True))
    # recomputed through lm-eval's simple_evaluate for two presets: the same accuracies
    for r in (rows[0], rows[-1]):
        lm = SupernetLM(model, tok, r["placement"], progress=False)
        res = T.run_tasks(lm, ["bb_general_knowledge", "bb_human_organs_senses"], limit=6, log=lambda *_: None)
        got = T.summarise(res, ["bb_general_knowledge", "bb_human_organs_senses"])
        for name, acc in got.items():
            assert r["tasks"]["task_scores"][name] == pytest.approx(acc)
    assert len(distinct) >= 2, "every preset scored the same on every task: the columns show nothing"
    # the constrained preset: measured, and the report's verdict follows from the measured values
    (row,) = [r for r in rows if r["requirements"]]
    (check,) = row["tasks"]["requirements_check"]
    assert check == check_requirement("retrieval>=0.9*teacher", row, base)
    assert check["measured"] == row["tasks"]["retrieval"] and check["teacher"] == base["tasks"]["retrieval"]
    verdict = "kept" if check["measured"] >= 0.9 * check["teacher"] - 1e-9 else "NOT kept"
    assert re.search(rf"Preset `{re.escape(row['preset'])}` was optimised under `retrieval>=0.9\*teacher`: measured "
                     rf"retrieval {check['measured']:.3f} .* requirement {verdict}\.", table)
    assert "Teacher dev tasks:" in table and "Teacher held-out tasks:" in table


def test_task_set_errors_are_one_line():
    from supernet.measure import task_sets
    from supernet.measure.tasks import TaskError

    with pytest.raises(TaskError, match="unknown task set 'nope'; use one of demo, e2e"):
        task_sets.task_set("nope")
    bad = task_sets.TaskSet("bad", retrieval=(), dev=(), heldout=("dev",), placement_limit=1, report_docs=1,
                            report_examples=1)
    with pytest.raises(TaskError, match="as held-out, but the registry makes them development tasks"):
        bad.heldout_tasks()
