"""Small supernet checkpoints made on the spot, for the serving tests (config: helpers/configs.py).

A byte-level tokenizer (every UTF-8 byte is a token) keeps the vocabulary tiny and needs no
download; weights are random (seeded) with decays and gates in sensible ranges, so every mixer
contributes to the output and different placements give different greedy continuations.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from supernet.config import SupernetConfig
from tests.helpers.configs import vllm_config

SPECIAL = ["<s>", "</s>", "<pad>"]
# a plain chat template, so that the servers of the tests answer /v1/chat/completions too
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def save_byte_tokenizer(out_dir: str | Path) -> int:
    """Write a byte-level BPE tokenizer without merges; returns its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIAL)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))
    return len(vocab)


def default_presets(num_layers: int) -> dict[str, list[str]]:
    """all-fa plus mixed presets that use every mixer somewhere; `near` differs from `balanced`
    only where balanced has SWA (a draft that is often, not always, right)."""
    cycle = ["fa", "swa", "gdn", "kda"]
    balanced = [cycle[i % 4] for i in range(num_layers)]
    return {
        "all-fa": ["fa"] * num_layers,
        "balanced": balanced,
        "near": ["fa" if m == "swa" else m for m in balanced],
        "fast": ["fa" if i == 0 else ("gdn" if i % 2 else "kda") for i in range(num_layers)],
        "linear": ["gdn" if i % 2 == 0 else "kda" for i in range(num_layers)],
    }


def parameter_shapes(config: SupernetConfig) -> dict[str, tuple[int, ...]]:
    """Every checkpoint tensor of a supernet with its shape, straight from the spec."""
    d, f = config.hidden_size, config.intermediate_size
    hq, hkv, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    w = config.linear_conv_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, d), "model.norm.weight": (d,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, d)
    gh, ghv, gk, gv = config.gdn_num_heads, config.gdn_num_v_heads, config.gdn_head_dim, config.gdn_v_head_dim
    kh, kk, kv = config.kda_num_heads, config.kda_head_dim, config.kda_v_head_dim
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                       p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                       p + "mlp.down_proj.weight": (d, f)})
        for m in ("fa", "swa"):
            q = f"{p}mixers.{m}."
            shapes.update({q + "q_proj.weight": (hq * hd, d), q + "k_proj.weight": (hkv * hd, d),
                           q + "v_proj.weight": (hkv * hd, d), q + "o_proj.weight": (d, hq * hd)})
            if config.attention_bias:
                shapes.update({q + "q_proj.bias": (hq * hd,), q + "k_proj.bias": (hkv * hd,),
                               q + "v_proj.bias": (hkv * hd,), q + "o_proj.bias": (d,)})
        q = f"{p}mixers.gdn."
        shapes.update({q + "q_proj.weight": (gh * gk, d), q + "k_proj.weight": (gh * gk, d),
                       q + "v_proj.weight": (ghv * gv, d), q + "q_conv1d.weight": (gh * gk, 1, w),
                       q + "k_conv1d.weight": (gh * gk, 1, w), q + "v_conv1d.weight": (ghv * gv, 1, w),
                       q + "a_proj.weight": (ghv, d), q + "A_log": (ghv,), q + "dt_bias": (ghv,),
                       q + "b_proj.weight": (ghv, d), q + "g_proj.weight": (ghv * gv, d),
                       q + "o_norm.weight": (gv,), q + "o_proj.weight": (d, ghv * gv)})
        q = f"{p}mixers.kda."
        shapes.update({q + "q_proj.weight": (kh * kk, d), q + "k_proj.weight": (kh * kk, d),
                       q + "v_proj.weight": (kh * kv, d), q + "q_conv1d.weight": (kh * kk, 1, w),
                       q + "k_conv1d.weight": (kh * kk, 1, w), q + "v_conv1d.weight": (kh * kv, 1, w),
                       q + "f_a_proj.weight": (kk, d), q + "f_b_proj.weight": (kh * kk, kk),
                       q + "A_log": (kh,), q + "dt_bias": (kh * kk,), q + "b_proj.weight": (kh, d),
                       q + "g_a_proj.weight": (kv, d), q + "g_b_proj.weight": (kh * kv, kv),
                       q + "o_norm.weight": (kv,), q + "o_proj.weight": (d, kh * kv)})
    return shapes


def random_state_dict(config: SupernetConfig, seed: int, std: float = 0.2) -> dict[str, torch.Tensor]:
    """Seeded weights: large enough that attention is not uniform; decays in a useful range."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in parameter_shapes(config).items():
        if name.endswith("A_log"):
            t = torch.empty(shape).uniform_(-1.5, 0.0, generator=gen)
        elif name.endswith("dt_bias"):
            t = torch.empty(shape).uniform_(-2.0, 0.0, generator=gen)
        elif name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif "conv1d" in name:
            t = 0.3 * torch.randn(shape, generator=gen)
        elif name.endswith(".bias"):
            t = 0.02 * torch.randn(shape, generator=gen)
        else:
            t = std * torch.randn(shape, generator=gen)
        out[name] = t.contiguous()
    return out


def make_checkpoint(out_dir: str | Path, config: SupernetConfig | None = None, seed: int = 0,
                    presets: dict[str, list[str]] | None = None) -> Path:
    """Save a random supernet checkpoint (config.json + model.safetensors) and the byte tokenizer."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = save_byte_tokenizer(out)
    config = config or vllm_config()
    if config.vocab_size < vocab:
        raise ValueError(f"vocab_size {config.vocab_size} < tokenizer size {vocab}")
    config.presets = presets if presets is not None else default_presets(config.num_hidden_layers)
    config.architectures = ["SupernetForCausalLM"]
    config.torch_dtype = "float32"
    config.save_pretrained(str(out))
    save_file(random_state_dict(config, seed), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 1}))
    return out
