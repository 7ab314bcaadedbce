"""A converted non-Llama teacher served by a real vLLM CPU server gives the reference model's greedy tokens.

Gemma 3 is the family that differs most from Llama (sandwich norms, per-head q/k norms, (1 + w)
norm weights folded at conversion, sqrt(hidden) embedding scale, query_pre_attn_scalar, GELU-tanh
MLP, final logit softcap, sliding and global layers with their own RoPE), so one server start
covers every difference the vLLM model mirrors except OLMo 2's post-norms / whole-projection q/k
norms. The preset is hybrid: swa on a sliding layer, fa on a global one (linear RoPE scaling),
then gdn and kda, whose output gates are opened with random weights (a fresh conversion leaves
GDN silent), so every mixer shapes the output.
"""
from __future__ import annotations

import pytest
import torch

from supernet.serving.server import VllmServer, cpu_env, free_port, vllm_command
from supernet.generation import greedy_tokens
from supernet.threads import torch_threads
from tests.helpers.checkpoints import save_byte_tokenizer

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

HYBRID = ["swa", "fa", "gdn", "kda"]
MAX_TOKENS = 16
PROMPTS = [
    [0] + list(b"The quick brown fox jumps over the lazy dog"),
    [0] + list(b"def main():\n    return 42"),
]
VLLM_ARGS = ["--max-model-len", "256", "--dtype", "float32", "--enforce-eager", "--max-num-seqs", "4"]


def _gemma3_supernet():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from supernet.convert import supernet_from_teacher

    torch.manual_seed(7)
    config = Gemma3TextConfig(
        vocab_size=264, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32,  # vLLM's CPU attention needs head_dim >= 32
        query_pre_attn_scalar=24, sliding_window=6, final_logit_softcapping=3.0, tie_word_embeddings=False,
        max_position_embeddings=512, bos_token_id=0, eos_token_id=1, pad_token_id=2,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
    )
    teacher = Gemma3ForCausalLM(config).float().eval()
    with torch.no_grad():
        for name, p in teacher.named_parameters():
            if "norm" in name:
                p.copy_(0.3 * torch.randn_like(p))  # Gemma stores w of (1 + w)
            elif p.dim() == 2:
                p.copy_(0.15 * torch.randn_like(p))  # sharper than the 0.02 init: tokens vary
    model = supernet_from_teacher(teacher)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mixers["gdn"].g_proj.weight.normal_(0, 0.2)
            layer.mixers["kda"].g_b_proj.weight.normal_(0, 0.2)
    model.config.presets["hybrid"] = list(HYBRID)
    return teacher, model


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from supernet.convert import save_checkpoint

    teacher, model = _gemma3_supernet()
    out = tmp_path_factory.mktemp("gemma3") / "ckpt"
    save_checkpoint(model, out)
    save_byte_tokenizer(out)
    with torch_threads(1), torch.no_grad():
        ids = torch.tensor([PROMPTS[0]])
        assert (teacher(ids).logits - model(ids, placement="teacher").logits).abs().max() <= 1e-4
        expected = [greedy_tokens(model, torch.tensor([p]), HYBRID, MAX_TOKENS) for p in PROMPTS]
        teacher_tokens = greedy_tokens(model, torch.tensor([PROMPTS[0]]), "teacher", MAX_TOKENS)
    assert expected[0] != teacher_tokens  # the hybrid is not the teacher: the test can tell them apart
    port = free_port()
    work = tmp_path_factory.mktemp("vllm")
    server = VllmServer(vllm_command(out, port=port, preset="hybrid", extra=VLLM_ARGS), cpu_env(work),
                        work / "server.log", "127.0.0.1", port).start(timeout=420)
    yield server, expected
    server.stop()


def test_hybrid_gemma3_preset_served_by_vllm_matches_reference(served):
    from openai import OpenAI

    server, expected = served
    client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    for prompt, want in zip(PROMPTS, expected):
        r = client.completions.create(model="supernet", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                      extra_body={"return_token_ids": True, "ignore_eos": True})
        assert list(r.choices[0].token_ids) == want, prompt
