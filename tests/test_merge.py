"""`supernet merge merge.yaml` on small random supernets: identities, the merge rules' defining
properties, filters, and one-line errors for bad YAML and mismatched layouts."""
from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from supernet import merge_methods
from supernet.cli.main import app
from tests.helpers.checkpoints import make_checkpoint
from tests.helpers.configs import vllm_config

runner = CliRunner()
U32 = 2.0 ** -24  # float32 unit roundoff: one rounding of a float64 result to float32


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    return {name: make_checkpoint(root / name, seed=seed) for name, seed in (("base", 0), ("a", 1), ("b", 2))}


def tensors(path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def merge(tmp_path, doc: dict, name: str = "merge.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc))
    return runner.invoke(app, ["merge", str(path)])


def ok(result):
    assert result.exit_code == 0, result.output
    return result


def one_line_error(result, message: str) -> None:
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1 and message in errors[0], result.output
    assert "Traceback" not in result.output


# ------------------------------------------------------------------------------------------------
# identities and defining properties
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["linear", "ties", "slerp"])
def test_merging_a_checkpoint_with_itself_is_the_identity(ckpts, tmp_path, method):
    a = str(ckpts["a"])
    doc = {"out": str(tmp_path / "out"), "method": method,
           "models": [{"model": a, "weight": 0.3}, {"model": a, "weight": 0.7}], "parameters": {"t": 0.37}}
    if method == "ties":
        doc["base_model"] = a
        doc["parameters"]["density"] = 0.5
    ok(merge(tmp_path, doc))
    merged, original = tensors(tmp_path / "out"), tensors(ckpts["a"])
    assert set(merged) == set(original)
    for name, t in original.items():
        # float64 arithmetic on float32 inputs is off by far less than half a float32 ulp, so it rounds back
        assert torch.equal(merged[name], t), name
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["presets"] == json.loads((ckpts["a"] / "config.json").read_text())["presets"]
    assert (tmp_path / "out" / "tokenizer.json").exists()


def test_a_linear_merge_of_two_is_their_average(ckpts, tmp_path):
    ok(merge(tmp_path, {"out": str(tmp_path / "avg"), "method": "linear",
                        "models": [str(ckpts["a"]), str(ckpts["b"])]}))
    merged, a, b = tensors(tmp_path / "avg"), tensors(ckpts["a"]), tensors(ckpts["b"])
    for name in a:
        exact = (a[name].double() + b[name].double()) / 2
        # one rounding of the float64 average (itself off by ~2^-53) to float32
        bound = (U32 + 2.0 ** -52) * exact.abs() + torch.finfo(torch.float32).tiny
        assert torch.all((merged[name].double() - exact).abs() <= bound), name


def test_ties_keeps_the_sign_consensus_of_planted_deltas(ckpts, tmp_path):
    """Every tensor gets planted task vectors over the base, by entry index mod 4:
    0: (+2, +1, -1) -> elected +, disjoint mean of +2, +1 = +1.5
    1: (-3, +1, +1) -> summed mass -1, elected -, only -3 agrees  = -3
    2, 3: tiny (|d| <= 1e-4): trimmed away at density 0.5, so the base is kept.
    (Where the entry count is not a multiple of 4, density 0.5 cuts inside the large entries and the
    expectation below does not hold; that is only KDA's A_log here, 2 heads.)"""
    base = tensors(ckpts["base"])
    planted = {0: (2.0, 1.0, -1.0), 1: (-3.0, 1.0, 1.0)}
    gen = torch.Generator().manual_seed(5)
    models = []
    for i in range(3):
        sd = {}
        for name, t in base.items():
            cls = torch.arange(t.numel()).reshape(t.shape) % 4
            d = 1e-4 * (2 * torch.rand(t.shape, generator=gen) - 1)
            for c, values in planted.items():
                d = torch.where(cls == c, torch.tensor(values[i]), d)
            sd[name] = (t.double() + d.double()).float()
        folder = tmp_path / f"m{i}"
        folder.mkdir()
        for f in ckpts["base"].iterdir():
            if f.name != "model.safetensors":
                (folder / f.name).write_bytes(f.read_bytes())
        save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
        models.append({"model": str(folder)})
    ok(merge(tmp_path, {"out": str(tmp_path / "ties"), "method": "ties", "base_model": str(ckpts["base"]),
                        "models": models, "parameters": {"density": 0.5}}))
    merged = tensors(tmp_path / "ties")
    inputs = [tensors(tmp_path / f"m{i}") for i in range(3)]
    checked = [name for name, t in base.items() if t.numel() % 4 == 0]
    assert len(checked) >= 0.95 * len(base)
    for name in checked:
        t = base[name]
        cls = torch.arange(t.numel()).reshape(t.shape) % 4
        deltas = [x[name].double() - t.double() for x in inputs]  # the stored (float32-rounded) deltas
        want = t.double().clone()
        agree0 = (deltas[0] + deltas[1]) / 2
        want = torch.where(cls == 0, t.double() + agree0, want)
        want = torch.where(cls == 1, t.double() + deltas[0], want)
        assert torch.equal(merged[name], want.float()), name
        assert torch.all(torch.sign(merged[name].double() - t.double())[cls == 0] > 0)
        assert torch.all(torch.sign(merged[name].double() - t.double())[cls == 1] < 0)


def test_slerp_returns_the_endpoints_and_filters_pick_t_per_tensor(ckpts, tmp_path):
    a, b = tensors(ckpts["a"]), tensors(ckpts["b"])
    for t, want in ((0.0, a), (1.0, b)):
        ok(merge(tmp_path, {"out": str(tmp_path / f"s{t}"), "method": "slerp",
                            "models": [str(ckpts["a"]), str(ckpts["b"])], "parameters": {"t": t}}))
        merged = tensors(tmp_path / f"s{t}")
        assert all(torch.equal(merged[n], want[n]) for n in want)
    # base_model is the t=0 end; a filter moves the gdn mixers to t=1 and keeps the embeddings of `base`
    ok(merge(tmp_path, {"out": str(tmp_path / "f"), "method": "slerp", "base_model": str(ckpts["a"]),
                        "models": [str(ckpts["a"]), str(ckpts["b"])], "parameters": {"t": 0.0},
                        "filters": [{"match": "model.layers.*.mixers.gdn.*", "t": 1.0},
                                    {"match": "model.embed_tokens.weight", "keep": "base"}]}))
    merged = tensors(tmp_path / "f")
    for name in a:
        assert torch.equal(merged[name], b[name] if ".mixers.gdn." in name else a[name]), name


def test_slerp_follows_the_great_circle_and_falls_back_to_linear_when_parallel():
    x = torch.zeros(2, 3, dtype=torch.float64)
    y = torch.zeros(2, 3, dtype=torch.float64)
    x[0, 0], y[1, 2] = 2.0, 2.0  # orthogonal, equal norms
    mid = merge_methods.slerp(x, y, 0.5)
    assert float(mid.norm()) == pytest.approx(2.0, rel=1e-15)  # stays on the sphere; lerp would give sqrt(2)
    assert torch.allclose(mid, (x + y) / math.sqrt(2), rtol=0, atol=1e-15)
    third = merge_methods.slerp(x, y, 1 / 3)  # angle pi/6 from x
    assert float(third[0, 0]) == pytest.approx(2 * math.cos(math.pi / 6)) and float(third[1, 2]) == pytest.approx(1.0)
    near = x * (1 + 1e-9)
    assert torch.equal(merge_methods.slerp(x, near, 0.25), 0.75 * x + 0.25 * near)


def test_ties_trim_and_election_on_a_small_vector():
    base = torch.zeros(6, dtype=torch.float64)
    a = torch.tensor([5.0, -1.0, 0.1, 2.0, 0.0, -4.0], dtype=torch.float64)
    b = torch.tensor([3.0, 2.0, -0.2, -3.0, 0.0, 1.0], dtype=torch.float64)
    # density 0.5 keeps the 3 largest magnitudes: a -> [5, 0, 0, 2, 0, -4], b -> [3, 2, 0, -3, 0, 0]
    out = merge_methods.ties([a, b], base, [1.0, 1.0], [0.5, 0.5])
    # signs: +, +, 0, - (2 - 3), 0, -: means of the agreeing entries
    assert out.tolist() == [4.0, 2.0, 0.0, -3.0, 0.0, -4.0]


# ------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------
def test_bad_merge_yaml_is_a_one_line_error(ckpts, tmp_path):
    a, b, base = str(ckpts["a"]), str(ckpts["b"]), str(ckpts["base"])
    out = str(tmp_path / "out")
    cases = [
        ({"out": out, "method": "average", "models": [a, b]}, "method 'average' is not supported"),
        ({"out": out, "method": "linear"}, "lists no `models:`"),
        ({"out": out, "method": "linear", "models": [a, str(tmp_path / "nowhere")]}, "is not a checkpoint folder"),
        ({"method": "linear", "models": [a, b]}, "has no `out:`"),
        ({"out": out, "method": "ties", "models": [a, b]}, "ties needs base_model"),
        ({"out": out, "method": "linear", "base_model": base, "models": [a, b]}, "linear takes no base_model"),
        ({"out": out, "method": "slerp", "models": [a, b, base]}, "exactly two checkpoints"),
        ({"out": out, "method": "linear", "models": [{"model": a, "weight": 1.0}, {"model": b, "weight": -1.0}]},
         "the weights sum to 0.0"),
        ({"out": out, "method": "ties", "base_model": base, "models": [{"model": a, "density": 1.5}]},
         "models[0].density must be in (0, 1]"),
        ({"out": out, "method": "slerp", "models": [a, b], "parameters": {"t": 2}}, "parameters.t must be in [0, 1]"),
        ({"out": out, "method": "linear", "models": [a, b], "paramters": {}}, "unknown key 'paramters'"),
        ({"out": out, "method": "linear", "models": [a, b], "filters": [{"match": "*", "weights": [1.0]}]},
         "filters[0].weights must list one weight per model (2)"),
        ({"out": a, "method": "linear", "models": [a, b]}, "is one of the merged checkpoints"),
    ]
    for doc, message in cases:
        one_line_error(merge(tmp_path, doc), message)
    (tmp_path / "broken.yaml").write_text("out: [unclosed\n")
    one_line_error(runner.invoke(app, ["merge", str(tmp_path / "broken.yaml")]), "is not valid YAML")
    one_line_error(runner.invoke(app, ["merge", str(tmp_path / "absent.yaml")]), "does not exist")
    assert not (tmp_path / "out").exists()


def test_mismatched_layouts_are_one_line_errors(ckpts, tmp_path):
    a = str(ckpts["a"])
    deeper = make_checkpoint(tmp_path / "deeper", vllm_config(num_layers=6), seed=3)
    wider = make_checkpoint(tmp_path / "wider", vllm_config(intermediate_size=96), seed=3)
    window = make_checkpoint(tmp_path / "window", vllm_config(swa_window=16), seed=3)
    no_kda = make_checkpoint(tmp_path / "no-kda", seed=3)
    sd = {k: v for k, v in tensors(no_kda).items() if not k.startswith("model.layers.2.mixers.kda.")}
    save_file(sd, str(no_kda / "model.safetensors"), metadata={"format": "pt"})
    cases = [(deeper, "has 6 layers but"), (wider, "tensor model.layers.0.mlp.down_proj.weight is [64, 96]"),
             (window, "config key swa_window is 16"), (no_kda, "layer 2 of")]
    for other, message in cases:
        one_line_error(merge(tmp_path, {"out": str(tmp_path / "out"), "method": "linear",
                                        "models": [a, str(other)]}), message)
    assert not (tmp_path / "out").exists()
