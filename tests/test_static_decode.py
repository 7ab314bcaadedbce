"""Static decoding (the CUDA-graph-ready step) equals ordinary cached decoding, on the CPU."""
from __future__ import annotations

import pytest
import torch

from supernet.cache import SupernetCache
from supernet.model import SupernetForCausalLM
from supernet.static_decode import GraphedStep, StaticDecoder
from tests.float_bounds import assert_greedy_agrees
from tests.helpers.configs import tiny_config

PLACEMENTS = ["all-fa", "all-swa", "all-gdn", "all-kda", "fa,swa,gdn,kda", "kda,swa,fa,gdn"]


def _eager_greedy(model, ids, placement, new_tokens):
    cache = SupernetCache(model.config.num_hidden_layers)
    logits = model(ids, past_key_values=cache, use_cache=True, placement=placement).logits
    token = logits[:, -1:].argmax(-1)
    tokens, step_logits = [], []
    for _ in range(new_tokens):
        logits = model(token, past_key_values=cache, use_cache=True, placement=placement).logits
        step_logits.append(logits[:, -1])
        token = logits[:, -1:].argmax(-1)
        tokens.append(token)
    return torch.cat(tokens, 1), torch.stack(step_logits, 1)


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("prompt_len", [3, 11])  # shorter and longer than the SWA window (6)
@torch.no_grad()
def test_static_decoding_equals_cached_decoding(placement, prompt_len):
    torch.manual_seed(0)
    model = SupernetForCausalLM(tiny_config()).eval()
    ids = torch.randint(0, 97, (3, prompt_len))
    want_tokens, want_logits = _eager_greedy(model, ids, placement, 9)

    cache = SupernetCache(model.config.num_hidden_layers)
    first = model(ids, past_key_values=cache, use_cache=True, placement=placement).logits[:, -1:].argmax(-1)
    decoder = StaticDecoder(model, placement, cache, max_new_tokens=12, cuda_graph=False)
    # record each step's logits through a hook on lm_head, to compare more than the argmax
    seen = []
    hook = model.lm_head.register_forward_hook(lambda m, i, o: seen.append(o[:, -1].clone()))
    try:
        got = decoder.generate(first, 9)
    finally:
        hook.remove()
    seen = torch.stack(seen, 1)
    # the two paths run different kernels (static buffers, masks): logits within 1e-5 + 1e-5 |logit|,
    # so argmax may part only where the top-2 margin is below twice that
    tol = 2 * (1e-5 + 1e-5 * float(want_logits.abs().max()))
    steps = assert_greedy_agrees(got, want_tokens, want_logits, tol)
    for b, t in enumerate(steps):
        torch.testing.assert_close(seen[b, :t], want_logits[b, :t], atol=1e-5, rtol=1e-5)
    assert cache.seen_tokens == prompt_len + 9


@torch.no_grad()
def test_ordinary_decoding_continues_after_static_decoding():
    torch.manual_seed(0)
    model = SupernetForCausalLM(tiny_config()).eval()
    ids = torch.randint(0, 97, (2, 8))
    placement = "fa,swa,gdn,kda"
    want, want_logits = _eager_greedy(model, ids, placement, 10)
    cache = SupernetCache(model.config.num_hidden_layers)
    first = model(ids, past_key_values=cache, use_cache=True, placement=placement).logits[:, -1:].argmax(-1)
    decoder = StaticDecoder(model, placement, cache, max_new_tokens=4, cuda_graph=False)
    head = decoder.generate(first, 4)
    decoder.finish()
    token, tail = head[:, -1:], []
    for _ in range(6):  # past the static capacity: FA's buffer must grow again
        token = model(token, past_key_values=cache, use_cache=True, placement=placement).logits[:, -1:].argmax(-1)
        tail.append(token)
    # the first 4 tokens come from the static step (other kernels, logits within ~1e-5), the rest from
    # the same cached eager step as `want` once their prefixes agree
    assert_greedy_agrees(torch.cat([head, *tail], 1), want, want_logits,
                         2 * (1e-5 + 1e-5 * float(want_logits.abs().max())))


@torch.no_grad()
def test_static_decoder_refuses_what_it_cannot_do():
    torch.manual_seed(0)
    model = SupernetForCausalLM(tiny_config()).eval()
    ids = torch.randint(0, 97, (1, 5))
    cache = SupernetCache(model.config.num_hidden_layers)
    model(ids, past_key_values=cache, use_cache=True, placement="all-fa")
    with pytest.raises(ValueError, match="no 'gdn' state for layer 0.*prefill with the same placement"):
        StaticDecoder(model, "all-gdn", cache, max_new_tokens=2, cuda_graph=False)
    with pytest.raises(ValueError, match="CUDA graphs need"):
        StaticDecoder(model, "all-fa", cache, max_new_tokens=2, cuda_graph=True)
    decoder = StaticDecoder(model, "all-fa", cache, max_new_tokens=2, cuda_graph=False)
    with pytest.raises(RuntimeError, match="start"):
        decoder.step()
    decoder.generate(torch.zeros(1, 1, dtype=torch.long), 2)
    with pytest.raises(RuntimeError, match="full"):
        decoder.step()


def test_graphed_step_copies_replaced_state_back():
    """The copy-back that keeps graph replays advancing, checked eagerly on the CPU."""
    cache = SupernetCache(1)
    fixed = torch.zeros(3)
    cache.states[0]["gdn"] = {"recurrent": fixed}

    def replace() -> None:
        st = cache.states[0]["gdn"]
        st["recurrent"] = st["recurrent"] + 1  # a new tensor, as GDN/KDA produce

    step = GraphedStep(replace, cache, [(0, "gdn")], cuda_graph=False)
    bound = step._bound_states()
    replace()
    step._rebind(bound)
    assert cache.states[0]["gdn"]["recurrent"] is fixed and torch.equal(fixed, torch.ones(3))


@pytest.mark.parametrize("placement", ["all-fa", "fa,swa,gdn,kda"])
@pytest.mark.parametrize("static", [False, True])
@torch.no_grad()
def test_greedy_generation_equals_hf_generate(placement, static):
    """supernet.generation's eager and static engines (the static one eager on the CPU) give HF
    generate's tokens, and stop after each row's first end-of-sequence token."""
    from supernet.generation import greedy_generate

    torch.manual_seed(0)
    model = SupernetForCausalLM(tiny_config()).eval()
    ids = torch.randint(0, 97, (2, 9))
    model.set_placement(placement)
    gen = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0, output_scores=True,
                         return_dict_in_generate=True)
    want, scores = gen.sequences[:, 9:], torch.stack(gen.scores, 1)
    got = torch.tensor(greedy_generate(model, ids, placement, 12, static=static, cuda_graph=False))
    tol = 2 * (1e-5 + 1e-5 * float(scores.abs().max()))  # as in the cached-decoding test above
    comparable = assert_greedy_agrees(got, want, scores, tol)
    # stopping at an end-of-sequence token includes it, as HF generate does; the eos is taken inside
    # the prefix where both agree, so a row that meets it there must stop exactly after it
    eos = int(want[0, min(4, comparable[0] - 1)])
    stopped = greedy_generate(model, ids, placement, 12, eos_token_id=eos, static=static, cuda_graph=False)
    for row, full, n in zip(stopped, want.tolist(), comparable):
        if eos in full[:n]:
            assert row == full[: full.index(eos) + 1]
        else:
            assert row[:n] == full[: min(n, len(row))][: len(row)]


def test_measure_decode_takes_real_prompts_or_refuses_missing_shapes():
    from supernet.measure.throughput import measure_decode

    torch.manual_seed(0)
    model = SupernetForCausalLM(tiny_config()).eval()
    prompts = torch.randint(0, 97, (2, 15))
    row = measure_decode(model, "fa,swa,gdn,kda", new_tokens=3, input_ids=prompts)
    assert (row["batch"], row["context"], row["new_tokens"]) == (2, 15, 3) and row["tokens_per_s"] > 0
    with pytest.raises(ValueError, match="needs batch and context, or input_ids"):
        measure_decode(model, "all-fa", new_tokens=3)


def test_compare_decode_takes_the_median_of_interleaved_rounds(monkeypatch):
    """Every placement is timed in each round, in turn; its figure is the median of all its windows."""
    import supernet.measure.throughput as throughput

    torch.manual_seed(0)
    model = SupernetForCausalLM(tiny_config()).eval()
    row = throughput.measure_decode(model, "all-fa", batch=1, context=6, new_tokens=2, windows=3, cuda_graph=False)
    assert len(row["ms_per_step_windows"]) == 3 and row["ms_per_step"] == sorted(row["ms_per_step_windows"])[1]
    with pytest.raises(ValueError, match="windows >= 1"):
        throughput.measure_decode(model, "all-fa", batch=1, context=6, new_tokens=2, windows=0)

    order, fake = [], iter([9.0, 1.0, 5.0, 2.0, 4.0, 6.0, 3.0, 8.0, 7.0, 2.5, 3.5, 4.5])

    def fake_measure(model, placement, *, new_tokens, windows, **kw):
        order.append((placement, new_tokens, windows))
        times = [next(fake) for _ in range(windows)] if new_tokens == 5 else [0.1]
        return {"ms_per_step_windows": times, "ms_per_step": times[0], "batch": 2}

    monkeypatch.setattr(throughput, "measure_decode", fake_measure)
    got = throughput.compare_decode(model, {"a": "all-fa", "b": "all-gdn"}, batch=2, context=6, new_tokens=5,
                                    rounds=3, windows=2)
    # one short warm-up pass, then three timed rounds alternating between the placements
    assert order == [("all-fa", 2, 1), ("all-gdn", 2, 1)] + [("all-fa", 5, 2), ("all-gdn", 5, 2)] * 3
    assert got["a"]["ms_per_step_windows"] == [9.0, 1.0, 4.0, 6.0, 7.0, 2.5]
    assert got["a"]["ms_per_step"] == pytest.approx(5.0) and got["a"]["tokens_per_s"] == pytest.approx(2 * 1e3 / 5.0)
    assert (got["b"]["ms_per_step_min"], got["b"]["ms_per_step_max"]) == (2.0, 8.0)
    with pytest.raises(ValueError, match="rounds >= 1"):
        throughput.compare_decode(model, {"a": "all-fa"}, batch=1, context=6, new_tokens=2, rounds=0)


def test_decode_mask_and_rope_sign_are_built_once_per_step(monkeypatch):
    """Shared per-forward tensors: one mask per buffer size and one RoPE sign flip per step, for all layers."""
    import supernet.mixers.attention as attention

    torch.manual_seed(0)
    model = SupernetForCausalLM(tiny_config(num_hidden_layers=4)).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    cache = SupernetCache(model.config.num_hidden_layers)
    with torch.no_grad():
        token = model(ids, past_key_values=cache, use_cache=True, placement="fa,fa,swa,fa").logits[:, -1:].argmax(-1)
    calls = {"bias": 0, "sign": 0}
    real_bias, real_sign = attention.decode_mask_bias, attention.signed_sin

    def count(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(attention, "decode_mask_bias", count("bias", real_bias))
    monkeypatch.setattr(attention, "signed_sin", count("sign", real_sign))
    decoder = StaticDecoder(model, "fa,fa,swa,fa", cache, max_new_tokens=3, cuda_graph=False)
    decoder.generate(token, 3)
    steps = 3
    assert calls["sign"] == steps  # not once per attention layer (4 layers)
    assert calls["bias"] == 2 * steps  # one per buffer size: FA's buffer and SWA's ring


def test_shared_values_follow_their_source_tensor():
    """A mixer run without a model forward (serving's drafter) must not reuse a value made from
    another call's tensor, even if that tensor was freed and its id reused."""
    cache = SupernetCache(1)
    a = torch.ones(3)
    first = cache.shared("k", lambda: a * 2, source=a)
    assert cache.shared("k", lambda: a * 3, source=a) is first  # same source: reused
    b = torch.ones(5)
    assert cache.shared("k", lambda: b * 2, source=b).shape == (5,)  # new source: remade
