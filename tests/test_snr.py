"""`supernet snr` (Spectrum's signal-to-noise ratio) and `train.trainable: FILE`.

- The noise estimate against the Marchenko-Pastur law on planted matrices, with a tolerance from the
  law's finite-size behaviour (below).
- The selection freezes exactly what it lists, seen through the gradients of real training steps
  (distillation and SFT).
- On the real SmolLM2 converted supernet, two scans are identical.
- Bad input is a one-line error.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import pytest
import torch
import yaml
from typer.testing import CliRunner

from supernet.cli.main import app
from supernet.layout import Placement
from supernet.snr import matrix_snr, module_type, read_selection, scan, singular_values, spectrum_snr, type_selected

runner = CliRunner()


# ------------------------------------------------------------------------------------------------
# the Marchenko-Pastur noise estimate on planted matrices
# ------------------------------------------------------------------------------------------------
def mp_singular_value_law(beta: float):
    """Density of the singular values of an m x n noise matrix with entries N(0, 1/n), n -> inf at
    m/n = beta <= 1: x = sqrt(lambda), lambda Marchenko-Pastur on [(1-sqrt b)^2, (1+sqrt b)^2]."""
    lo, hi = (1 - math.sqrt(beta)) ** 2, (1 + math.sqrt(beta)) ** 2

    def density(x: float) -> float:
        lam = x * x
        return 2 * x * math.sqrt(max((hi - lam) * (lam - lo), 0.0)) / (2 * math.pi * beta * lam)

    return density, math.sqrt(lo), math.sqrt(hi)


@functools.lru_cache(maxsize=None)
def mp_theory(beta: float) -> dict[str, float]:
    """Spectrum's sigma, tau, SNR and score of pure noise in the n -> inf limit (units of s * sqrt(n)),
    and what the tolerance needs: the density at tau and the signal and noise masses."""
    from scipy import integrate, optimize

    f, a, b = mp_singular_value_law(beta)
    cdf = lambda q: integrate.quad(f, a, q, limit=200)[0]  # noqa: E731
    q25 = optimize.brentq(lambda q: cdf(q) - 0.25, a, b)
    q75 = optimize.brentq(lambda q: cdf(q) - 0.75, a, b)
    sigma = (q75 - q25) / 1.349
    tau = sigma * (1 + math.sqrt(beta))
    signal = integrate.quad(lambda x: x * f(x), tau, b, limit=200)[0]
    noise = integrate.quad(lambda x: x * f(x), a, tau, limit=200)[0]
    return {"sigma": sigma, "tau": tau, "snr": signal / noise, "score": signal / noise / b, "f_tau": f(tau),
            "signal": signal, "noise": noise, "edge": b}


# Finite-size behaviour, the tolerance's source. Bulk eigenvalues of an MP matrix sit within ~log(k)/k of
# their classical locations (rigidity), so the empirical quartiles, hence sigma and tau, carry a relative
# error of about log(k)/k. A shift d(tau) moves tau*f(tau)*d(tau) of singular-value mass between signal
# and noise, so |dSNR|/SNR <= tau^2 f(tau) (1/signal + 1/noise) * |dtau|/tau. The top singular value
# (the score's denominator) has Tracy-Widom fluctuations of relative size
# (sqrt n + sqrt m)^(-4/3) (1/sqrt n + 1/sqrt m)^(1/3) / 2 per unit of the TW1 variable. RIGIDITY_K
# and TW_BOUND are the multiples allowed: 4 times the rigidity scale, and |TW1| <= 5 (its tails beyond
# are below 1e-4).
RIGIDITY_K = 4.0
TW_BOUND = 5.0


def tolerances(m: int, n: int, th: dict[str, float]) -> tuple[float, float, float]:
    k = min(m, n)
    rigid = RIGIDITY_K * math.log(k) / k
    snr_tol = th["tau"] ** 2 * th["f_tau"] * (1 / th["signal"] + 1 / th["noise"]) * rigid
    tw = 0.5 * (math.sqrt(n) + math.sqrt(m)) ** (-4 / 3) * (1 / math.sqrt(n) + 1 / math.sqrt(m)) ** (1 / 3)
    return rigid, snr_tol, snr_tol + TW_BOUND * tw


@pytest.mark.parametrize("m,n", [(400, 400), (300, 900)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pure_noise_matches_the_marchenko_pastur_limit(m, n, seed):
    th = mp_theory(m / n)
    rigid, snr_tol, score_tol = tolerances(m, n, th)
    scale = 0.02  # any entry scale: sigma and tau scale with it, the SNR does not
    w = scale * torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    r = matrix_snr("model.layers.0.mixers.fa.q_proj.weight", w)
    unit = scale * math.sqrt(n)  # singular values of the noise are unit * (the law's x)
    assert abs(r.sigma / (unit * th["sigma"]) - 1) <= rigid
    assert abs(r.threshold / (unit * th["tau"]) - 1) <= rigid
    assert abs(r.snr / th["snr"] - 1) <= snr_tol, (r.snr, th["snr"], snr_tol)
    assert abs(r.score * unit / th["score"] - 1) <= score_tol, (r.score * unit, th["score"], score_tol)


def test_low_rank_signal_plus_noise_has_a_high_snr():
    m = n = 400
    th = mp_theory(1.0)
    _, snr_tol, _ = tolerances(m, n, th)
    gen = torch.Generator().manual_seed(7)
    noise = torch.randn(m, n, generator=gen, dtype=torch.float64) / math.sqrt(n)
    rank, theta = 40, 6.0  # far above the BBP threshold beta^(1/4) = 1: every spike leaves the bulk
    u, _ = torch.linalg.qr(torch.randn(m, rank, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, rank, generator=gen, dtype=torch.float64))
    r = matrix_snr("w", noise + theta * u @ v.T)
    assert r.signal_count >= rank
    assert r.snr > (1 + 3 * snr_tol) * th["snr"], (r.snr, th["snr"])
    # the spikes sit where the spiked model puts them, sqrt((1 + theta^2)(beta + theta^2)) / theta, on
    # average (40 equal spikes split around it by ~1/sqrt(rank))
    top = singular_values(noise + theta * u @ v.T)[:rank]
    assert float(top.mean()) == pytest.approx(math.sqrt((1 + theta ** 2) ** 2) / theta, rel=0.02)


def test_singular_values_from_the_gram_matrix_equal_the_svd():
    w = torch.randn(300, 120, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for x in (w, w.T):
        s = singular_values(x)
        ref = torch.linalg.svdvals(x)
        # eigenvalue error ~ k * eps * s_1^2, so s_i is off by ~ k * eps * s_1^2 / s_i
        bound = 120 * torch.finfo(torch.float64).eps * ref[0] ** 2 / ref
        assert torch.all((s - ref).abs() <= bound)
    sigma, tau, count, snr, score = spectrum_snr(torch.tensor([3.0, 2.0, 1.0, 1.0, 1.0], dtype=torch.float64), 5, 5)
    assert count == 2 and snr == pytest.approx(5 / 3) and score == pytest.approx(5 / 9)


def test_module_types_and_groups():
    assert module_type("model.layers.12.mixers.gdn.q_proj.weight") == "gdn.q_proj"
    assert module_type("model.layers.0.mlp.down_proj.weight") == "mlp.down_proj"
    assert module_type("model.layers.0.self_attn.q_proj.weight") == "self_attn.q_proj"  # a plain HF teacher
    assert module_type("model.embed_tokens.weight") == "embed_tokens"
    assert type_selected("gdn.q_proj", ["mixers"]) and not type_selected("mlp.up_proj", ["mixers"])
    assert type_selected("mlp.up_proj", ["shared"]) and type_selected("fa.k_proj", ["fa.k_proj", "mlp"])
    assert not type_selected("swa.k_proj", ["fa"])


# ------------------------------------------------------------------------------------------------
# train.trainable: FILE freezes exactly what it lists
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from supernet.training.tiny import TinyWorld

    return TinyWorld(tmp_path_factory.mktemp("snr-world"))


def _selection(world, tmp_path, *args) -> tuple:
    out = tmp_path / "spectrum.yaml"
    r = runner.invoke(app, ["snr", str(world.student_dir), "--out", str(out), *args])
    assert r.exit_code == 0, r.output
    return out, read_selection(out)


def _steps(trainer, placement: str, n: int) -> tuple[set[str], set[str]]:
    """(parameters with a non-zero gradient at an optimizer step, parameters the steps changed)."""
    student = trainer.student
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    with_grad: set[str] = set()
    step = trainer.optimizer.step

    def spy(*args, **kwargs):
        with_grad.update(n for n, p in student.named_parameters() if p.grad is not None and bool(p.grad.any()))
        return step(*args, **kwargs)

    trainer.optimizer.step = spy
    for _ in range(n):
        trainer.train_step(Placement.parse(placement, trainer.num_layers))
    changed = {n for n, p in student.named_parameters() if not torch.equal(p.detach(), before[n])}
    return with_grad, changed


@pytest.mark.parametrize("stage", ["distill", "sft"])
def test_the_selection_freezes_exactly_what_it_lists(world, tmp_path, stage):
    from supernet.training.trainer import Trainer

    path, listed = _selection(world, tmp_path, "--top-percent", "50", "--only", "gdn,mlp")
    assert listed and all(".mixers.gdn." in n or ".mlp." in n for n in listed)
    sections = {"train": {"trainable": str(path), "max_steps": 1, "warmup_steps": 0}}
    if stage == "sft":
        sections.update(stage="sft", data={"train": [str(world.chat)], "eval": [], "format": "chat"},
                        loss={"kl_weight": 0.0, "ce_weight": 1.0})
    trainer = Trainer(world.config(tmp_path / stage, **sections))
    assert set(trainer.trainable_names) == set(listed)
    assert {n for n, p in trainer.student.named_parameters() if p.requires_grad} == set(listed)
    # all-gdn runs every listed parameter, but a converted GDN starts silent: g_proj = 0 closes its output
    # gate, so in step 1 only g_proj (and the MLPs) get a gradient. Once a trainable g_proj has moved, the
    # rest of its layer's GDN does; a layer whose g_proj is frozen stays silent and gets no gradient.
    with_grad, changed = _steps(trainer, "all-gdn", 1)
    assert with_grad == changed and with_grad <= set(listed)
    assert {n for n in with_grad if ".gdn." in n} == {n for n in listed if n.endswith("gdn.g_proj.weight")}
    with_grad, changed = _steps(trainer, "all-gdn", 2)

    def gate_trains(name: str) -> bool:
        layer = name.split(".mixers.")[0]
        return f"{layer}.mixers.gdn.g_proj.weight" in listed

    active = {n for n in listed if ".gdn." not in n or gate_trains(n)}
    assert len([n for n in active if ".gdn." in n and "g_proj" not in n]) >= 3  # the test has teeth
    assert with_grad == active
    assert changed == active  # and nothing outside the file moved


def test_transfer_trains_a_mixer_selection_and_refuses_shared_parameters(world, tmp_path):
    from supernet.training.config import ConfigError
    from supernet.training.trainer import Trainer

    both, _ = _selection(world, tmp_path, "--top-percent", "50", "--only", "gdn,mlp")
    with pytest.raises(ConfigError, match="unfreezes shared parameter model.layers.*mlp"):
        Trainer(world.config(tmp_path / "t1", stage="transfer", train={"trainable": str(both)},
                             transfer={"mixers": ["gdn", "kda"]}))
    gdn, listed = _selection(world, tmp_path / "gdn", "--top-percent", "50", "--only", "gdn")
    t = Trainer(world.config(tmp_path / "t2", stage="transfer", train={"trainable": str(gdn)},
                             transfer={"mixers": ["gdn", "kda"]}))
    assert set(t.trainable_names) == set(listed)
    # transfer trains the (layer, mixer) pairs that have a listed parameter, and only those
    assert set(t.pair.pairs) == {(int(n.split(".")[2]), "gdn") for n in listed}


def test_a_tied_alias_names_the_shared_embedding(tiny_model, tmp_path):
    from supernet.training.models import set_trainable

    assert tiny_model.config.tie_word_embeddings
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"trainable": ["lm_head.weight", "model.layers.1.mixers.kda.q_proj.weight"]}))
    names = set_trainable(tiny_model, str(path), ["fa", "swa", "gdn", "kda"])
    assert names == ["model.embed_tokens.weight", "model.layers.1.mixers.kda.q_proj.weight"]
    assert tiny_model.lm_head.weight.requires_grad  # the same tensor
    from supernet.training.config import ConfigError

    with pytest.raises(ConfigError, match="its mixer is not in train.train_mixers"):
        set_trainable(tiny_model, str(path), ["gdn"])


def test_relative_selection_path_is_relative_to_the_config_file(world, tmp_path):
    from supernet.training.config import ConfigError, load_config

    sub = tmp_path / "configs"
    sub.mkdir()
    _, listed = _selection(world, sub, "--top-percent", "10")
    cfg = world.config(tmp_path / "run", train={"max_steps": 1}).to_dict()
    cfg["train"]["trainable"] = "spectrum.yaml"
    (sub / "run.yaml").write_text(yaml.safe_dump(cfg))
    loaded = load_config(sub / "run.yaml")
    assert loaded.train.trainable == str(sub / "spectrum.yaml")
    cfg["train"]["trainable"] = "missing.yaml"
    (sub / "bad.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match="neither mixers, all nor an existing selection file"):
        load_config(sub / "bad.yaml")


def test_bad_selections_and_percentages_are_one_line_errors(world, tmp_path):
    for bad in ("0", "150", "nan", "-5"):
        r = runner.invoke(app, ["snr", str(world.student_dir), "--top-percent", bad, "--out", str(tmp_path / "x.yaml")])
        assert r.exit_code == 2 and "--top-percent must be in (0, 100]" in r.output, r.output
    r = runner.invoke(app, ["snr", str(tmp_path / "nowhere"), "--top-percent", "10"])
    assert r.exit_code == 2 and "is not a folder" in r.output
    r = runner.invoke(app, ["snr", str(world.student_dir), "--top-percent", "10", "--only", "nosuch"])
    assert r.exit_code == 2 and "no weight matrix" in r.output

    cfg = world.config(tmp_path / "run", train={"max_steps": 1}).to_dict()
    cases = {"unknown.yaml": ({"trainable": ["model.layers.0.mixers.gdn.q_proj.weight", "model.nosuch.weight"]},
                              "does not have, e.g. 'model.nosuch.weight'"),
             "empty.yaml": ({"trainable": []}, "lists no parameter under `trainable`"),
             "shape.yaml": ({"unfrozen_parameters": ["x"]}, "has no `trainable:` list")}
    for name, (doc, message) in cases.items():
        (tmp_path / name).write_text(yaml.safe_dump(doc))
        cfg["train"]["trainable"] = str(tmp_path / name)
        (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
        r = runner.invoke(app, ["distill", str(tmp_path / "cfg.yaml")])
        errors = [line for line in r.output.splitlines() if line.startswith("error:")]
        assert r.exit_code == 2 and len(errors) == 1 and message in errors[0], (name, r.output)
        assert "Traceback" not in r.output


# ------------------------------------------------------------------------------------------------
# the real SmolLM2
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2_supernet(smollm2_supernet_dir):
    return smollm2_supernet_dir


@pytest.mark.teacher
@pytest.mark.slow
def test_snr_of_the_real_smollm2_supernet_is_deterministic(smollm2_supernet, smollm2_dir):
    first, names = scan(smollm2_supernet, progress=False)
    again = ["gdn", "mlp.down_proj", "embed_tokens"]  # a second scan of some types: every float identical
    second, _ = scan(smollm2_supernet, only=again, progress=False)
    assert second == [r for r in first if type_selected(r.module_type, again)] and len(second) > 60
    assert len(first) == sum(1 for n in names if n.endswith("proj.weight") or n.endswith("embed_tokens.weight"))
    by_name = {r.name: r for r in first}
    # fa, swa and gdn's q_proj start as copies of the teacher's q_proj: the same matrix scores the same
    for i in (0, 17, 29):
        q = [by_name[f"model.layers.{i}.mixers.{m}.q_proj.weight"].score for m in ("fa", "swa", "gdn")]
        assert q[0] == q[1] == q[2]
    # the plain HF teacher scans too; the converted fa mixers hold its attention weights unchanged
    teacher, _ = scan(smollm2_dir, only=["self_attn", "mlp.down_proj", "embed_tokens"], progress=False)
    hf = {r.name: r for r in teacher}
    assert {r.module_type for r in teacher} >= {"self_attn.q_proj", "mlp.down_proj", "embed_tokens"}
    for i in (0, 29):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert hf[f"model.layers.{i}.self_attn.{proj}.weight"] == \
                dataclasses.replace(by_name[f"model.layers.{i}.mixers.fa.{proj}.weight"],
                                    name=f"model.layers.{i}.self_attn.{proj}.weight", module_type=f"self_attn.{proj}")

    from supernet.snr import selection_document

    doc = selection_document(smollm2_supernet, [r for r in first if r.module_type.split(".")[0] in ("fa", "mlp")],
                             names, 10, ["fa", "mlp"])
    assert len(doc["trainable"]) == 7 * 3  # 4 fa + 3 mlp types, ceil(10% of 30) = 3 layers each
    for mtype, rows in doc["scores"].items():
        scores = [row["score"] for row in rows]
        assert scores == sorted(scores, reverse=True) and sum(row["selected"] for row in rows) == 3
