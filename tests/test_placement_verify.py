"""The verify-and-refine loop of a constrained preset (placement/verify.py) on a planted instance.

Retrieval is planted as a threshold (a placement retrieves only while at most 3 layers are swa), which
the additive surrogate fitted on random placements mispredicts; the measurement callback is the
planted truth, so the test knows which placements truly meet the requirement.
"""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from supernet.layout import Placement
from supernet.placement.cost import costs_from_dict
from supernet.placement.evaluations import read_evaluations
from supernet.placement.multimetric import parse_requirement
from supernet.placement.sampling import initial_design
from supernet.placement.verify import RequirementNotVerified, verify_constrained

L = 10
MIX = ("fa", "swa", "gdn")
FAST = np.isin(np.arange(L), [1, 4, 8])  # swa saves much on these layers (and loses more quality)
COSTS = costs_from_dict({"per_layer": {"fa": 2.0, "swa": np.where(FAST, 0.5, 1.6).tolist(), "gdn": 1.9},
                         "fixed": 1.0, "unit": "ms"})
LOSS = np.where(FAST, 0.03, 0.004) - 0.005 * (np.arange(L) == 1)  # swa's quality loss per layer
TARGET = 21 / 19  # all-fa costs 21: two fast swa layers reach it, or one fast and two slow, or five slow
REQUIRE = "retrieval>=0.5*teacher"


def truth(p: Placement) -> dict:
    """Quality: additive. Retrieval: a threshold, kept only with <= 2 swa layers and no gdn."""
    swa, gdn = np.array([m == "swa" for m in p]), np.array([m == "gdn" for m in p])
    quality = 1.0 - float(LOSS[swa].sum()) - 0.05 * int(gdn.sum())
    return {"quality": quality, "retrieval": 1.0 if swa.sum() <= 2 and not gdn.any() else 0.0, "metric": "planted"}


def measure(p: Placement) -> dict:
    measure.calls += 1
    return truth(p)


@pytest.fixture
def evaluations(tmp_path):
    """Corners, one-layer changes and random placements (most with gdn or many swa: retrieval 0)."""
    design = initial_design(40, L, len(MIX), np.random.default_rng(1))
    path = tmp_path / "evaluations.jsonl"
    with path.open("w") as fh:
        for row in design.rows:
            p = Placement(tuple(MIX[v] for v in row))
            fh.write(json.dumps({"placement": p.to_list(), **truth(p)}) + "\n")
    measure.calls = 0
    return path


def brute_force(speedup: float, bound: float) -> tuple[Placement, float]:
    best = None
    for bits in itertools.product(MIX[:2], repeat=L):  # any gdn loses retrieval: fa/swa placements suffice
        p = Placement(bits)
        t = truth(p)
        if t["retrieval"] >= bound and COSTS.speedup(p) >= speedup - 1e-9 and (best is None or t["quality"] > best[1]):
            best = (p, t["quality"])
    return best


def test_loop_finds_a_placement_that_truly_keeps_a_threshold_requirement(evaluations):
    logs: list[str] = []
    res = verify_constrained(evaluations, COSTS, {"quality": 1.0}, [parse_requirement(REQUIRE)], TARGET, measure,
                             rounds=5, log=logs.append)
    first = res.checks[0]
    # the additive surrogate alone picks a placement it predicts to keep retrieval, which loses it
    assert first.source == "round 1" and first.predicted["retrieval"] >= 0.5 and not first.meets
    assert truth(first.placement)["retrieval"] == 0.0
    chosen = res.chosen
    assert chosen.meets and truth(chosen.placement)["retrieval"] >= 0.5
    assert COSTS.speedup(chosen.placement) >= TARGET - 1e-9
    assert chosen.measured == pytest.approx({k: v for k, v in truth(chosen.placement).items() if k != "metric"})
    optimum, q_opt = brute_force(TARGET, 0.5)
    assert res.objective == pytest.approx(q_opt)  # here the loop reaches the true constrained optimum
    assert 2 <= measure.calls <= 5
    verified = [r for r in read_evaluations(evaluations).rows if r.get("design") == "verify"]
    assert len(verified) == measure.calls  # every measurement went into the evaluations for the refit
    assert "-> fails" in logs[0] and "-> meets" in logs[-1]


def _with_the_optimum_evaluated(evaluations, rounds: int):
    """The true constrained optimum appended to the evaluations, then the loop run with `rounds`."""
    optimum, q_opt = brute_force(TARGET, 0.5)
    with evaluations.open("a") as fh:
        fh.write(json.dumps({"placement": optimum.to_list(), **truth(optimum)}) + "\n")
    res = verify_constrained(evaluations, COSTS, {"quality": 1.0}, [parse_requirement(REQUIRE)], TARGET, measure,
                             rounds=rounds, log=lambda s: None)
    return optimum, q_opt, res


def test_best_measured_feasible_evaluation_is_kept_when_it_beats_the_loop(evaluations):
    """An evaluated placement that meets the requirement with the true optimum's quality is kept."""
    optimum, q_opt, res = _with_the_optimum_evaluated(evaluations, rounds=1)
    assert res.chosen.placement == optimum and res.objective == pytest.approx(q_opt)


def test_confirm_measurement_judges_the_candidates(evaluations):
    """A stricter confirmation (retrieval lost with swa at layer 1, the cheapest in quality) rejects the
    placement the evaluation scorer accepts; the loop cuts it off and keeps one that passes both."""
    def confirm(p: Placement) -> dict:
        confirm.placements.append(p)
        return {"retrieval": truth(p)["retrieval"] * (0.2 if p[1] == "swa" else 0.8)}
    confirm.placements = []

    res = verify_constrained(evaluations, COSTS, {"quality": 1.0}, [parse_requirement("retrieval>=0.7*teacher")],
                             TARGET, measure, confirm=confirm, rounds=5, log=lambda s: None)
    rejected = [c for c in res.checks if c.confirmed is not None and not c.meets]
    assert rejected and all(c.placement[1] == "swa" and c.measured["retrieval"] == 1.0 for c in rejected)
    chosen = res.chosen
    assert chosen.placement[1] == "fa" and chosen.confirmed["retrieval"] >= 0.7 * 0.8 - 1e-12
    assert COSTS.speedup(chosen.placement) >= TARGET - 1e-9
    assert res.confirm_teacher == {"retrieval": 0.8}
    assert res.confirm_bounds["retrieval>=0.7*teacher"] == pytest.approx(0.56)
    # only all-fa and placements that met the requirement on their evaluation row were confirmed, once each
    assert all(truth(p)["retrieval"] >= 0.7 for p in confirm.placements)
    assert len(confirm.placements) == len(set(confirm.placements))


def test_infeasible_requirement_gives_a_clear_message_and_no_preset(evaluations):
    with pytest.raises(RequirementNotVerified, match=r"no measured placement at >= 1\.3\d*x meets "
                                                     r"retrieval>=0\.5\*teacher .*lower the speedup or relax"):
        verify_constrained(evaluations, COSTS, {"quality": 1.0}, [parse_requirement(REQUIRE)], 1.3, measure,
                           rounds=3, log=lambda s: None)
    assert measure.calls <= 3


def test_verify_preset_cli_refuses_bad_input_in_one_line(evaluations, tmp_path):
    """Checked before any model is loaded: a bad requirement, a missing presets file."""
    from supernet.cli.main import app
    from tests.test_placement_cli import assert_one_line_error, run

    costs = tmp_path / "costs.json"
    COSTS.save(costs)
    base = ["verify-preset", tmp_path / "no-ckpt", "-e", evaluations, "-c", costs, "-s", 1.1, "--data", evaluations]
    assert_one_line_error(run(app, base + ["--presets", tmp_path / "p.json", "--require", "retrieval=>0.9"]),
                          "cannot read requirement 'retrieval=>0.9'")
    assert_one_line_error(run(app, base + ["--presets", tmp_path / "p.json", "--require", REQUIRE]),
                          "p.json does not exist; write it with `placement optimize` first")


def test_zero_rounds_judges_only_the_evaluated_placements(evaluations):
    optimum, q_opt, res = _with_the_optimum_evaluated(evaluations, rounds=0)
    assert measure.calls == 0 and res.chosen.placement == optimum and res.chosen.source == "evaluated"
    assert set(res.chosen.predicted) == {"quality", "retrieval"}  # predictions recorded without a round


def test_preset_falls_back_to_the_fastest_placement_measured_to_keep_the_requirement(evaluations):
    """Targets no placement can meet (1.3x: the threshold allows at most two swa layers) end in the
    fastest evaluated placement that kept retrieval on its own row, marked as such; without the
    fallback there is no preset and the message names every target tried."""
    from supernet.measure.verified_preset import fastest_meeting, verified_preset

    feasible = [(COSTS.speedup(p), p) for p in read_evaluations(evaluations).placements
                if truth(p)["retrieval"] >= 0.5 and COSTS.speedup(p) > 1 + 1e-6]
    assert feasible, "the design has placements that keep retrieval"
    speeds = fastest_meeting(evaluations, COSTS, REQUIRE, below=1.3)
    assert speeds == sorted(speeds, reverse=True) and speeds[0] == pytest.approx(max(x for x, _ in feasible), abs=1e-6)

    none, record = verified_preset(evaluations, COSTS, REQUIRE, [1.3], measure, rounds=2, measurements=2,
                                   fastest=False, log=lambda s: None)
    assert none is None and record["message"].startswith("no constrained preset: no measured placement at 1.3x")
    row, record = verified_preset(evaluations, COSTS, REQUIRE, [1.3], measure, rounds=2, measurements=2,
                                  log=lambda s: None)
    assert row is not None and row["target_from"].startswith("the fastest evaluated")
    assert truth(Placement(tuple(row["placement"])))["retrieval"] >= 0.5  # kept by the planted truth
    assert row["speedup"] >= speeds[0] - 1e-6 and record["targets"][0] == 1.3 and len(record["targets"]) >= 2
