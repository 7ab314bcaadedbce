"""Every supported teacher family converts exactly: tiny random-weight models built with transformers'
own classes (random norm weights and biases, several GQA ratios, tied and untied embeddings, RoPE
scaling, sliding layers) -> supernet whose teacher placement reproduces transformers' logits, and
whose mixed placements decode with a cache exactly as in one full forward.

Tolerance of the logit comparison (1e-4, float32): both sides run the same operations in the same
precision, only grouped differently (SDPA vs our attention kernels, RoPE as roll+addcmul vs
rotate_half, fused vs separate residual adds). Each regrouping moves a value by a few float32 ulps
(eps = 1.2e-7) of the magnitudes involved; hidden states here are O(1-10) (Gemma's sqrt(64) = 8
embedding scale), so per layer a difference of ~1e-6 at most, carried through <= 4 layers and the
head's 64-term dot products (~sqrt(64) growth) keeps the logits within ~1e-5. 1e-4 leaves a 10x
margin and still catches any real mistake (a missing norm or scale moves logits by >= 1e-2).
"""
from __future__ import annotations

import pytest
import torch

from supernet.cache import SupernetCache
from supernet.convert import SUPPORTED_TEACHERS, supernet_config_from_teacher, supernet_from_teacher
from supernet.static_decode import StaticDecoder

VOCAB = 264
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, max_position_embeddings=256,
              bos_token_id=0, eos_token_id=1, pad_token_id=2)


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    rope = {"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    return LlamaForCausalLM(LlamaConfig(**COMMON, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                        attention_bias=True, mlp_bias=True, tie_word_embeddings=False,
                                        rope_parameters=rope))


def _mistral():
    from transformers import MistralConfig, MistralForCausalLM

    # every layer slides (window 5 < the 19-token inputs): the teacher placement is all-swa
    return MistralForCausalLM(MistralConfig(**COMMON, num_hidden_layers=2, num_attention_heads=4,
                                            num_key_value_heads=1, sliding_window=5, tie_word_embeddings=False))


def _qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    # layers >= 2 slide (Qwen2's max_window_layers), q/k/v biases, tied embeddings, no GQA
    return Qwen2ForCausalLM(Qwen2Config(**COMMON, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
                                        use_sliding_window=True, sliding_window=6, max_window_layers=2,
                                        tie_word_embeddings=True))


def _qwen3():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    # head_dim 32 != 64 / 4, per-head q/k norms, linear RoPE scaling, q/k/v/o biases
    return Qwen3ForCausalLM(Qwen3Config(**COMMON, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                        head_dim=32, attention_bias=True, tie_word_embeddings=False,
                                        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e5}))


def _qwen3_tied():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return Qwen3ForCausalLM(Qwen3Config(**COMMON, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=1,
                                        head_dim=16, tie_word_embeddings=True))


def _gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    # sandwich norms with (1 + w), embeddings * sqrt(64), query_pre_attn_scalar, sliding and global
    # layers with their own RoPE (local 10k; global 1M with linear scaling), final logit softcap
    config = Gemma3TextConfig(
        **COMMON, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        query_pre_attn_scalar=24, sliding_window=5, final_logit_softcapping=3.0, tie_word_embeddings=True,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
    )
    return Gemma3ForCausalLM(config)


def _phi3():
    from transformers import Phi3Config, Phi3ForCausalLM

    return Phi3ForCausalLM(Phi3Config(**COMMON, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      tie_word_embeddings=False))


def _olmo2():
    from transformers import Olmo2Config, Olmo2ForCausalLM

    return Olmo2ForCausalLM(Olmo2Config(**COMMON, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1,
                                        tie_word_embeddings=False))


TEACHERS = {"llama": _llama, "mistral": _mistral, "qwen2": _qwen2, "qwen3": _qwen3, "qwen3-tied": _qwen3_tied,
            "gemma3": _gemma3, "phi3": _phi3, "olmo2": _olmo2}


def _build(name: str):
    """The teacher with non-trivial norm weights and biases (transformers inits them to 1 / 0)."""
    torch.manual_seed(sum(map(ord, name)))
    teacher = TEACHERS[name]().float().eval()
    gemma = teacher.config.model_type == "gemma3_text"
    with torch.no_grad():
        for pname, p in teacher.named_parameters():
            if "norm" in pname:
                p.copy_((0.0 if gemma else 1.0) + 0.3 * torch.randn_like(p))
            elif pname.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return teacher


@pytest.fixture(scope="module", params=list(TEACHERS))
def pair(request):
    teacher = _build(request.param)
    return request.param, teacher, supernet_from_teacher(teacher)


def test_every_family_is_covered():
    covered = {pair_name.split("-")[0].replace("gemma3", "gemma3_text") for pair_name in TEACHERS}
    assert covered == set(SUPPORTED_TEACHERS)


@torch.no_grad()
def test_teacher_placement_reproduces_transformers_logits(pair):
    name, teacher, supernet = pair
    ids = torch.randint(3, VOCAB, (2, 19), generator=torch.Generator().manual_seed(1))
    ref = teacher(ids).logits
    ours = supernet(ids).logits
    assert supernet.placement.to_list() == supernet.config.presets["teacher"]
    assert ref.abs().max() > 0.05  # a real signal, not a degenerate model
    delta = (ref - ours).abs().max().item()
    assert delta <= 1e-4, f"{name}: max |delta logit| = {delta:.3g}"


def test_teacher_preset_follows_the_teachers_sliding_layers(pair):
    name, _, supernet = pair
    expected = {
        "mistral": ["swa", "swa"],
        "qwen2": ["fa", "fa", "swa"],
        "gemma3": ["swa", "fa", "swa", "fa"],
    }.get(name, ["fa"] * supernet.config.num_hidden_layers)
    assert supernet.config.placement == expected == supernet.config.presets["teacher"]
    if "swa" in expected:
        assert supernet.config.swa_window == {"mistral": 5, "qwen2": 6, "gemma3": 5}[name]


def _pieces(model, ids, placement, sizes):
    cache = SupernetCache(model.config.num_hidden_layers)
    outs, start = [], 0
    for n in sizes:
        outs.append(model(ids[:, start:start + n], past_key_values=cache, use_cache=True, placement=placement).logits)
        start += n
    return torch.cat(outs, dim=1)


def _mixed(n: int) -> list[list[str]]:
    cycle = ["fa", "swa", "gdn", "kda"]
    return [[cycle[i % 4] for i in range(n)], [cycle[(i + 2) % 4] for i in range(n)]]


@torch.no_grad()
def test_cached_decoding_equals_full_forward_for_mixed_placements(pair):
    """Token by token and in uneven pieces (one placement each, to keep the test cheap)."""
    name, _, supernet = pair
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(2))
    stepwise_placement, pieces_placement = _mixed(supernet.config.num_hidden_layers)
    for placement, sizes in ((stepwise_placement, [1] * 9), (pieces_placement, [4, 1, 3, 1])):
        full = supernet(ids, use_cache=False, placement=placement).logits
        cached = _pieces(supernet, ids, placement, sizes)
        torch.testing.assert_close(cached, full, atol=2e-5, rtol=1e-4, msg=f"{name} {placement} {sizes}")


@torch.no_grad()
def test_static_decoding_equals_cached_decoding(pair):
    name, _, supernet = pair
    placement = _mixed(supernet.config.num_hidden_layers)[0]
    ids = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(3))
    cache = SupernetCache(supernet.config.num_hidden_layers)
    token = supernet(ids, past_key_values=cache, use_cache=True, placement=placement).logits[:, -1:].argmax(-1)
    want, t = [], token
    eager_cache = SupernetCache(supernet.config.num_hidden_layers)
    supernet(ids, past_key_values=eager_cache, use_cache=True, placement=placement)
    for _ in range(4):
        t = supernet(t, past_key_values=eager_cache, use_cache=True, placement=placement).logits[:, -1:].argmax(-1)
        want.append(t)
    decoder = StaticDecoder(supernet, placement, cache, max_new_tokens=4, cuda_graph=False)
    assert torch.equal(decoder.generate(token, 4), torch.cat(want, 1)), name


def test_linear_mixers_start_from_the_teachers_attention(pair):
    """GDN/KDA get q/o and GQA-repeated k/v; where the teacher normalises q/k, its norm weight is
    folded into the rows (their own per-head L2 norm replaces the RMS division)."""
    name, teacher, supernet = pair
    config = supernet.config
    mixer, fa = supernet.model.layers[0].mixers["gdn"], supernet.model.layers[0].mixers["fa"]
    q = fa.q_proj.weight
    if config.qk_norm == "per_head":
        q = q * fa.q_norm.weight.repeat(config.num_attention_heads)[:, None]
    elif config.qk_norm == "whole":
        q = q * fa.q_norm.weight[:, None]
    torch.testing.assert_close(mixer.q_proj.weight, q)
    torch.testing.assert_close(mixer.o_proj.weight, fa.o_proj.weight)


def test_converted_checkpoint_roundtrips_from_a_folder(tmp_path):
    """`supernet convert` from an HF folder (the family with the most differences: Gemma 3)."""
    from tests.helpers.checkpoints import save_byte_tokenizer
    from supernet.convert import convert_teacher
    from supernet.model import SupernetForCausalLM

    teacher = _build("gemma3")
    teacher.save_pretrained(tmp_path / "teacher")
    save_byte_tokenizer(tmp_path / "teacher")
    out = convert_teacher(tmp_path / "teacher", tmp_path / "student")
    loaded = SupernetForCausalLM.from_pretrained(out).eval()
    assert loaded.config.teacher_family == "gemma3_text" and loaded.config.norm_layout == "sandwich"
    ids = torch.randint(3, VOCAB, (1, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        delta = (teacher(ids).logits - loaded(ids).logits).abs().max().item()
        assert delta <= 1e-4
        assert torch.isfinite(loaded(ids, placement="gdn,kda,gdn,kda").logits).all()


def test_unsupported_architecture_is_one_line_naming_it_and_the_supported_ones():
    from transformers import GPT2Config

    with pytest.raises(ValueError) as err:
        supernet_config_from_teacher(GPT2Config(n_layer=2, n_embd=64, n_head=4))
    msg = str(err.value)
    assert "\n" not in msg and "'gpt2'" in msg
    for arch in ("LlamaForCausalLM", "Qwen3ForCausalLM", "Gemma3ForCausalLM", "Phi3ForCausalLM", "Olmo2ForCausalLM"):
        assert arch in msg


@torch.no_grad()
def test_self_fa_distillation_teacher_is_the_teacher(pair):
    """Training's `self-fa` teacher (the student's own teacher placement) gives the online teacher's loss."""
    from supernet.layout import Placement
    from supernet.training.engine import DistillPair
    from supernet.training.losses import LossSpec

    name, teacher, supernet = pair
    n = supernet.config.num_hidden_layers
    ids = torch.randint(3, VOCAB, (2, 11), generator=torch.Generator().manual_seed(5))
    weight = torch.ones(2, 11) / 22
    placement = Placement.parse([("gdn", "kda", "swa", "fa")[i % 4] for i in range(n)], n)  # not the teacher
    with pytest.raises(ValueError, match="self-fa needs the teacher placement's mixers frozen"):
        DistillPair(supernet, None, "self-fa", LossSpec())
    for layer in supernet.model.layers:
        for m in set(supernet.config.teacher_placement()):
            layer.mixers[m].requires_grad_(False)
    if supernet.config.final_logit_softcapping is not None:
        with pytest.raises(ValueError, match="final_logit_softcapping"):
            DistillPair(supernet, None, "self-fa", LossSpec())
        return
    online, _ = DistillPair(supernet, teacher, "online", LossSpec())(ids, weight, placement)
    self_fa, _ = DistillPair(supernet, None, "self-fa", LossSpec())(ids, weight, placement)
    assert online.item() > 1e-4
    assert self_fa.item() == pytest.approx(online.item(), rel=1e-5, abs=1e-7), name
