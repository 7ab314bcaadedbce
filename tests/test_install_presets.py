"""`supernet install-presets CKPT presets.json`: validates, merges into config.json atomically, reports."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from supernet.cli.main import app
from supernet.config import SupernetConfig
from supernet.layout import Placement, save_presets
from tests.helpers.configs import tiny_config

runner = CliRunner()
L = 4


def run(*args):
    result = runner.invoke(app, ["install-presets", *map(str, args)])
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result


def one_line_error(result, fragment):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0], result.stderr


@pytest.fixture
def ckpt(tmp_path):
    config = tiny_config()
    config.presets = {"all-fa": ["fa"] * L, "mine": ["fa", "swa", "swa", "fa"]}
    config.save_pretrained(tmp_path / "ckpt")
    return tmp_path / "ckpt"


def presets_file(path, presets, **extra):
    save_presets(path, {n: Placement.parse(p, L) for n, p in presets.items()}, extra)
    return path


def config_of(ckpt):
    return json.loads((ckpt / "config.json").read_text())


def test_installs_keeps_existing_presets_and_other_keys_and_serves_them(ckpt, tmp_path):
    before = config_of(ckpt)
    presets = presets_file(tmp_path / "presets.json", {"fast": "fa,gdn,kda,gdn", "speedup-2x": "fa,swa,gdn,fa"},
                           fast={"speedup": 2.5, "predicted_quality": 0.91})
    result = run(ckpt, presets)
    assert result.exit_code == 0, result.output
    assert "installed fast, speedup-2x" in result.stderr and "2.50x" in result.stdout and "0.9100" in result.stdout
    assert "supernet serve" in result.stderr and "--preset fast" in result.stderr
    after = config_of(ckpt)
    assert list(after["presets"]) == ["all-fa", "mine", "fast", "speedup-2x"]
    assert after["presets"]["fast"] == ["fa", "gdn", "kda", "gdn"]
    assert {k: v for k, v in after.items() if k != "presets"} == {k: v for k, v in before.items() if k != "presets"}
    config = SupernetConfig.from_pretrained(ckpt)  # what the model and the vLLM plugin load
    assert config.resolve("fast").to_list() == ["fa", "gdn", "kda", "gdn"]
    assert not list(ckpt.glob(".config.json*"))  # no temporary file left behind
    # the same install again is no clash and writes nothing
    mtime = (ckpt / "config.json").stat().st_mtime_ns
    again = run(ckpt, presets)
    assert again.exit_code == 0 and "nothing written" in again.stderr and "unchanged" in again.stdout
    assert (ckpt / "config.json").stat().st_mtime_ns == mtime


def test_a_name_clash_needs_overwrite_and_replace_drops_the_rest(ckpt, tmp_path):
    clash = presets_file(tmp_path / "clash.json", {"mine": "gdn,gdn,gdn,gdn", "new": "kda,kda,kda,kda"})
    one_line_error(run(ckpt, clash), "already has preset(s) 'mine' with another placement; pass --overwrite")
    assert "new" not in config_of(ckpt)["presets"]  # nothing written
    result = run(ckpt, clash, "--overwrite")
    assert result.exit_code == 0 and "updated" in result.stdout
    assert config_of(ckpt)["presets"]["mine"] == ["gdn"] * 4 and "all-fa" in config_of(ckpt)["presets"]
    result = run(ckpt, presets_file(tmp_path / "only.json", {"only": "fa,fa,swa,swa"}), "--replace")
    assert result.exit_code == 0 and "removed" in result.stdout and "removed all-fa, mine, new" in result.stderr
    assert config_of(ckpt)["presets"] == {"only": ["fa", "fa", "swa", "swa"]}


def test_dry_run_writes_nothing(ckpt, tmp_path):
    before = (ckpt / "config.json").read_text()
    result = run(ckpt, presets_file(tmp_path / "p.json", {"fast": "gdn,gdn,gdn,fa"}), "--dry-run")
    assert result.exit_code == 0 and "dry run" in result.stderr and "added" in result.stdout
    assert (ckpt / "config.json").read_text() == before


def write(path, payload):
    path.write_text(json.dumps(payload))
    return path


@pytest.mark.parametrize("payload, fragment", [
    ({"num_layers": 5, "presets": [{"name": "x", "placement": ["fa"] * 5}]}, "is for 5 layers but the checkpoint has 4"),
    ({"presets": [{"name": "short", "placement": ["fa"] * 3}]}, "preset 'short' in"),
    ({"presets": [{"name": "bad", "placement": ["fa", "xyz", "fa", "fa"]}]}, "unknown mixer 'xyz' at layer 1"),
    ({"presets": [{"name": "a", "placement": "all-fa"}, {"name": "a", "placement": "all-gdn"}]}, "appears twice"),
    ({"presets": [{"name": "default", "placement": "all-gdn"}]}, "reserved for the checkpoint's default placement"),
    ({"presets": [{"placement": "all-gdn"}]}, "needs a non-empty 'name'"),
    ({"presets": []}, "holds no presets"),
    ({"preset": []}, "must be an object with a 'presets' list"),
])
def test_bad_presets_files_are_one_line_errors_and_change_nothing(ckpt, tmp_path, payload, fragment):
    before = (ckpt / "config.json").read_text()
    one_line_error(run(ckpt, write(tmp_path / "p.json", payload)), fragment)
    assert (ckpt / "config.json").read_text() == before


def test_bad_paths_are_one_line_errors(ckpt, tmp_path):
    good = presets_file(tmp_path / "p.json", {"fast": "gdn,gdn,gdn,fa"})
    one_line_error(run(tmp_path / "nowhere", good), "is not a checkpoint folder (no config.json)")
    one_line_error(run(ckpt, tmp_path / "missing.json"), "presets file")
    (tmp_path / "notjson.json").write_text("{")
    one_line_error(run(ckpt, tmp_path / "notjson.json"), "is not valid JSON")
    other = tmp_path / "llama"
    other.mkdir()
    write(other / "config.json", {"model_type": "llama", "num_hidden_layers": 4})
    one_line_error(run(other, good), "is not a supernet config (model_type 'llama')")
