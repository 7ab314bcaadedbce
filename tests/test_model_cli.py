"""`supernet convert / info / generate` as a user runs them: outputs, and one-line errors."""
from __future__ import annotations

import pytest
from typer.testing import CliRunner

from supernet.cli.main import app

runner = CliRunner()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from supernet.training.tiny import tiny_teacher_dir

    out = tmp_path_factory.mktemp("cli") / "ckpt"
    result = runner.invoke(app, ["convert", str(tiny_teacher_dir()), str(out), "--swa-window", "8"])
    assert result.exit_code == 0, result.output
    return out


def test_convert_writes_a_loadable_checkpoint_with_all_fa_default(ckpt):
    import json

    config = json.loads((ckpt / "config.json").read_text())
    assert config["model_type"] == "supernet" and config["swa_window"] == 8
    assert set(config["placement"]) == {"fa"} and "all-fa" in config["presets"]


def test_info_lists_mixers_parameters_and_presets(ckpt):
    result = runner.invoke(app, ["info", str(ckpt)])
    assert result.exit_code == 0, result.output
    for word in ("shared", "fa", "swa", "gdn", "kda", "all-fa", "window 8"):
        assert word in result.output


def test_generate_with_a_placement_and_with_a_draft_preset(ckpt):
    import json

    layers = json.loads((ckpt / "config.json").read_text())["num_hidden_layers"]
    mixed = ",".join(["swa", "gdn", "kda", "fa"] * layers)[: 4 * layers - 1].split(",")[:layers]
    result = runner.invoke(app, ["generate", str(ckpt), "hello", "--placement", ",".join(mixed),
                                 "--max-new-tokens", "5"])
    assert result.exit_code == 0, result.output
    spec = runner.invoke(app, ["generate", str(ckpt), "hello", "--preset", "all-fa", "--draft-preset", "all-swa",
                               "--max-new-tokens", "6"])
    assert spec.exit_code == 0, spec.output
    plain = runner.invoke(app, ["generate", str(ckpt), "hello", "--preset", "all-fa", "--max-new-tokens", "6"])
    # speculative decoding is lossless: the same text as the target alone (first line of stdout)
    assert spec.stdout.splitlines()[0] == plain.stdout.splitlines()[0]


@pytest.mark.parametrize("args, message", [
    (["--placement", "fa,fa"], "layers but the model has"),
    (["--placement", "fa,mamba"], "unknown mixer 'mamba'"),
    (["--preset", "nope"], "unknown preset 'nope'; this checkpoint has: all-fa"),
])
def test_generate_refuses_bad_placements_with_one_line(ckpt, args, message):
    result = runner.invoke(app, ["generate", str(ckpt), "hello", *args])
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [lines[-1]] and lines[-1].startswith("error:") and message in lines[-1]


def test_missing_checkpoint_is_a_one_line_error(tmp_path):
    result = runner.invoke(app, ["info", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "not a supernet checkpoint" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--draft-preset", "nope"], "unknown preset 'nope'"),
    (["--draft-preset", "all-swa", "--draft-k", "0"], "--draft-k must be >= 1"),
    (["--draft-preset", "all-fa"], "the draft placement equals the target"),
    (["--draft-k", "3"], "--draft-k needs --draft-preset"),
])
def test_generate_refuses_bad_draft_settings_with_one_line(ckpt, args, message):
    result = runner.invoke(app, ["generate", str(ckpt), "hello world", "--preset", "all-fa", *args])
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [lines[-1]] and lines[-1].startswith("error:") and message in lines[-1]


def test_generate_auto_draft_is_lossless(ckpt):
    """`--draft-preset auto` asks the cost model; whatever it picks, the text is the target's own."""
    args = ["generate", str(ckpt), "hello world, again", "--placement", "all-swa", "--max-new-tokens", "6"]
    auto = runner.invoke(app, [*args, "--draft-preset", "auto", "--for-batch", "64", "--for-context", "8192"])
    assert auto.exit_code == 0, auto.output
    assert "auto draft:" in auto.stderr
    plain = runner.invoke(app, args)
    assert auto.stdout.splitlines()[0] == plain.stdout.splitlines()[0]
