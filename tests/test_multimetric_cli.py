"""`placement optimize --objective/--require` on a planted two-metric evaluations file."""
from __future__ import annotations

import json

import numpy as np
import pytest

from supernet.cli.placement_cli import app as placement_app
from supernet.layout import MIXERS
from supernet.placement.cost import analytic_costs
from supernet.placement.sampling import initial_design
from supernet.config import SupernetConfig
from tests.test_placement_cli import assert_one_line_error, run

L = 8


@pytest.fixture
def files(tmp_path):
    """quality: every cheap mixer costs a little; retrieval: linear mixers (gdn, kda) cost a lot."""
    rng = np.random.default_rng(0)
    rows = np.stack(initial_design(150, L, 4, rng).rows)
    q_cost = np.array([0.0, 0.004, 0.002, 0.003])
    r_cost = np.array([0.0, 0.01, 0.12, 0.10])
    q = 1.0 - q_cost[rows].sum(axis=1) + rng.normal(scale=1e-4, size=len(rows))
    r = 0.9 - r_cost[rows].sum(axis=1) * (1 + 0.2 * np.arange(L) / L)[None, :].mean() + rng.normal(
        scale=1e-4, size=len(rows))
    ev = tmp_path / "evaluations.jsonl"
    ev.write_text("".join(json.dumps({"placement": [MIXERS[v] for v in p], "quality": float(a),
                                      "retrieval": float(b), "metric": "planted"}) + "\n"
                          for p, a, b in zip(rows, q, r)))
    costs = tmp_path / "costs.json"
    analytic_costs(SupernetConfig(num_hidden_layers=L), 32768, 8).save(costs)
    return ev, costs


def test_require_retrieval_keeps_it_and_presets_record_every_metric(files, tmp_path):
    ev, costs = files
    free, kept = tmp_path / "free.json", tmp_path / "kept.json"
    assert run(placement_app, ["optimize", "-e", ev, "-c", costs, "-s", 2, "-o", free]).exit_code == 0
    res = run(placement_app, ["optimize", "-e", ev, "-c", costs, "-s", 2, "-o", kept,
                              "--require", "retrieval>=0.9*teacher"])
    assert res.exit_code == 0, res.output
    a, b = json.loads(free.read_text()), json.loads(kept.read_text())
    row_free = next(p for p in a["presets"] if p["name"] == "speedup-2x")
    row_kept = next(p for p in b["presets"] if p["name"] == "speedup-2x")
    assert set(row_free["predicted"]) == {"quality", "retrieval"}
    teacher = b["multi_metric"]["teacher"]["retrieval"]
    assert row_free["predicted"]["retrieval"] < 0.9 * teacher  # unconstrained: retrieval is lost
    assert row_kept["predicted"]["retrieval"] >= 0.9 * teacher - 1e-9  # the requirement keeps it
    assert row_kept["speedup"] >= 2.0 - 1e-9
    assert row_kept["predicted"]["quality"] <= row_free["predicted"]["quality"] + 1e-9
    assert row_kept["gap"] <= 1e-9


@pytest.mark.parametrize("args,fragment", [
    (["--objective", "retrievl"], "unknown metric 'retrievl' in --objective"),
    (["--require", "dev_tasks>=0.5"], "unknown metric 'dev_tasks' in --require"),
    (["--require", "retrieval>=2*teacher"], "requirement retrieval>=2*teacher is infeasible at speedup 2"),
    (["--require", "retrieval=1"], "cannot read requirement"),
])
def test_bad_objective_or_requirement_is_one_line_error(files, tmp_path, args, fragment):
    ev, costs = files
    res = run(placement_app, ["optimize", "-e", ev, "-c", costs, "-s", 2, "-o", tmp_path / "p.json", *args])
    assert_one_line_error(res, fragment)
