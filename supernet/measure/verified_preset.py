"""A preset optimised under a requirement and kept only if measured to meet it.

The model side of placement/verify.py's loop: the measurement is eval-placements' scorer (so the rows it
appends match evaluations.jsonl), and the confirmation re-scores the requirement's tasks on more
documents (the report's, so a kept preset keeps its requirement in the report too). Used by the
pipeline's presets step and by `supernet verify-preset`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

from supernet.layout import PlacementError


def confirm_scorer(scorer, metric: str, retrieval: Sequence[str], dev: Sequence[str], limit, corpus=None, log=print):
    """Task scores of the requirement's metric on `limit` documents per task, or None for other metrics."""
    from supernet.measure.placement_metrics import TaskMetrics

    if metric == "retrieval" and retrieval:
        return TaskMetrics(scorer.model, scorer.tokenizer, list(retrieval), (), limit, corpus=corpus, log=log)
    if metric == "dev_tasks" and dev:
        return TaskMetrics(scorer.model, scorer.tokenizer, (), list(dev), limit, corpus=corpus, log=log)
    return None


def fastest_meeting(evaluations: str | Path, costs, requirement: str, below: float, count: int = 3) -> list[float]:
    """Speedups (fastest first, each < `below`, > 1) of up to `count` evaluated placements whose own
    rows meet `requirement`: targets at which a verified preset is known to be within reach."""
    from supernet.layout import Placement
    from supernet.placement.evaluations import read_evaluations
    from supernet.placement.multimetric import parse_requirement
    from supernet.placement.verify import meets

    req = parse_requirement(requirement)
    data = read_evaluations(evaluations)
    teacher = [r for p, r in zip(data.placements, data.rows) if p == Placement.uniform("fa", data.num_layers)]
    if not teacher or not isinstance(teacher[0].get(req.metric), (int, float)):
        return []
    bound = req.bound(float(teacher[0][req.metric]))
    speeds = set()
    for p, row in zip(data.placements, data.rows):
        value = row.get(req.metric)
        if not isinstance(value, (int, float)) or any(m not in costs.per_layer for m in p):
            continue
        if meets({req.metric: float(value)}, req, bound):
            x = float(costs.speedup(p))
            if 1.0 + 1e-6 < x < below - 1e-9:
                speeds.add(round(x, 6))
    return sorted(speeds, reverse=True)[:count]


def verified_preset(evaluations: str | Path, costs, requirement: str, targets: Sequence[float], scorer,
                    confirm=None, objective: dict[str, float] | None = None, rounds: int = 4,
                    measurements: int = 12, fastest: bool = True,
                    log: Callable[[str], None] = print) -> tuple[dict | None, dict]:
    """(preset row or None, record of the search) for the first of `targets` (highest first) at which a
    measured placement meets `requirement`; at most `rounds` new measurements per target and
    `measurements` in all (once spent, the lower targets judge only the evaluated placements).

    With `fastest`, when no target admits one, the search goes on at the speedups of the fastest evaluated
    placements that meet the requirement on their rows (`fastest_meeting`): a user who asks for a
    requirement gets the fastest placement measured to keep it, however modest its speedup, rather than
    no preset; the record says which targets failed first."""
    from supernet.placement.multimetric import parse_requirement
    from supernet.placement.presets import preset_name
    from supernet.placement.verify import RequirementNotVerified, verify_constrained

    req = parse_requirement(requirement)
    objective = objective or {"quality": 1.0}
    evaluations = Path(evaluations)
    if measurements < 1 or rounds < 1:
        raise PlacementError("the verification needs at least one measurement (--rounds >= 1)")
    left, attempts, result, target = measurements, [], None, None
    given, targets = list(targets), list(targets)
    for x in _targets(targets, fastest, evaluations, costs, req.text):
        if left <= 0:  # no new measurements: the evaluated placements (the earlier candidates among them) only
            attempts.append(f"measurement budget ({measurements}) spent before {x:g}x: evaluated placements only")
        log(f"constrained preset at {x:g}x under {req.text} (verified by measurement)")
        before = sum(1 for _ in evaluations.open())
        try:
            result = verify_constrained(evaluations, costs, objective, [req], x, scorer, confirm,
                                        rounds=max(0, min(rounds, left)), probe=getattr(scorer, "probe", None), log=log)
            target = x
            break
        except RequirementNotVerified as exc:
            attempts.append(f"{x:g}x: {exc}")
            log(f"  {exc}")
        finally:
            left -= sum(1 for _ in evaluations.open()) - before
    record = {"requirements": [req.text], "targets": targets, "verified": result is not None,
              "confirm_spec": getattr(confirm, "spec", None), "attempts": attempts}
    if result is None:
        record["message"] = (f"no constrained preset: no measured placement at {', '.join(f'{x:g}x' for x in targets)} "
                             f"meets {req.text}")
        return None, record
    c = result.chosen
    name = f"{preset_name(target)}-{req.metric}"
    row = {"name": name, "placement": c.placement.to_list(), "speedup": round(c.speedup, 6),
           "predicted_quality": c.predicted.get("quality"), "cost": costs.cost(c.placement),
           "counts": c.placement.counts(), "method": f"verified ({c.source})", "target_speedup": target,
           "predicted": c.predicted, "measured": c.measured, "confirmed": c.confirmed, "verified": True,
           "requirements": [req.text], "objective": objective, "teacher": result.teacher,
           "target_from": "given" if target in given else "the fastest evaluated placements meeting the requirement"}
    record.update({"preset": name, "bounds": result.bounds, "confirm_teacher": result.confirm_teacher,
                   "confirm_bounds": result.confirm_bounds, "checks": [ch.to_dict() for ch in result.checks]})
    return row, record


def _targets(targets: list[float], fastest: bool, evaluations: Path, costs, requirement: str):
    """The given targets, then (with `fastest`, once they are spent without a preset) the fastest
    evaluated placements' speedups below the lowest; appended to `targets` as they are tried."""
    yield from list(targets)
    if fastest:
        extra = fastest_meeting(evaluations, costs, requirement, min(targets, default=float("inf")))
        for x in extra:
            targets.append(x)
            yield x


def add_to_presets(presets_json: str | Path, row: dict | None, record: dict) -> None:
    """Append (or replace by name) the verified preset in presets.json and record the search."""
    from supernet.io_utils import atomic_write_text

    path = Path(presets_json)
    data = json.loads(path.read_text())
    if row is not None:
        data["presets"] = [p for p in data["presets"] if p["name"] != row["name"]] + [row]
    data["constrained"] = record
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")
