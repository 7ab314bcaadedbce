"""The supernet model on tiny shapes: placements, caches, SWA semantics, save/load, generate."""
from __future__ import annotations

import math

import pytest
import torch

from supernet.cache import SupernetCache
from supernet.model import SupernetForCausalLM
from supernet.layout import Placement, PlacementError
from tests.float_bounds import assert_greedy_agrees
from tests.helpers.configs import tiny_config

MIXED = ["fa,swa,gdn,kda", "kda,gdn,swa,fa", "gdn,gdn,fa,kda", "swa,kda,kda,swa"]
UNIFORM = ["all-fa", "all-swa", "all-gdn", "all-kda"]


def test_wrong_length_placement_is_refused_with_one_line(tiny_model):
    with pytest.raises(PlacementError) as err:
        tiny_model.set_placement("fa,fa")
    msg = str(err.value)
    assert "2 layers" in msg and "4" in msg and "\n" not in msg


def test_unknown_mixer_is_refused_with_its_name(tiny_model):
    with pytest.raises(PlacementError) as err:
        tiny_model.set_placement("fa,mamba,fa,fa")
    assert "'mamba'" in str(err.value) and "layer 1" in str(err.value)
    with pytest.raises(PlacementError, match="unknown preset|unknown mixer"):
        tiny_model.set_placement("no-such-preset")


def test_set_placement_changes_output_without_reloading(tiny_model):
    ids = torch.randint(0, 97, (1, 12))
    weights_before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    outs = {}
    for p in UNIFORM:
        tiny_model.set_placement(p)
        outs[p] = tiny_model(ids).logits
    assert len({round(float(o.sum()), 4) for o in outs.values()}) == 4
    for k, v in tiny_model.state_dict().items():
        assert torch.equal(v, weights_before[k])
    tiny_model.set_placement("all-fa")
    assert torch.equal(tiny_model(ids).logits, outs["all-fa"])
    # a per-call override does not change the active placement
    over = tiny_model(ids, placement="all-kda").logits
    assert torch.equal(over, outs["all-kda"]) and tiny_model.placement == Placement.uniform("fa", 4)


def test_swa_with_window_covering_sequence_equals_fa():
    torch.manual_seed(1)
    model = SupernetForCausalLM(tiny_config(swa_window=64)).eval()
    for layer in model.model.layers:  # same weights in both attention mixers
        layer.mixers["swa"].load_state_dict(layer.mixers["fa"].state_dict())
    ids = torch.randint(0, 97, (2, 40))
    fa = model(ids, placement="all-fa").logits
    swa = model(ids, placement="all-swa").logits
    # exact: causal_attention drops a window that covers the keys, so both run the same kernels on
    # the same inputs in one process
    assert torch.equal(fa, swa)


def _masked_reference_attention(mixer, x, cos, sin, window):
    """Attention written out with an explicit window mask, in float64."""
    b, t, _ = x.shape
    h, kv, d = mixer.num_heads, mixer.num_kv_heads, mixer.head_dim
    x = x.double()
    q = (x @ mixer.q_proj.weight.double().T).view(b, t, h, d).transpose(1, 2)
    k = (x @ mixer.k_proj.weight.double().T).view(b, t, kv, d).transpose(1, 2)
    v = (x @ mixer.v_proj.weight.double().T).view(b, t, kv, d).transpose(1, 2)
    cos, sin = cos.double()[:, None], sin.double()[:, None]

    def rot(z):
        half = d // 2
        return z * cos + torch.cat([-z[..., half:], z[..., :half]], -1) * sin

    q, k = rot(q), rot(k)
    k = k.repeat_interleave(h // kv, dim=1)
    v = v.repeat_interleave(h // kv, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    i = torch.arange(t)[:, None]
    j = torch.arange(t)[None, :]
    allowed = (j <= i) & (i - j < window)
    scores = scores.masked_fill(~allowed, float("-inf"))
    out = scores.softmax(-1) @ v
    return out.transpose(1, 2).reshape(b, t, h * d) @ mixer.o_proj.weight.double().T


@pytest.mark.parametrize("window", [1, 3, 6])
def test_swa_short_window_equals_masked_reference(window):
    torch.manual_seed(2)
    model = SupernetForCausalLM(tiny_config(swa_window=window)).eval()
    mixer = model.model.layers[0].mixers["swa"]
    x = torch.randn(2, 19, 64)
    pos = torch.arange(19)[None].expand(2, -1)
    cos, sin = model.model.rotary_emb(x, pos)
    ours = mixer(x, (cos, sin))
    ref = _masked_reference_attention(mixer, x, cos, sin, window)
    torch.testing.assert_close(ours.double(), ref, atol=1e-5, rtol=1e-5)


def _decode_in_pieces(model, ids, pieces):
    cache = SupernetCache(model.config.num_hidden_layers)
    outs, start = [], 0
    for n in pieces:
        out = model(ids[:, start : start + n], past_key_values=cache, use_cache=True)
        outs.append(out.logits)
        start += n
    assert start == ids.shape[1]
    return torch.cat(outs, dim=1), cache


@pytest.mark.parametrize("placement", UNIFORM + MIXED)
def test_cached_decoding_equals_full_forward(tiny_model, placement):
    tiny_model.set_placement(placement)
    ids = torch.randint(0, 97, (2, 23))
    full = tiny_model(ids, use_cache=False).logits
    token_by_token, cache = _decode_in_pieces(tiny_model, ids, [1] * 23)
    uneven, _ = _decode_in_pieces(tiny_model, ids, [9, 1, 1, 5, 7])
    torch.testing.assert_close(token_by_token, full, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(uneven, full, atol=2e-5, rtol=1e-4)
    assert cache.get_seq_length() == 23


def test_swa_cache_never_exceeds_window(tiny_model):
    tiny_model.set_placement("all-swa")
    ids = torch.randint(0, 97, (1, 30))
    _, cache = _decode_in_pieces(tiny_model, ids, [10] + [1] * 20)
    for layer in range(4):
        st = cache.mixer_state(layer, "swa")
        assert st["k"].shape[2] == tiny_model.config.swa_window


def test_linear_mixer_state_is_constant_in_context(tiny_model):
    tiny_model.set_placement("gdn,kda,gdn,kda")
    sizes = []
    for t in (5, 40):
        _, cache = _decode_in_pieces(tiny_model, torch.randint(0, 97, (1, t)), [t])
        sizes.append(sum(v.numel() for layer in cache.states for st in layer.values() for v in st.values()
                         if isinstance(v, torch.Tensor)))
    assert sizes[0] == sizes[1]


def test_generate_matches_manual_greedy(tiny_model):
    ids = torch.randint(0, 97, (1, 7))
    for placement in ("all-fa", "fa,swa,gdn,kda"):
        tiny_model.set_placement(placement)
        out = tiny_model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
        manual, logits = ids, []
        for _ in range(12):
            logits.append(tiny_model(manual, use_cache=False).logits[:, -1])
            manual = torch.cat([manual, logits[-1].argmax(-1, keepdim=True)], dim=1)
        # generate decodes with the cache, the loop recomputes: logits within 2e-5 + 1e-4 |logit|
        # (test_cached_decoding_equals_full_forward), so argmax may part only at a near-tie
        logits = torch.stack(logits, 1)
        tol = 2 * (2e-5 + 1e-4 * float(logits.abs().max()))
        assert_greedy_agrees(out[:, 7:], manual[:, 7:], logits, tol)


def test_save_and_load_roundtrip_through_auto_classes(tmp_path, tiny_model):
    from transformers import AutoConfig, AutoModelForCausalLM

    from supernet.convert import save_checkpoint

    tiny_model.config.presets = {"fast": ["gdn", "kda", "swa", "fa"]}
    save_checkpoint(tiny_model, tmp_path / "ckpt")
    files = {p.name for p in (tmp_path / "ckpt").iterdir()}
    assert "model.safetensors" in files and "config.json" in files
    config = AutoConfig.from_pretrained(tmp_path / "ckpt")
    assert config.model_type == "supernet" and config.presets["fast"] == ["gdn", "kda", "swa", "fa"]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    assert isinstance(loaded, SupernetForCausalLM)
    ids = torch.randint(0, 97, (1, 10))
    for p in ("all-fa", "fast", "kda,kda,gdn,gdn"):
        tiny_model.set_placement(p)
        loaded.set_placement(p)
        assert torch.equal(tiny_model(ids).logits, loaded(ids).logits)
    # the parameter layout is the documented one
    names = set(loaded.state_dict())
    for m in ("fa", "swa", "gdn", "kda"):
        assert any(n.startswith(f"model.layers.3.mixers.{m}.") for n in names)


def test_preset_override_at_load_selects_active_placement(tmp_path, tiny_model):
    from supernet.convert import save_checkpoint

    tiny_model.config.presets = {"fast": ["gdn", "kda", "swa", "fa"]}
    save_checkpoint(tiny_model, tmp_path / "ckpt")
    loaded = SupernetForCausalLM.from_pretrained(tmp_path / "ckpt", preset="fast")
    assert loaded.placement.to_list() == ["gdn", "kda", "swa", "fa"]
    with pytest.raises(PlacementError, match="unknown preset 'nope'"):
        SupernetForCausalLM.from_pretrained(tmp_path / "ckpt", preset="nope")


def test_gradients_reach_only_the_active_mixers(tiny_model):
    tiny_model.train()
    ids = torch.randint(0, 97, (2, 16))
    out = tiny_model(ids, labels=ids, placement="fa,swa,gdn,kda")
    out.loss.backward()
    for i, active in enumerate(["fa", "swa", "gdn", "kda"]):
        for name, mixer in tiny_model.model.layers[i].mixers.items():
            grads = [p.grad for p in mixer.parameters()]
            if name == active:
                assert all(g is not None and torch.isfinite(g).all() for g in grads)
            else:
                assert all(g is None for g in grads)
