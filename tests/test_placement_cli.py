"""`placement optimize`, `supernet optimize|costs|eval-placements`: outputs, and one-line errors on bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from supernet.cli.main import app as supernet_app
from supernet.cli.placement_cli import app as placement_app
from supernet.placement.cost import analytic_costs
from supernet.placement.planted import planted_tables, truth
from supernet.placement.sampling import initial_design
from supernet.config import SupernetConfig
from supernet.layout import MIXERS, load_presets

L = 8
runner = CliRunner()


@pytest.fixture
def files(tmp_path):
    """A planted evaluations.jsonl (L=8, 150 rows) and analytic long-context decode costs."""
    h, pr, Jp = planted_tables(L, 4, "nn", seed=0, pair_scale=0.1)
    h = -np.abs(h) * 0.01
    h[:, 0] = 0.0
    Jp = Jp * 0.01
    rng = np.random.default_rng(0)
    design = initial_design(150, L, 4, rng)
    rows = np.stack(design.rows)
    q = 1.0 + truth(h, pr, Jp, rows) + rng.normal(scale=1e-4, size=len(rows))
    ev = tmp_path / "evaluations.jsonl"
    ev.write_text("".join(json.dumps({"placement": [MIXERS[v] for v in r], "quality": float(x), "metric": "planted"})
                          + "\n" for r, x in zip(rows, q)))
    costs = tmp_path / "costs.json"
    analytic_costs(SupernetConfig(num_hidden_layers=L), 32768, 8).save(costs)
    return ev, costs


def run(app, args):
    result = runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result


def assert_one_line_error(result, fragment):
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()  # progress bars may come first; the error is one last line
    assert lines and lines[-1].startswith("error:"), result.stderr
    assert sum(line.startswith("error:") for line in lines) == 1
    assert fragment in lines[-1], lines[-1]


def test_optimize_writes_presets_frontier_and_plot(files, tmp_path):
    ev, costs = files
    out, png, sur = tmp_path / "presets.json", tmp_path / "front.png", tmp_path / "surrogate.json"
    result = run(placement_app, ["optimize", "--evaluations", ev, "--costs", costs, "--speedup", 1.5,
                                 "--speedup", 3, "--frontier", "--out", out, "--plot", png, "--save-surrogate", sur])
    assert result.exit_code == 0, result.output
    assert "speedup-1.5x" in result.stdout and "predicted quality" in result.stdout
    data = json.loads(out.read_text())
    assert data["num_layers"] == L and data["mixers"] == list(MIXERS)
    presets = {p["name"]: p for p in data["presets"]}
    assert set(presets) == {"speedup-1.5x", "speedup-3x"}
    for p, s in ((presets["speedup-1.5x"], 1.5), (presets["speedup-3x"], 3.0)):
        assert p["speedup"] >= s - 1e-9 and set(p) >= {"predicted_quality", "counts", "placement"}
    assert presets["speedup-1.5x"]["predicted_quality"] >= presets["speedup-3x"]["predicted_quality"]
    front = data["frontier"]
    assert [f["speedup"] for f in front] == sorted((f["speedup"] for f in front), reverse=True)
    assert np.all(np.diff([f["predicted_quality"] for f in front]) > 0)  # cheaper -> worse, strictly
    assert set(load_presets(out)) == {"speedup-1.5x", "speedup-3x"}  # the model/server reader accepts it
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the saved surrogate reproduces the same presets without refitting
    again = tmp_path / "again.json"
    assert run(placement_app, ["optimize", "--surrogate", sur, "--costs", costs, "--speedup", 1.5, "--speedup", 3,
                               "--out", again]).exit_code == 0
    assert [p["placement"] for p in json.loads(again.read_text())["presets"]] == [p["placement"] for p in data["presets"]]


def test_supernet_optimize_is_the_same_command(files, tmp_path):
    ev, costs = files
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    args = ["--evaluations", ev, "--costs", costs, "--speedup", 2, "--pairs", "all"]
    assert run(placement_app, ["optimize", *args, "--out", a]).exit_code == 0
    assert run(supernet_app, ["optimize", *args, "--out", b]).exit_code == 0
    assert json.loads(a.read_text())["presets"] == json.loads(b.read_text())["presets"]
    assert json.loads(a.read_text())["surrogate"]["pairs"] == "all"


def test_fit_command(files, tmp_path):
    ev, _ = files
    result = run(placement_app, ["fit", "--evaluations", ev, "--out", tmp_path / "s.json"])
    assert result.exit_code == 0 and "Spearman" in result.stdout
    assert json.loads((tmp_path / "s.json").read_text())["kind"] == "cluster-expansion"


def _rewrite(ev, fn):
    rows = [json.loads(x) for x in ev.read_text().splitlines()]
    ev.write_text("".join(json.dumps(r) + "\n" for r in fn(rows)))


@pytest.mark.parametrize(
    "case, fragment",
    [
        ("unknown-mixer", "unknown mixer 'mamba'"),
        ("wrong-layers-rows", "all rows must be for the same model"),
        ("wrong-layers-costs", "costs list 5 layers"),
        ("empty", "has no rows"),
        ("malformed", "is not valid JSON"),
        ("nan-quality", "quality is nan"),
        ("zero-cost", "must be positive"),
        ("negative-cost", "must be positive"),
        ("infeasible", "is infeasible"),
        ("negative-speedup", "positive"),
        ("missing-file", "does not exist"),
        ("bad-pairs", "unknown pair set"),
        ("no-speedup", "at least one --speedup"),
        ("bad-solver", "unknown solver"),
    ],
)
def test_bad_input_exits_with_one_line(files, tmp_path, case, fragment):
    ev, costs = files
    speed = ["--speedup", "2"]
    extra: list = []
    if case == "unknown-mixer":
        _rewrite(ev, lambda rows: rows[:5] + [{**rows[5], "placement": ["mamba"] * L}] + rows[6:])
    elif case == "wrong-layers-rows":
        _rewrite(ev, lambda rows: rows + [{"placement": ["fa"] * (L + 1), "quality": 0.9}])
    elif case == "wrong-layers-costs":
        costs.write_text(json.dumps({"per_layer": {m: [1.0 + k] * 5 for k, m in enumerate(MIXERS[::-1])}}))
    elif case == "empty":
        ev.write_text("")
    elif case == "malformed":
        ev.write_text(ev.read_text()[:-40])
        ev.write_text(ev.read_text() + "\n" + '{"placement": ["fa"]}\n')
    elif case == "nan-quality":
        _rewrite(ev, lambda rows: rows + [{"placement": rows[0]["placement"], "quality": float("nan")}])
    elif case in ("zero-cost", "negative-cost"):
        data = json.loads(costs.read_text())
        data["per_layer"]["gdn"] = 0.0 if case == "zero-cost" else -3.0
        costs.write_text(json.dumps(data))
    elif case == "infeasible":
        speed = ["--speedup", "2", "--speedup", "1000"]
    elif case == "negative-speedup":
        speed = ["--speedup", "-2"]
    elif case == "missing-file":
        ev = tmp_path / "nope.jsonl"
    elif case == "bad-pairs":
        extra = ["--pairs", "neighbours"]
    elif case == "no-speedup":
        speed = []
    elif case == "bad-solver":
        extra = ["--solver", "gurobi"]
    result = run(placement_app, ["optimize", "--evaluations", ev, "--costs", costs, *speed, *extra,
                                 "--out", tmp_path / "p.json"])
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "p.json").exists()


def test_costs_command_analytic(tmp_path):
    cfg = tmp_path / "ckpt"
    cfg.mkdir()
    SupernetConfig(num_hidden_layers=6).save_pretrained(cfg)
    out = tmp_path / "costs.json"
    result = run(supernet_app, ["costs", cfg, "--context", 16384, "--batch", 4, "--mode", "prefill", "--out", out])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["context_length"] == 16384 and data["batch_size"] == 4 and data["unit"] == "FLOP/token"
    assert set(data["per_layer"]) == set(MIXERS) and "all-layers speedup" in result.stdout
    assert_one_line_error(run(supernet_app, ["costs", cfg, "--mode", "train"]), "unknown --mode")
    assert_one_line_error(run(supernet_app, ["costs", tmp_path / "none"]), "no config.json")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A saved tiny random supernet with a small byte-level BPE tokenizer."""
    torch = pytest.importorskip("torch")
    from tests.helpers.configs import tiny_config

    try:
        from supernet.model import SupernetForCausalLM

        torch.manual_seed(0)
        model = SupernetForCausalLM(tiny_config(num_hidden_layers=3, vocab_size=300)).eval()
    except (ImportError, NotImplementedError) as exc:
        pytest.skip(f"the supernet model cannot be built yet ({exc})")
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["the quick brown fox"] * 4, trainers.BpeTrainer(
        vocab_size=280, special_tokens=["<unk>", "<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(path)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>").save_pretrained(path)
    data = path / "eval.jsonl"
    data.write_text("".join(json.dumps({"id": k, "text": f"Sentence number {k} about foxes and dogs."}) + "\n"
                            for k in range(40)))
    return path, data


@pytest.mark.slow
def test_eval_placements_then_optimize_on_a_tiny_checkpoint(tiny_checkpoint, tmp_path):
    ckpt, data = tiny_checkpoint
    out = tmp_path / "evaluations.jsonl"
    common = ["eval-placements", ckpt, "--data", data, "--out", out, "--batch-size", 3, "--top-k", 16,
              "--active-fraction", 0.3, "--rounds", 1]
    base = [*common, "--seq-len", 16, "--sequences", 3]
    result = run(supernet_app, [*base, "--n", 14])
    assert result.exit_code == 0, result.output
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 14 and len({tuple(r["placement"]) for r in rows}) == 14
    all_fa = [r for r in rows if r["placement"] == ["fa"] * 3]
    assert all_fa and all_fa[0]["quality"] == pytest.approx(1.0, abs=1e-5)
    assert {r["reference"] for r in rows} == {"all-fa (checkpoint)"} and rows[0]["metric"].endswith("@top16")
    assert "active" in {r["design"] for r in rows}
    assert run(supernet_app, [*base, "--n", 16]).exit_code == 0  # resumes
    assert len(out.read_text().splitlines()) == 16
    # another token set cannot be appended to the same file
    assert_one_line_error(run(supernet_app, [*common, "--seq-len", 8, "--sequences", 3, "--n", 18]), "data_id")
    costs = tmp_path / "costs.json"
    assert run(supernet_app, ["costs", ckpt, "--measure", "--context", 16, "--repeats", 2, "--out", costs]).exit_code == 0
    assert json.loads(costs.read_text())["source"] == "measured"
    calibrated = tmp_path / "costs-calibrated.json"
    result = run(supernet_app, ["costs", ckpt, "--measure", "--calibrate", "--context", 16, "--repeats", 2,
                                "--out", calibrated])
    assert result.exit_code == 0, result.output
    assert "in-stack gdn" in result.output
    assert set(json.loads(calibrated.read_text())["calibration"]["factors"]) == set(MIXERS)
    assert_one_line_error(run(supernet_app, ["costs", ckpt, "--calibrate", "--out", calibrated]),
                          "--calibrate needs --measure")
    result = run(supernet_app, ["optimize", "--evaluations", out, "--costs", costs, "--frontier",
                                "--out", tmp_path / "presets.json", "--pairs", "none"])
    assert result.exit_code == 0, result.output


@pytest.mark.slow
def test_installed_placement_command_fails_cleanly(tmp_path):
    """The console script itself (not the test runner): one line on stderr, exit code 2."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    exe = shutil.which("placement", path=str(Path(sys.executable).parent)) or shutil.which("placement")
    if exe is None:
        pytest.skip("the `placement` console script is not installed (pip install -e .)")
    proc = subprocess.run([exe, "optimize", "--evaluations", str(tmp_path / "none.jsonl"), "--costs",
                           str(tmp_path / "none.json"), "--speedup", "2"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: costs file {tmp_path / 'none.json'} does not exist; "
                                                "write one with `supernet costs CKPT`"]
