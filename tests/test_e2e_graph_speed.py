"""benchmarks/e2e_graph_speed.py joins measured quality and graph-timed speed by preset, and refuses mismatches."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "e2e_graph_speed.py"


def _module():
    spec = importlib.util.spec_from_file_location("e2e_graph_speed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _measurements():
    return {"presets": [
        {"preset": "all-fa", "placement": ["fa"] * 3, "decode_speedup": 1.0, "quality": 1.0},
        {"preset": "fast", "placement": ["fa", "swa", "swa"], "decode_speedup": 3.3, "quality": 0.98},
    ], "speculative": {"best": {}}}


def _speeds(fast_placement="fa:1 swa:2"):
    return {"device": "GPU", "batch": 64, "context": 8192, "rows": [
        {"preset": "all-fa", "placement": "fa:3", "speedup_vs_all_fa": 1.0, "ms_per_step": 9.0},
        {"preset": "fast", "placement": fast_placement, "speedup_vs_all_fa": 1.5, "ms_per_step": 6.0},
    ]}


def test_speed_column_comes_from_the_graph_timings():
    joined = _module().join(_measurements(), _speeds())
    fast = joined["presets"][1]
    assert fast["decode_speedup"] == 1.5 and fast["eager_decode_speedup"] == 3.3 and fast["ms_per_step"] == 6.0
    assert fast["quality"] == 0.98 and "speculative" not in joined
    assert joined["speed_source"]["context"] == 8192


def test_a_preset_timed_with_another_placement_is_refused():
    with pytest.raises(SystemExit, match="'fast'.*timed fa:2 swa:1"):
        _module().join(_measurements(), _speeds("fa:2 swa:1"))


def test_a_preset_without_timing_is_refused():
    speeds = _speeds()
    speeds["rows"].pop()
    with pytest.raises(SystemExit, match="'fast' has no row"):
        _module().join(_measurements(), speeds)


def test_uniform_placements_take_their_quality_from_the_evaluations():
    module = _module()
    speeds = _speeds()
    speeds["rows"].append({"preset": "all-gdn", "placement": "gdn:3", "speedup_vs_all_fa": 4.2, "ms_per_step": 2.0})
    speeds["rows"].append({"preset": "max", "placement": "gdn:3", "speedup_vs_all_fa": 4.1, "ms_per_step": 2.1})
    evaluations = [{"placement": ["fa"] * 3, "quality": 1.0, "top1_agreement": 1.0, "metric": "m"},
                   {"placement": ["gdn"] * 3, "quality": 0.9, "top1_agreement": 0.56, "metric": "m"},
                   {"placement": ["fa", "swa", "swa"], "quality": 0.5, "metric": "m"}]
    joined = module.add_evaluated_uniform(module.join(_measurements(), speeds), speeds, evaluations)
    rows = {r["preset"]: r for r in joined["evaluated_uniform"]}
    assert sorted(rows) == ["all-fa", "all-gdn"]  # the mixed 'fast' row cannot be matched from counts
    assert rows["all-gdn"]["decode_speedup"] == 4.2 and rows["all-gdn"]["quality"] == 0.9
    assert "all-gdn" in module.evaluated_markdown(joined["evaluated_uniform"])
