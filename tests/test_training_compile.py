"""`train.compile: true` on the CPU: same losses as eager, one compiled variant per mixer, no
recompilation once every mixer has run, evaluation outside the compiled graphs."""
from __future__ import annotations

import math

import pytest
import torch

from supernet.layout import Placement
from supernet.training.tiny import TinyWorld

pytestmark = pytest.mark.slow


def _run(world, out_dir, compile_on: bool, steps: int):
    from supernet.training.compile import compile_stats
    from supernet.training.trainer import Trainer

    cfg = world.config(out_dir, data={"seq_len": 32},
                       train={"max_steps": steps, "compile": compile_on, "micro_batch_size": 2, "grad_accum": 1,
                              "train_mixers": ["swa", "gdn", "kda"]},
                       sampling={"mixers": ["fa", "swa", "gdn", "kda"], "presets": ["all-gdn"], "preset_prob": 0.25})
    t = Trainer(cfg)
    if compile_on:
        torch._dynamo.config.suppress_errors = False  # a compiler problem must fail the test
    t.precompile()  # a no-op without compile; with it, every variant a step can meet
    recs, graphs = [], [compile_stats()["unique_graphs"]]
    for _ in range(steps):
        p = t.next_placement()  # sampled over all four mixers, plus all-gdn presets
        recs.append((str(p), t.train_step(p)))
        t.step += 1
        graphs.append(compile_stats()["unique_graphs"])
    ev = t.evaluate()
    return recs, graphs, ev, compile_stats(), t


def test_compiled_layers_match_eager_without_recompiling(tmp_path):
    from supernet.training.compile import compile_stats

    world = TinyWorld(tmp_path / "world")
    steps = 5
    eager, _, ev_eager, _, _ = _run(world, tmp_path / "eager", False, steps)
    before = compile_stats()
    comp, graphs, ev_comp, after, t = _run(world, tmp_path / "compiled", True, steps)

    assert [p for p, _ in comp] == [p for p, _ in eager]  # the same sampled placements
    for (p, a), (_, b) in zip(eager, comp):
        for key in ("loss", "kl", "hidden", "grad_norm"):
            assert math.isclose(a[key], b[key], rel_tol=2e-4, abs_tol=1e-6), (p, key, a[key], b[key])
    for name in ev_eager:
        assert math.isclose(ev_eager[name], ev_comp[name], rel_tol=2e-4, abs_tol=1e-6), name  # weights differ by rounding
    assert {m for p, _ in comp for m in Placement.parse(p)} == {"fa", "swa", "gdn", "kda"}
    # every student layer really is compiled, and the compiled variants are bounded: one per mixer
    # for the student layer (+ the mixers' own frames around the kernel graph break) and one for
    # the teacher layer, all made by `precompile`; nothing compiles in the steps or in evaluation
    assert all(getattr(layer, "_compiled_call_impl", None) is not None for layer in t.student.model.layers)
    assert 5 <= graphs[0] - before["unique_graphs"] <= 16, (before, graphs)
    assert graphs[-1] == graphs[0] == after["unique_graphs"], graphs
    assert after["recompile_limit_hits"] == before["recompile_limit_hits"]
    assert after["failed_frames"] == before["failed_frames"]
