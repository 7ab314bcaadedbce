"""Where costs came from: `costs --profile`, `costs --fit-profile`, presets.json's cost_source and the
warning `serve` / `generate` print when presets are used far from their setting."""
from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from supernet.cli.main import app as supernet_app
from supernet.cli.placement_cli import app as placement_app
from supernet.config import SupernetConfig
from supernet.layout import MIXERS
from supernet.placement.cost import analytic_costs, cost_source, describe_cost_source, setting_warning
from supernet.placement.observations import config_shape
from supernet.placement.profile import fit_profile, load_profile, profile_costs

runner = CliRunner()
L = 6


def run(app, args):
    result = runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture
def ckpt(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    SupernetConfig(num_hidden_layers=L, swa_window=512).save_pretrained(folder)
    return folder


def test_costs_on_a_device_profile(ckpt, tmp_path):
    out = tmp_path / "costs.json"
    result = run(supernet_app, ["costs", ckpt, "--profile", "h200", "--context", 8192, "--batch", 64, "--out", out])
    data = json.loads(out.read_text())
    assert data["unit"] == "ms/step" and data["profile"] == "h200" and data["source"] == "analytic"
    assert "analytic with the h200 device profile, decode, batch 64, context 8192" in result.output
    expected = profile_costs(SupernetConfig(num_hidden_layers=L, swa_window=512), load_profile("h200"), 8192, 64)
    assert data["per_layer"]["fa"] == pytest.approx(expected.per_layer["fa"][0])


def test_fit_profile_from_measured_tables(ckpt, tmp_path):
    """Tables timed on a (synthetic) device come back as a profile that predicts them."""
    truth = load_profile("h200")
    truth.bandwidth, truth.peak_flops, truth.device = 2e10, 5e11, "cpu"
    shape = config_shape(SupernetConfig(num_hidden_layers=L, swa_window=512))
    files = []
    for b, n in ((1, 256), (4, 1024), (4, 4096)):
        t = profile_costs(shape, truth, n, b).to_dict()
        t.update(source="measured", device="cpu", device_name="cpu (test)",
                 calibration={"uniform_ms_per_step": {m: t["fixed"] + L * t["per_layer"][m] for m in MIXERS}})
        files.append(tmp_path / f"t{b}_{n}.json")
        files[-1].write_text(json.dumps(t))
    out = tmp_path / "mycpu.json"
    result = run(supernet_app, ["costs", ckpt, "--fit-profile", out, "--tables", ",".join(map(str, files))])
    assert "wrote" in result.output and "mycpu" in result.output
    prof = load_profile(out)
    assert prof.device == "cpu" and prof.fit["max_abs_error"] < 0.02
    assert prof.bandwidth == pytest.approx(truth.bandwidth, rel=0.05)
    costs = tmp_path / "costs.json"
    run(supernet_app, ["costs", ckpt, "--profile", out, "--context", 2048, "--batch", 2, "--out", costs])
    assert json.loads(costs.read_text())["profile"] == "mycpu"


def test_fit_profile_refuses_tables_that_are_not_measured(ckpt, tmp_path):
    bad = tmp_path / "bytes.json"
    analytic_costs(SupernetConfig(num_hidden_layers=L), 1024, 1).save(bad)
    result = runner.invoke(supernet_app, ["costs", str(ckpt), "--fit-profile", str(tmp_path / "p.json"),
                                          "--tables", str(bad)])
    assert result.exit_code != 0 and "ms/step" in result.output and "Traceback" not in result.output


def test_optimize_records_and_prints_the_cost_source(ckpt, tmp_path):
    rng = np.random.default_rng(0)
    ev = tmp_path / "evaluations.jsonl"
    rows = []
    for _ in range(60):
        p = [MIXERS[i] for i in rng.integers(0, 4, L)]
        rows.append(json.dumps({"placement": p, "quality": 1.0 - 0.01 * sum(m != "fa" for m in p)
                                + 1e-4 * rng.normal(), "metric": "planted"}))
    ev.write_text("\n".join(rows) + "\n")
    costs, out = tmp_path / "costs.json", tmp_path / "presets.json"
    run(supernet_app, ["costs", ckpt, "--profile", "h200", "--context", 8192, "--batch", 64, "--out", costs])
    result = run(placement_app, ["optimize", "--evaluations", ev, "--costs", costs, "--speedup", 1.5, "--out", out])
    assert "costs: analytic with the h200 device profile, decode, batch 64, context 8192" in result.output
    src = json.loads(out.read_text())["cost_source"]
    assert src == {"kind": "analytic", "mode": "decode", "unit": "ms/step", "batch": 64, "context": 8192,
                   "profile": "h200", "profile_device": "cuda"}


def test_setting_warning():
    measured = {"kind": "measured", "mode": "decode", "unit": "ms/step", "batch": 1, "context": 256,
                "device": "cpu", "device_name": "cpu (x)", "dtype": "float32", "calibrated_in_stack": True}
    assert setting_warning(measured, 1, 300, "cpu") is None
    warn = setting_warning(measured, 64, 8192, "cuda")
    assert warn.count("\n") == 0 and "batch 64 (optimised for 1)" in warn and "context 8192 (optimised for 256)" in warn
    assert "device cuda (measured on cpu)" in warn and "measured on cpu (x) (float32, calibrated in-stack)" in warn
    gpu = cost_source(profile_costs(config_shape(SupernetConfig(num_hidden_layers=L)), load_profile("h200"), 8192, 64))
    assert setting_warning(gpu, 48, 6000, "cuda") is None
    assert "the h200 profile describes cuda" in setting_warning(gpu, 64, 8192, "cpu")
    assert setting_warning(None, 1, 1, "cpu") is None
    assert setting_warning(gpu, None, None, None) is None  # serve without --max-num-seqs / --max-model-len
    bytes_only = cost_source(analytic_costs(SupernetConfig(num_hidden_layers=L), 8192, 64))
    assert describe_cost_source(bytes_only).startswith("analytic (bytes/token counted, no device profile)")


def test_fit_profile_needs_timings():
    from supernet.layout import PlacementError

    with pytest.raises(PlacementError, match="at least 3"):
        fit_profile([], "x")
