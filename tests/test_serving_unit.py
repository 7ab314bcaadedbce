"""Serving pieces that need no vLLM server: plans, the speculative reference engine, the CLI checks."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from supernet.serving.plan import serving_plan
from supernet.generation import greedy_tokens, speculative_tokens
from supernet.threads import torch_threads
from tests.helpers.checkpoints import default_presets, make_checkpoint
from tests.helpers.configs import vllm_config
from supernet.layout import PlacementError


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls: one thread avoids OpenMP barrier stalls when the CPU is shared."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("tiny"), vllm_config(), seed=1)


@pytest.fixture(scope="module")
def model(ckpt):
    from supernet.model import SupernetForCausalLM

    return SupernetForCausalLM.from_pretrained(str(ckpt)).eval()


def _config(**keys):
    config = vllm_config()
    config.presets = default_presets(4)
    for k, v in keys.items():
        setattr(config, k, v)
    return config


def test_plan_one_preset_instantiates_only_its_mixers():
    plan = serving_plan(_config(preset="balanced"))
    assert list(plan.placements) == ["balanced"]
    assert plan.layer_mixers == (("fa",), ("swa",), ("gdn",), ("kda",))
    assert plan.layer_types() == ["full_attention", "full_attention", "linear_attention", "linear_attention"]
    assert serving_plan(_config(preset="all-fa")).layer_types() == ["full_attention"] * 4


def test_plan_switchable_holds_union_per_layer():
    plan = serving_plan(_config(switchable=True))
    assert plan.default_name == "default"
    assert set(plan.placements) == {"default", *default_presets(4)}
    assert plan.layer_mixers[0] == ("fa", "gdn")
    assert plan.layer_mixers[1] == ("fa", "swa", "gdn", "kda")
    assert plan.resolve(None) == "default" and plan.resolve("fast") == "fast"
    with pytest.raises(PlacementError, match="unknown preset 'nope'; this server serves: default"):
        plan.resolve("nope")


def test_plan_draft_only_mixers():
    plan = serving_plan(_config(preset="balanced", draft_preset="linear"))
    # balanced = fa,swa,gdn,kda; linear = gdn,kda,gdn,kda -> layers 0 and 1 need draft-only mixers
    assert plan.draft_only == (("gdn",), ("kda",), (), ())
    with pytest.raises(PlacementError, match="draft preset 'bogus' is neither a preset"):
        serving_plan(_config(preset="balanced", draft_preset="bogus"))
    with pytest.raises(PlacementError, match="unknown preset 'nope'"):
        serving_plan(_config(preset="nope"))


@pytest.mark.parametrize("target,draft,k", [
    ("balanced", "linear", 2), ("all-fa", "fast", 4), ("linear", "fast", 5),
])
def test_speculative_equals_target_greedy(model, target, draft, k):
    prompt = torch.tensor([[0] + list(b"The supernet drafts with a fast preset")])
    expected = greedy_tokens(model, prompt, target, 24)
    tokens, stats = speculative_tokens(model, prompt, draft, target, k=k, max_new_tokens=24)
    assert tokens == expected
    assert stats.drafted >= stats.accepted >= 0 and stats.rounds > 0


def test_speculative_exercises_partial_acceptance(model):
    """balanced vs near differ only in the SWA layer: some drafts pass, some fail (both paths run)."""
    prompt = torch.tensor([[0] + list(b"Sliding windows forget; full attention remembers everything")])
    tokens, stats = speculative_tokens(model, prompt, "near", "balanced", k=3, max_new_tokens=32)
    assert tokens == greedy_tokens(model, prompt, "balanced", 32)
    assert 0 < stats.accepted < stats.drafted


def test_speculative_stops_at_eos(model):
    prompt = torch.tensor([[0] + list(b"abc")])
    free = greedy_tokens(model, prompt, "balanced", 30)
    eos = free[5]
    tokens, _ = speculative_tokens(model, prompt, "near", "balanced", k=3, max_new_tokens=30, eos_token_id=eos)
    assert tokens == free[: free.index(eos) + 1]


def _supernet(*args):
    return subprocess.run([sys.executable, "-m", "supernet.cli.main", *args], capture_output=True, text=True)


def test_cli_serve_checks_before_starting_vllm(ckpt, tmp_path):
    from supernet.cli.errors import UserError
    from supernet.cli.serving_cmds import _prepare

    with pytest.raises(UserError, match="no config.json"):
        _prepare(tmp_path / "missing", None, False, None, 4, "supernet", "127.0.0.1", 8000, [])
    with pytest.raises(UserError, match="drop --switchable"):
        _prepare(ckpt, None, True, "fast", 4, "supernet", "127.0.0.1", 8000, [])
    cmd, _env = _prepare(ckpt, None, True, None, 4, "m", "127.0.0.1", 8000, [])
    names = cmd[cmd.index("--served-model-name") + 1 : cmd.index("--hf-overrides")]
    assert "--enforce-eager" in cmd  # switchable: eager; one preset: compiled (below)
    assert names[:2] == ["m", "m:default"]
    assert sorted(names[2:]) == ["m:all-fa", "m:balanced", "m:fast", "m:linear", "m:near"]
    bad = _supernet("serve", str(ckpt), "--preset", "nope")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1] == "error: unknown preset 'nope'; this checkpoint has: all-fa, balanced, fast, linear, near"
    assert "Traceback" not in bad.stderr
    dry = _supernet("serve", str(ckpt), "--preset", "fast", "--draft-preset", "linear", "--dry-run", "--max-model-len", "512")
    assert dry.returncode == 0, dry.stderr
    line = dry.stderr.strip().splitlines()[-1]
    assert "vllm.entrypoints.openai.api_server" in line and "--max-model-len 512" in line
    assert '"preset": "fast"' in line and '"draft_preset": "linear"' in line and "supernet.serving.drafter.SupernetDrafter" in line
    assert "supernet:fast" in line and "--enforce-eager" not in line


def test_cli_serve_checks_tensor_parallel_size(ckpt):
    """GDN/KDA heads that do not split over the ranks are refused before vLLM starts; a split
    that works gets each CPU worker its own cores (vLLM's auto binding wants a NUMA node each)."""
    from supernet.cli.serving_cmds import _prepare

    with pytest.raises(ValueError, match=r"^gdn: 2 q/k heads do not split over tensor-parallel size 4; use a --tensor-parallel-size that divides 2$"):
        _prepare(ckpt, "balanced", False, None, 4, "m", "127.0.0.1", 8000, ["--tensor-parallel-size", "4"])
    # a preset whose GDN/KDA heads split: each CPU worker gets its share of the cores
    cmd, env = _prepare(ckpt, "balanced", False, None, 4, "m", "127.0.0.1", 8000, ["--tensor-parallel-size=2"])
    assert "--tensor-parallel-size=2" in cmd
    if not torch.cuda.is_available() and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
        assert len(env["VLLM_CPU_OMP_THREADS_BIND"].split("|")) == 2
    bad = _supernet("serve", str(ckpt), "--preset", "balanced", "-tp", "4", "--dry-run")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith("error: gdn: 2 q/k heads do not split")


def test_cpu_thread_binding_splits_the_cores():
    from supernet.serving.server import cpu_thread_binding

    assert cpu_thread_binding(2, [0, 1]) == "0|1"
    assert cpu_thread_binding(2, [4, 5, 6, 7, 8]) == "4,5,6|7,8"
    assert cpu_thread_binding(1, [0, 1]) == "0,1"
    with pytest.raises(ValueError, match="--tensor-parallel-size 3 needs at least as many CPU cores; this process may use 2"):
        cpu_thread_binding(3, [0, 1])


def test_step_route_gathers_each_mixers_tokens_once_per_step(monkeypatch):
    """Switchable routing: rows -> presets from the logits-processor side, tokens from
    query_start_loc; a mixer every request uses runs over all tokens (None), others over theirs."""
    from types import SimpleNamespace

    from supernet.serving import routing

    plan = serving_plan(_config(switchable=True))
    router = routing.Router(plan)
    # rows: 0 all-fa (1 token), 1 linear (3 tokens), 2 all-fa (2 tokens), 3 empty (padding)
    monkeypatch.setattr(routing, "_ACTIVE_ROUTER", SimpleNamespace(row_presets={0: "all-fa", 1: "linear", 2: "all-fa"}))
    meta = SimpleNamespace(query_start_loc=torch.tensor([0, 1, 4, 6, 6], dtype=torch.int32))
    route = router.route(SimpleNamespace(attn_metadata={"layer": meta}), num_tokens=8, device=torch.device("cpu"))
    # linear = gdn, kda, gdn, kda; all-fa = fa everywhere: every layer splits the step in two
    for layer in range(4):
        plan_ = dict(route.layer_plan(layer))
        assert set(plan_) == {"fa", "gdn" if layer % 2 == 0 else "kda"}
        assert plan_["fa"].tokens.tolist() == [0, 4, 5]  # padding tokens (6, 7) run nothing: vLLM drops them
        assert plan_["fa"].rows.tolist() == [True, False, True, False]
        linear = plan_["gdn" if layer % 2 == 0 else "kda"]
        assert linear.tokens.tolist() == [1, 2, 3] and linear.rows.tolist() == [False, True, False, False]
    assert route.layer_plan(0)[0][1] is route.layer_plan(3)[0][1]  # one gather per pattern, not per layer
    # a step of one preset: no gathers at all
    monkeypatch.setattr(routing, "_ACTIVE_ROUTER", SimpleNamespace(row_presets={0: "linear", 1: "linear", 2: "linear"}))
    route = router.route(SimpleNamespace(attn_metadata={"layer": meta}), num_tokens=6, device=torch.device("cpu"))
    assert all(route.layer_plan(i) == [("gdn" if i % 2 == 0 else "kda", None)] for i in range(4))


# -- the vLLM drafter's bookkeeping (no server: its pool and which cache continues a row) ----------
def _pool_template():
    from supernet.cache import SupernetCache

    cache = SupernetCache(2)
    cache.states[0]["swa"] = {"k": torch.randn(1, 2, 5, 3), "slot_pos": torch.arange(5)[None], "len": 3}
    cache.states[1]["gdn"] = {"recurrent": torch.randn(1, 2, 4, 4), "hist_recurrent": torch.randn(1, 3, 2, 4, 4)}
    return cache


@pytest.mark.parametrize("slots", [[1, 2, 3], [4, 0, 2]])  # consecutive slots are views, others gathered
def test_draft_pool_rows_round_trip(slots):
    from supernet.serving.drafter import DraftPool

    pool = DraftPool(_pool_template(), size=6)
    assert pool.tensors[(0, "swa", "k")].shape == (6, 2, 5, 3) and pool.scalars[(0, "swa")] == {"len": 3}
    assert pool.nbytes == sum(t.numel() * 4 for t in pool.tensors.values()) + 6 * 5 * 4  # slot_pos is int64
    for slot in range(6):
        pool.reset(slot)
    assert bool((pool.tensors[(0, "swa", "slot_pos")] == -1).all())  # an empty SWA ring
    one = _pool_template()
    pool.store(slots[1], one)
    cache, index = pool.rows(slots)
    assert (index is None) == (slots == [1, 2, 3])
    torch.testing.assert_close(cache.states[0]["swa"]["k"][1], one.states[0]["swa"]["k"][0])
    cache.states[0]["swa"]["k"][0].fill_(7.0)  # changed in place
    cache.states[1]["gdn"]["recurrent"] = torch.full((3, 2, 4, 4), 5.0)  # replaced, as a step does
    pool.write_back(cache, slots, index)
    assert bool((pool.tensors[(0, "swa", "k")][slots[0]] == 7).all())
    assert bool((pool.tensors[(1, "gdn", "recurrent")][slots] == 5).all())
    others = [s for s in range(6) if s not in slots]
    assert bool((pool.tensors[(1, "gdn", "recurrent")][others] == 0).all())  # other slots untouched


def test_drafter_finds_the_cache_that_continues_a_row():
    import numpy as np

    from supernet.serving.drafter import SupernetDrafter, _Record

    drafter = object.__new__(SupernetDrafter)  # the matching logic only: no vLLM model
    drafter.k, drafter.history_slots = 3, 5
    committed = np.arange(10, 20)  # 10 tokens; last round read 8 of them, then fed 18, 19 and drafts 7, 8
    fed = np.concatenate([committed, [7, 8]])

    def slot_of(history, free=None):
        free = {0: _Record(slot=4, fed=fed, base=8)} if free is None else free
        found = drafter._assign([0], [np.asarray(history)], free)[0]
        return None if found is None else found[1]

    # kept one draft (7) and the target's token 9: n = 12, read n - 2 = 10 -> history slot 2 (kept + 1)
    assert slot_of(np.concatenate([committed, [7, 9]])) == 2
    assert slot_of(np.concatenate([committed, [5]])) == 1  # kept none: n = 11, read 9
    assert slot_of(np.concatenate([committed, [7, 8, 6, 2]])) == 4  # kept all three and a bonus: read 12
    assert slot_of(committed) == 0  # vLLM verified nothing for this row: back to the round's start
    # history that ran further than the round fed, or differs in a committed token: read afresh
    assert slot_of(np.concatenate([committed, [7, 8, 6, 2, 3]])) is None
    other = committed.copy()
    other[3] = 0
    assert slot_of(np.concatenate([other, [7, 9]])) is None
    # a row that moved: found by content under another row index, and then taken
    free = {5: _Record(slot=2, fed=fed, base=8)}
    assert slot_of(np.concatenate([committed, [7, 9]]), free) == 2 and free == {}


def test_identical_requests_keep_their_own_caches_when_rows_move():
    """Two requests with one prompt, a round apart, whose rows vLLM swapped: each continues its own
    cache, none is read afresh (the one behind could also continue the other's, which would leave
    the one ahead without any)."""
    import numpy as np

    from supernet.serving.drafter import SupernetDrafter, _Record

    drafter = object.__new__(SupernetDrafter)
    drafter.k, drafter.history_slots = 2, 4
    text = np.arange(100, 130)
    ahead = _Record(slot=7, fed=text[:22], base=19)  # had committed 21 tokens, fed one draft
    behind = _Record(slot=3, fed=text[:19], base=16)  # had committed 18
    free = {0: ahead, 1: behind}
    # row 0 now holds the one behind (kept both drafts: 21 tokens), row 1 the one ahead (23 tokens)
    plan = drafter._assign([0, 1], [text[:21], text[:23]], free)
    assert [(p[0].slot, p[1]) for p in plan] == [(3, 3), (7, 2)] and free == {}


def test_a_cache_waits_for_a_row_that_sat_out_a_step():
    """propose's bookkeeping without a model: a row absent from one step keeps its cache (no
    prefill when it returns); a cache left alone longer than IDLE_STEPS is dropped."""
    import numpy as np

    from supernet.serving.drafter import IDLE_STEPS, SupernetDrafter, _Record

    class Runner:  # records what propose asks of the model
        device = torch.device("cpu")
        prefills = 0

        def prefill(self, tokens, *args):
            Runner.prefills += 1
            return None

    class Pool:
        size = 4

        def store(self, slot, cache):
            pass

        def reset(self, slot):
            pass

    drafter = object.__new__(SupernetDrafter)
    drafter.k, drafter.history_slots, drafter.max_model_len, drafter.capacity = 2, 4, 64, 68
    drafter.runner, drafter.pool, drafter.stats_path, drafter.records = Runner(), Pool(), None, {}
    drafter._draft = lambda slots, histories, index: [[5, 6] for _ in slots]  # the batched forwards
    tokens = np.zeros((2, 64), dtype=np.int64)
    tokens[:, :10] = np.arange(10) + np.array([[0], [100]])
    drafter.propose([[1], [1]], np.array([10, 10]), tokens)  # two new rows: two prefills
    assert Runner.prefills == 2
    tokens[0, 10:12] = [5, 9]  # row 0 kept draft 5, then 9; row 1 sits this step out
    drafter.propose([[9], []], np.array([12, 10]), tokens)
    tokens[1, 10:11] = [3]
    drafter.propose([[9], [3]], np.array([12, 11]), tokens)  # row 1 is back: continues its cache
    assert Runner.prefills == 2
    assert len(drafter.records) == 2 and all(rec.idle == 0 for rec in drafter.records.values())
    for _ in range(IDLE_STEPS + 1):  # row 1 gone for good
        drafter.propose([[9], []], np.array([12, 11]), tokens)
    assert sorted(drafter.records) == [0]
