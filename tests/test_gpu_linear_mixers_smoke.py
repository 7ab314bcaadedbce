"""benchmarks/gpu_linear_mixers.py --smoke on the CPU (every item runs, the JSON has every section), and
the library pieces it is made of (supernet.measure.linear_mixers, .fla_layer)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_smoke_run_writes_checks_timings_and_kernel_breakdown(tmp_path):
    out = tmp_path / "linear.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/gpu_linear_mixers.py", "--smoke", "--only-smollm2", "--time-limit", "0",
         "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["complete"] and data["all_checks_ok"] and not data["errors"] and not data["skipped"]
    checks = {(r["mixer"], r["check"]) for r in data["correctness"]}
    assert {("conv", "3 decode steps (in-place update)"), ("conv", "prefill T=300"), ("norm", "gated rmsnorm (sigmoid)"),
            ("kda", "in-kernel gates T=300 (chunk)"), ("gdn", "6 decode steps as a CUDA graph vs eager")} <= checks
    # the required rows come first: (a) checks, then (b), then (c)
    groups = [item["group"] for item in data["items"]]
    assert groups == sorted(groups) and groups[0] == "a" and groups[-1] == "c"
    assert {r["mixer"] for r in data["prefill"]} == {"gdn", "kda"}
    assert all("layer_graph_ms" in r and r["layer_graph_ms"] is None for r in data["decode"])  # no graphs on CPU
    assert all(r["layer_torch_ms"] > 0 for r in data["prefill"] + data["decode"])  # fused paths off, same run
    # fla's layer: its kwargs in the header, not timed on the CPU (each row says so)
    assert data["fla_layer"]["tiny"]["kda"]["kwargs"]["num_heads"] == 2 and data["fla_layer"]["tiny"]["gdn"]["differences"]
    assert all(r["fla_layer_ms"] is None and r["layer_over_fla_layer"] is None and "fla_layer_skipped" in r
               for r in data["prefill"] + data["decode"])
    cases = {(r["mixer"], r["case"], r["target"]) for r in data["profile"]}
    assert {("kda", "decode batch=4", "layer"), ("gdn", "prefill batch=1 tokens=64", "op"),
            ("gdn", "decode batch=1", "layer (torch paths)")} <= cases
    assert all(r["top"] and r["kernels_per_call"] > 0 for r in data["profile"])


def test_items_filter_runs_the_checks_and_the_chosen_rows_only(tmp_path):
    out = tmp_path / "linear.json"
    cmd = [sys.executable, "benchmarks/gpu_linear_mixers.py", "--smoke", "--only-smollm2", "--time-limit", "0",
           "--out", str(out)]
    proc = subprocess.run(cmd + ["--items", "prefill tiny kda batch=2"], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["all_checks_ok"] and data["items_filter"] == "prefill tiny kda batch=2"
    assert {item["group"] for item in data["items"]} == {"a", "c"}
    assert [(r["mixer"], r["batch"]) for r in data["prefill"]] == [("kda", 2)] and not data["decode"]
    for bad, message in (("prefill nothing", "matches no item"), ("(", "not a regular expression")):
        proc = subprocess.run(cmd + ["--items", bad], cwd=REPO, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


# fla's own layer, the benchmark's second reference: its kwargs and weights must reproduce our mixer

from supernet.measure import fla_layer, linear_mixers  # noqa: E402
from supernet.measure.shapes import LINEAR_SHAPES, linear_config, smollm2_config  # noqa: E402

SMOLLM2 = LINEAR_SHAPES["smollm2"]


@pytest.mark.parametrize("mixer", ["gdn", "kda"])
def test_fla_layer_kwargs_follow_our_config(mixer):
    config = smollm2_config()
    kwargs = fla_layer.fla_layer_kwargs(SMOLLM2, mixer, config)
    heads = config.gdn_num_heads if mixer == "gdn" else config.kda_num_heads
    head_dim = config.gdn_head_dim if mixer == "gdn" else config.kda_head_dim
    assert (kwargs["hidden_size"], kwargs["num_heads"], kwargs["num_v_heads"], kwargs["head_dim"]) == (576, 9, 9, 64)
    assert (kwargs["hidden_size"], kwargs["num_heads"], kwargs["head_dim"]) == (config.hidden_size, heads, head_dim)
    assert kwargs["expand_v"] == 1 and kwargs["conv_size"] == config.linear_conv_size == 4
    assert kwargs["norm_eps"] == config.linear_norm_eps and kwargs["mode"] == "chunk"
    assert kwargs["use_short_conv"] and not kwargs["conv_bias"] and kwargs["layer_idx"] == 0
    # the benchmark's own config for the shape gives the same layer
    assert fla_layer.fla_layer_kwargs(SMOLLM2, mixer, linear_config(576, 9, 64)) == kwargs
    if mixer == "gdn":
        assert kwargs["use_gate"] and kwargs["output_gate_activation"] == "silu"
    with pytest.raises(ValueError, match="does not match"):
        fla_layer.fla_layer_kwargs(dict(SMOLLM2, heads=8), mixer, config)


def test_fla_layer_kwargs_follow_value_heads_and_dims():
    config = smollm2_config(gdn_num_v_heads=18, gdn_v_head_dim=128, linear_conv_size=3)
    kwargs = fla_layer.fla_layer_kwargs(SMOLLM2, "gdn", config)
    assert (kwargs["num_heads"], kwargs["num_v_heads"], kwargs["expand_v"], kwargs["conv_size"]) == (9, 18, 2, 3)


@pytest.mark.parametrize("mixer,overrides", [("gdn", {}), ("kda", {}), ("gdn", {"gdn_num_v_heads": 18})])
def test_fla_layer_constructs_on_cpu_with_our_weights(mixer, overrides):
    """fla's layer builds on the CPU (it only runs with Triton on CUDA) and takes every weight of our
    mixer under its names with strict loading: same parameter shapes throughout."""
    fla_layers = pytest.importorskip("fla.layers")
    config = smollm2_config(**overrides)
    ours = linear_mixers.random_mixer(mixer, config, seed=3)
    layer = fla_layer.build_fla_layer(SMOLLM2, mixer, config, ours)
    assert isinstance(layer, getattr(fla_layers, fla_layer.FLA_LAYER_CLASSES[mixer])) and not layer.training
    assert layer.conv_size == config.linear_conv_size and layer.q_conv1d.kernel_size == (4,)
    theirs = layer.state_dict()
    for name, t in fla_layer.fla_layer_state_dict(ours.state_dict(), mixer).items():
        assert torch.equal(theirs[name], t), name
    extra = sum(p.numel() for p in layer.parameters()) - sum(p.numel() for p in ours.parameters())
    assert extra == (config.kda_num_heads * config.kda_v_head_dim if mixer == "kda" else 0)  # KDA g_proj bias
    if mixer == "kda":
        assert not layer.g_proj[1].bias.any()


@pytest.mark.slow
def test_fla_layer_equals_our_mixer_and_times_under_the_triton_interpreter(interpreted):
    """fla's layer with our weights computes what our mixer computes (prefill with a cache, decode
    steps), and the benchmark's fla-layer columns fill in (fla's kernels interpreted on the CPU; its
    chunk kernel cannot run there, so prefill stays at <= 64 tokens: the fused recurrent kernel)."""
    interpreted.check("tests.test_gpu_linear_mixers_smoke", "FLA LAYER OK")


def _child() -> None:
    import triton.runtime.autotuner as autotuner

    from supernet.cache import SupernetCache

    # the interpreter has no benchmarker: every autotuning candidate "takes" the same time
    autotuner.Autotuner.do_bench = property(lambda self: lambda fn, quantiles=None: [1.0, 1.0, 1.0])
    spec = dict(hidden=64, heads=2, head_dim=32)
    config = linear_config(64, 2, 32)
    torch.manual_seed(0)
    for kind in ("gdn", "kda"):
        ours = linear_mixers.random_mixer(kind, config, seed=1)
        layer = fla_layer.build_fla_layer(spec, kind, config, ours)
        x = torch.randn(2, 44, 64)
        with torch.inference_mode():
            cache, fla_cache = SupernetCache(1), fla_layer.fla_cache()
            outs = [ours(x[:, :40], cache=cache)]
            theirs = [layer(x[:, :40], past_key_values=fla_cache, use_cache=True)[0]]
            for t in range(40, 44):
                outs.append(ours(x[:, t:t + 1], cache=cache))
                theirs.append(layer(x[:, t:t + 1], past_key_values=fla_cache, use_cache=True)[0])
        for o, r in zip(theirs, outs):
            torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-5)
        H, K = spec["heads"], spec["head_dim"]
        assert fla_cache[0]["recurrent_state"].shape == (2, H, K, K)
        # the timing path: columns filled, our weights in fla's layer, its decode from a random state
        mixers = linear_mixers.TimingMixers("cpu", torch.float32, with_fla_layer=True)
        row = linear_mixers.time_prefill(mixers, "tiny", spec, kind, 1, 64)
        assert row["fla_layer_ms"] > 0 and row["layer_over_fla_layer"] > 0, row
        assert row["fla_layer_rel_err"] < 1e-4 and "fla_layer_error" not in row, row
        row = linear_mixers.time_decode(mixers, "tiny", spec, kind, 2, 128)
        assert row["fla_layer_ms"] > 0 and "fla_layer_error" not in row, row
        assert linear_mixers.TimingMixers("cpu", torch.float32).fla_layer("tiny", spec, kind)[1] == {
            "fla_layer_skipped": fla_layer.FLA_LAYER_OFF_CUDA}
    print("FLA LAYER OK")
