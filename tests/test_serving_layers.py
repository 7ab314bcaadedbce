"""The served GDN/KDA layers (vLLM state pages, one custom op per layer) against the reference
mixers (`supernet.mixers.gdn` / `kda`), without a vLLM server.

The served layer gets the reference mixer's weights and vLLM-shaped metadata for steps that mix
plain decodes, continuing and fresh prefills (pages full of NaN garbage where a sequence starts
fresh) and draft verification with accepted-token counts; every output token must equal the
reference mixer run over the whole sequence. Tolerances: float32 throughout, the served path sums
the short convolution and the chunked recurrence in a different order (windows gathered per token,
sequences padded to the longest), so results agree to float32 rounding of O(1) values, ~1e-6.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tests.helpers.configs import vllm_config
from tests.helpers.served_layers import build_served, checkpoint_tensors, plain_meta, run_step, vllm_group

KINDS = ["gdn", "kda"]
ATOL, RTOL = 2e-5, 1e-4


@pytest.fixture(scope="module")
def vllm_env():
    """A one-process tensor-parallel group: what vLLM's linear layers need to exist."""
    with vllm_group(1) as cfg:
        yield cfg


def _layers(kind: str, cfg):
    """(served layer with pages, reference mixer) holding the same random weights."""
    from supernet.mixers import mixer_class

    weights = checkpoint_tensors(kind)
    reference = mixer_class(kind)(vllm_config(), 0).eval()
    reference.load_state_dict(weights)
    return build_served(kind, cfg, weights), reference


def _step(served, meta, hidden: torch.Tensor, monkeypatch=None) -> torch.Tensor:
    return run_step(served, meta, hidden)


_plain_meta = plain_meta


def _reference(reference, seq: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return reference(seq[None])[0]


@pytest.mark.parametrize("kind", KINDS)
def test_batched_decode_and_varlen_prefill_match_reference(kind, vllm_env, monkeypatch):
    served, reference = _layers(kind, vllm_env)
    gen = torch.Generator().manual_seed(0)
    d = vllm_config().hidden_size
    history = {name: torch.randn(n, d, generator=gen) for name, n in [("a", 5), ("b", 9), ("c", 3), ("d", 6)]}
    page = {"a": 3, "b": 5, "c": 7, "d": 9, "e": 11, "f": 12}
    # step 1: four fresh prefills in one call
    order = ["a", "b", "c", "d"]
    out = _step(served, _plain_meta([(len(history[s]), page[s], False) for s in order], 0),
                torch.cat([history[s] for s in order]), monkeypatch)
    torch.testing.assert_close(out, torch.cat([_reference(reference, history[s]) for s in order]), atol=ATOL, rtol=RTOL)
    # step 2: three decodes, a continuing prefill (chunked prompt), a fresh prefill, a one-token prompt
    new = {"a": 1, "b": 1, "c": 1, "d": 7, "e": 11, "f": 1}
    tokens = {s: torch.randn(n, d, generator=gen) for s, n in new.items()}
    order = ["a", "b", "c", "d", "e", "f"]
    meta = _plain_meta([(new[s], page[s], s in history) for s in order], 3)
    out = _step(served, meta, torch.cat([tokens[s] for s in order]), monkeypatch)
    seqs = {s: torch.cat([history[s], tokens[s]]) if s in history else tokens[s] for s in order}
    expect = torch.cat([_reference(reference, seqs[s])[-new[s]:] for s in order])
    torch.testing.assert_close(out, expect, atol=ATOL, rtol=RTOL)
    # step 3: every sequence decodes one token from the pages step 2 wrote
    step3 = {s: torch.randn(1, d, generator=gen) for s in order}
    out = _step(served, _plain_meta([(1, page[s], True) for s in order], 6), torch.cat([step3[s] for s in order]), monkeypatch)
    expect = torch.cat([_reference(reference, torch.cat([seqs[s], step3[s]]))[-1:] for s in order])
    torch.testing.assert_close(out, expect, atol=ATOL, rtol=RTOL)


def _spec_meta(spec_rows, accepted, prefill_rows, num_spec: int):
    """spec_rows: (tokens, pages[num_spec+1]); prefill_rows: (tokens, page, has state). Spec rows
    first in the flat layout, then the prefills (vLLM gives the index lists either way)."""
    spec_lens = torch.tensor([r[0] for r in spec_rows])
    pre_lens = torch.tensor([r[0] for r in prefill_rows], dtype=torch.long)
    n_spec = int(spec_lens.sum())
    n_pre = int(pre_lens.sum()) if prefill_rows else 0
    return SimpleNamespace(
        spec_sequence_masks=torch.ones(len(spec_rows), dtype=torch.bool),
        spec_state_indices_tensor=torch.tensor([r[1] for r in spec_rows], dtype=torch.int32),
        spec_query_start_loc=torch.cat([torch.zeros(1, dtype=torch.long), spec_lens.cumsum(0)]).int(),
        spec_token_indx=torch.arange(n_spec, dtype=torch.int32),
        non_spec_token_indx=torch.arange(n_spec, n_spec + n_pre, dtype=torch.int32),
        num_accepted_tokens=torch.tensor(accepted, dtype=torch.int32),
        num_spec_decode_tokens=n_spec, num_spec_decodes=len(spec_rows), num_prefills=len(prefill_rows),
        num_prefill_tokens=n_pre,
        non_spec_query_start_loc=torch.cat([torch.zeros(1, dtype=torch.long), pre_lens.cumsum(0)]).int(),
        non_spec_state_indices_tensor=torch.tensor([r[1] for r in prefill_rows], dtype=torch.int32),
        has_initial_state=torch.tensor([r[2] for r in prefill_rows], dtype=torch.bool),
        num_actual_tokens=n_spec + n_pre, num_decodes=0)


@pytest.mark.parametrize("kind", KINDS)
def test_draft_verification_keeps_one_page_per_token(kind, vllm_env, monkeypatch):
    served, reference = _layers(kind, vllm_env)
    gen = torch.Generator().manual_seed(1)
    d = vllm_config().hidden_size
    pages = {"p": [20, 21, 22, 23], "q": [30, 31, 32, 33]}
    history = {"p": torch.randn(6, d, generator=gen), "q": torch.randn(4, d, generator=gen)}
    _step(served, _plain_meta([(6, 20, False), (4, 30, False)], 0), torch.cat([history["p"], history["q"]]), monkeypatch)
    # step 2: both rows verify 3 drafts (4 tokens) from page 0
    drafts = {s: torch.randn(4, d, generator=gen) for s in "pq"}
    out = _step(served, _spec_meta([(4, pages["p"]), (4, pages["q"])], [1, 1], [], 3),
                torch.cat([drafts["p"], drafts["q"]]), monkeypatch)
    expect = torch.cat([_reference(reference, torch.cat([history[s], drafts[s]]))[-4:] for s in "pq"])
    torch.testing.assert_close(out, expect, atol=ATOL, rtol=RTOL)
    # step 3: p accepted 2 drafts (continues from page 2), q none (page 0); q's row is ragged (2
    # tokens); a fresh prefill shares the step
    kept = {"p": 3, "q": 1}
    step3 = {"p": torch.randn(4, d, generator=gen), "q": torch.randn(2, d, generator=gen)}
    fresh = torch.randn(5, d, generator=gen)
    out = _step(served, _spec_meta([(4, pages["p"]), (2, pages["q"])], [3, 1], [(5, 15, False)], 3),
                torch.cat([step3["p"], step3["q"], fresh]), monkeypatch)
    seqs = {s: torch.cat([history[s], drafts[s][: kept[s]], step3[s]]) for s in "pq"}
    expect = torch.cat([_reference(reference, seqs["p"])[-4:], _reference(reference, seqs["q"])[-2:],
                        _reference(reference, fresh)])
    torch.testing.assert_close(out, expect, atol=ATOL, rtol=RTOL)
    # page t of q holds the state after its token t of step 3: decode from page 1
    nxt = torch.randn(1, d, generator=gen)
    out = _step(served, _plain_meta([(1, pages["q"][1], True)], 1), nxt, monkeypatch)
    expect = _reference(reference, torch.cat([seqs["q"], nxt]))[-1:]
    torch.testing.assert_close(out, expect, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("kind", KINDS)
def test_state_page_is_the_registrys_state(kind, vllm_env):
    """One state page holds exactly the registry's decode state of one sequence: the three conv
    tails stacked, the recurrent matrix transposed to vLLM's [HV, V, K], in the registry's dtypes."""
    from supernet.mixers.registry import spec

    served, _ = _layers(kind, vllm_env)
    states = spec(kind).state_shapes(vllm_config(), 1, 100)
    (conv, tail), ssm = served.get_state_shape()
    assert conv == sum(states[n].shape[1] for n in ("conv_q", "conv_k", "conv_v"))
    assert tail == states["conv_q"].shape[2]
    hv, k, v = states["recurrent"].shape[1:]
    assert ssm == (hv, v, k)
    assert served.get_state_dtype() == (torch.float32, torch.float32)  # model dtype float32 here
    page_bytes = sum(torch.Size(s).numel() * 4 for s in served.get_state_shape())
    assert page_bytes == spec(kind).cache_bytes(vllm_config(), 100, dtype_bytes=4)
    from supernet.serving.linear_layers import linear_state_dtypes

    assert linear_state_dtypes(torch.bfloat16, vllm_config(), kind) == (torch.bfloat16, torch.float32)


def _rows_step(served, meta, hidden: torch.Tensor, keep: list[bool], lens: list[int]) -> torch.Tensor:
    """One switchable-mode forward: only the rows in `keep` run this mixer (`forward_rows`)."""
    from supernet.serving import linear_layers

    starts = torch.tensor([0] + lens).cumsum(0)
    tokens = torch.cat([torch.arange(int(starts[i]), int(starts[i + 1])) for i, kept in enumerate(keep) if kept])
    return run_step(served, meta, hidden, tokens, linear_layers.RowFilter(torch.tensor(keep), torch.tensor(lens)))


@pytest.mark.parametrize("kind", KINDS)
def test_kept_rows_of_a_mixed_step_match_reference_and_leave_other_pages_alone(kind, vllm_env):
    """Switchable mode: decodes and prefills (continuing and fresh) of which only some rows use
    this mixer. The kept rows' outputs equal the reference run over their whole sequences; the
    other rows' pages are not touched (a request's preset never reads them)."""
    served, reference = _layers(kind, vllm_env)
    gen = torch.Generator().manual_seed(2)
    d = vllm_config().hidden_size
    page = {"a": 3, "b": 5, "c": 7, "d": 9, "e": 11, "f": 13}
    history = {s: torch.randn(n, d, generator=gen) for s, n in [("a", 4), ("b", 6), ("c", 3), ("d", 5)]}
    order = list(history)
    run_step(served, _plain_meta([(len(history[s]), page[s], False) for s in order], 0),
             torch.cat([history[s] for s in order]))
    conv_before, ssm_before = (t.clone() for t in served.kv_cache)
    # decodes a, b, c; continuing prefill d; fresh prefills e, f. Rows b, d and f use another mixer.
    new = {"a": 1, "b": 1, "c": 1, "d": 4, "e": 5, "f": 3}
    kept = {"a": True, "b": False, "c": True, "d": False, "e": True, "f": False}
    tokens = {s: torch.randn(n, d, generator=gen) for s, n in new.items()}
    rows = list(new)
    meta = _plain_meta([(new[s], page[s], s in history) for s in rows], 3)
    out = _rows_step(served, meta, torch.cat([tokens[s] for s in rows]), [kept[s] for s in rows], [new[s] for s in rows])
    seqs = {s: torch.cat([history[s], tokens[s]]) if s in history else tokens[s] for s in rows}
    expect = torch.cat([_reference(reference, seqs[s])[-new[s]:] for s in rows if kept[s]])
    torch.testing.assert_close(out, expect, atol=ATOL, rtol=RTOL)
    conv, ssm = served.kv_cache
    for s in rows:
        if not kept[s]:  # untouched: equal bit for bit, NaN where the page was never written
            assert torch.equal(conv[page[s]].nan_to_num(7.0), conv_before[page[s]].nan_to_num(7.0)), s
            assert torch.equal(ssm[page[s]].nan_to_num(7.0), ssm_before[page[s]].nan_to_num(7.0)), s
    # the kept rows continue from the pages this step wrote
    nxt = {s: torch.randn(1, d, generator=gen) for s in rows if kept[s]}
    out = run_step(served, _plain_meta([(1, page[s], True) for s in nxt], len(nxt)), torch.cat(list(nxt.values())))
    expect = torch.cat([_reference(reference, torch.cat([seqs[s], nxt[s]]))[-1:] for s in nxt])
    torch.testing.assert_close(out, expect, atol=ATOL, rtol=RTOL)
