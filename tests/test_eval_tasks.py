"""`supernet eval-tasks` and the lm-eval adapter: exact batching, generation, one-line errors, and the
all-fa supernet scoring exactly as the HF teacher does through lm-eval's own HF model class."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("lm_eval")

from supernet.cli.main import app  # noqa: E402
from supernet.threads import torch_threads  # noqa: E402

runner = CliRunner()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Many tiny ops: on a shared 2-core machine one thread is several times faster than two."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    from supernet.training.tiny import tiny_teacher_dir

    out = tmp_path_factory.mktemp("tasks") / "ckpt"
    result = runner.invoke(app, ["convert", str(tiny_teacher_dir()), str(out), "--swa-window", "4"])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def tiny_lm(tiny_ckpt):
    from supernet.cli.model_cmds import load_checkpoint
    from supernet.measure.lm_eval_model import SupernetLM

    model, tok = load_checkpoint(str(tiny_ckpt))
    torch.manual_seed(0)
    with torch.no_grad():  # converted linear mixers start near-silent; perturb so placements differ
        for name, p in model.named_parameters():
            if ".mixers.gdn." in name or ".mixers.kda." in name:
                p.add_(torch.randn_like(p) * 0.05)
    return model, tok


def _req(*args):
    return SimpleNamespace(args=args)


def test_batched_right_padded_loglikelihoods_equal_one_at_a_time(tiny_lm):
    """Right padding without a mask is exact for every mixer (all are causal)."""
    from supernet.measure.lm_eval_model import SupernetLM

    model, tok = tiny_lm
    reqs = [_req("The cat sat on the", " mat"), _req("def f(x):\n    return", " x + 1"),
            _req("a", " b c d e f"), _req("Numbers: 1, 2, 3,", " 4")]
    for placement in ("all-fa", "fa,swa,gdn,kda"):
        batched = SupernetLM(model, tok, placement, batch_tokens=4096, progress=False).loglikelihood(reqs, True)
        single = SupernetLM(model, tok, placement, batch_tokens=1, progress=False).loglikelihood(reqs, True)
        for (a, ga), (b, gb) in zip(batched, single):
            assert a == pytest.approx(b, abs=1e-4) and ga == gb
    fa = SupernetLM(model, tok, "all-fa", progress=False).loglikelihood(reqs, True)
    gdn = SupernetLM(model, tok, "all-gdn", progress=False).loglikelihood(reqs, True)
    assert any(abs(a[0] - b[0]) > 1e-3 for a, b in zip(fa, gdn))  # the placement is really applied


def test_rolling_loglikelihood_scores_every_token_once(tiny_lm):
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    from supernet.measure.lm_eval_model import SupernetLM

    model, tok = tiny_lm
    p = "fa,swa,gdn,kda"
    text = "print('hello world') # a short document for the rolling log-likelihood"
    ids = tok.encode(text, add_special_tokens=False)

    def direct(context, target):  # log p(target | context) from one plain forward
        seq = torch.tensor([context + target])
        with torch.no_grad():
            logp = torch.log_softmax(model(seq[:, :-1], placement=p).logits[0].float(), -1)
        return float(logp[-len(target):].gather(1, torch.tensor(target)[:, None]).sum())

    whole_lm = SupernetLM(model, tok, p, max_length=512, progress=False)
    (whole,) = whole_lm.loglikelihood_rolling([_req(text)], True)
    assert whole == pytest.approx(direct([whole_lm.prefix_token_id], ids), abs=1e-3)
    lm = SupernetLM(model, tok, p, max_length=24, progress=False)  # several windows of 24 tokens
    (got,) = lm.loglikelihood_rolling([_req(text)], True)
    windows = [make_disjoint_window(w) for w in get_rolling_token_windows(ids, lm.prefix_token_id, 24, 1)]
    assert len(windows) > 1 and sum(len(t) for _, t in windows) == len(ids)
    assert got == pytest.approx(sum(direct(c, t) for c, t in windows), abs=1e-3)


def test_generate_until_is_greedy_decoding_cut_at_the_stop_string(tiny_lm):
    from supernet.measure.lm_eval_model import SupernetLM
    from supernet.generation import greedy_tokens

    model, tok = tiny_lm
    lm = SupernetLM(model, tok, "fa,swa,gdn,kda", progress=False)
    prompt = "def add(a, b):\n"
    (text,) = lm.generate_until([_req(prompt, {"until": [], "max_gen_toks": 12})], True)
    ids = torch.tensor([tok.encode(prompt, add_special_tokens=False)])
    ref = tok.decode(greedy_tokens(model, ids, "fa,swa,gdn,kda", 12))
    assert text == ref.split(tok.decode([tok.eos_token_id]))[0]
    stop = text[3:5] if len(text) >= 5 else text[-1:]
    (cut,) = lm.generate_until([_req(prompt, {"until": [stop], "max_gen_toks": 12})], True)
    assert cut == text[:text.index(stop)]


def _local_tasks(folder):
    """A multiple-choice and a generation task in lm-eval YAML over local jsonl."""
    folder.mkdir(parents=True, exist_ok=True)
    mc = folder / "mc.jsonl"
    mc.write_text("".join(json.dumps({"q": f"{a} plus {a} is", "choices": [str(2 * a), str(2 * a + 1), "x"],
                                      "label": 0}) + "\n" for a in range(5)))
    gen = folder / "gen.jsonl"
    gen.write_text("".join(json.dumps({"q": f"count: {a} {a + 1}", "a": f" {a + 2}"}) + "\n" for a in range(3)))
    (folder / "mc.yaml").write_text(
        f"task: local_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {mc}\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{label}}'\n"
        "metric_list:\n  - metric: acc\n")
    (folder / "gen.yaml").write_text(
        f"task: local_gen\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {gen}\ntest_split: test\n"
        "output_type: generate_until\ndoc_to_text: '{{q}}'\ndoc_to_target: '{{a}}'\n"
        "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 4\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")
    return folder


def test_eval_tasks_cli_writes_lm_eval_results(tiny_ckpt, tmp_path):
    folder = _local_tasks(tmp_path / "yaml")
    out = tmp_path / "results.json"
    res = runner.invoke(app, ["eval-tasks", str(tiny_ckpt), "--placement", "fa,swa,gdn,kda", "--tasks",
                              "local_mc,local_gen", "--include-path", str(folder), "--limit", "3", "--out", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert set(data["results"]) >= {"local_mc", "local_gen"}
    assert 0.0 <= data["results"]["local_mc"]["acc,none"] <= 1.0
    assert "exact_match,none" in data["results"]["local_gen"]
    assert data["n-samples"]["local_mc"]["effective"] == 3
    assert data["supernet"]["placement"] == ["fa", "swa", "gdn", "kda"]


@pytest.mark.parametrize("args,fragment", [
    (["--preset", "all-fa", "--tasks", "no_such_task"], "unknown task 'no_such_task'"),
    (["--preset", "nope", "--tasks", "dev"], "nope"),
    (["--tasks", "dev"], "exactly one of --preset NAME or --placement P"),
    (["--preset", "all-fa", "--tasks", "dev", "--limit", "0"], "--limit must be >= 1"),
])
def test_eval_tasks_bad_input_is_one_line_error(tiny_ckpt, args, fragment):
    res = runner.invoke(app, ["eval-tasks", str(tiny_ckpt), *args])
    assert res.exit_code == 2, res.output
    lines = [line for line in res.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and fragment in lines[0], res.stderr


@pytest.mark.teacher
def test_all_fa_supernet_scores_as_the_hf_teacher_through_lm_eval(smollm2_dir, smollm2_supernet_dir):
    """Same tasks, same lm-eval: the teacher through lm-eval's own HFLM (loading the local folder
    offline), the converted supernet (all-fa) through our adapter; accuracies equal, log-likelihoods
    equal to float32 rounding."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lm_eval.models.huggingface import HFLM

    from supernet.measure.lm_eval_model import SupernetLM
    from supernet.measure.tasks import run_tasks
    from supernet.model import SupernetForCausalLM
    from transformers import AutoTokenizer

    ckpt = smollm2_supernet_dir
    ours = SupernetLM(SupernetForCausalLM.from_pretrained(ckpt).eval(), AutoTokenizer.from_pretrained(ckpt),
                      "all-fa", progress=False)
    hf = HFLM(pretrained=str(smollm2_dir), device="cpu", dtype="float32", batch_size=4)
    names = ["bb_general_knowledge", "ruler_niah_512"]  # a retrieval prompt as long as the CPU affords here
    a = run_tasks(ours, names, limit=2, log_samples=True)
    b = run_tasks(hf, names, limit=2, log_samples=True)
    for n in names:
        assert a["results"][n]["acc,none"] == b["results"][n]["acc,none"], n
        la = [r[0][0] for s in a["samples"][n] for r in s["resps"]]
        lb = [r[0][0] for s in b["samples"][n] for r in s["resps"]]
        assert len(la) == len(lb) > 0
        assert max(abs(x - y) for x, y in zip(la, lb)) <= 1e-3 * max(1.0, max(abs(y) for y in lb))


def test_eval_placements_records_retrieval_and_dev_task_scores(tiny_ckpt, tmp_path):
    from tests.conftest import DATA_DIR

    out = tmp_path / "evaluations.jsonl"
    args = ["eval-placements", str(tiny_ckpt), "--data", str(DATA_DIR / "pydocs-eval.jsonl"), "--out", str(out),
            "--n", "3", "--seq-len", "16", "--sequences", "2", "--top-k", "8", "--active-fraction", "0",
            "--retrieval", "ruler_niah_2k,ruler_vartrack_2k", "--dev-tasks", "bb_general_knowledge",
            "--task-limit", "2"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3
    for r in rows:
        assert 0.0 <= r["retrieval"] <= 1.0 and 0.0 <= r["dev_tasks"] <= 1.0
        assert set(r["task_scores"]) == {"ruler_niah_2k", "ruler_vartrack_2k", "bb_general_knowledge"}
        assert r["retrieval"] == pytest.approx((r["task_scores"]["ruler_niah_2k"]
                                                + r["task_scores"]["ruler_vartrack_2k"]) / 2)
    held = runner.invoke(app, [*args[:-6], "--dev-tasks", "heldout", "--n", "4"])
    assert held.exit_code == 2 and "held-out tasks (only reported)" in held.stderr


def test_eval_placements_task_set_names_the_tasks(tiny_ckpt, tmp_path):
    """`--task-set demo` scores the set's retrieval tasks (task_sets.py) on its per-placement documents."""
    from supernet.measure.task_sets import task_set
    from tests.conftest import DATA_DIR

    out = tmp_path / "evaluations.jsonl"
    args = ["eval-placements", str(tiny_ckpt), "--data", str(DATA_DIR / "pydocs-eval.jsonl"), "--out", str(out),
            "--n", "2", "--seq-len", "16", "--sequences", "2", "--top-k", "8", "--active-fraction", "0"]
    res = runner.invoke(app, [*args, "--task-set", "demo"])
    assert res.exit_code == 0, res.output
    demo = task_set("demo")
    for r in (json.loads(line) for line in out.read_text().splitlines()):
        assert set(r["task_scores"]) == set(demo.retrieval_tasks())  # the demo set optimises on retrieval only
        assert "dev_tasks" not in r and r["retrieval"] == pytest.approx(sum(r["task_scores"].values()) / 4)
        assert f"limit={demo.placement_limit}" in r["tasks_spec"]
    both = runner.invoke(app, [*args, "--task-set", "demo", "--retrieval", "retrieval_2k"])
    assert both.exit_code == 2 and "give --task-set or --retrieval/--dev-tasks, not both" in both.stderr
    unknown = runner.invoke(app, [*args, "--task-set", "nope"])
    assert unknown.exit_code == 2 and "unknown task set 'nope'" in unknown.stderr
