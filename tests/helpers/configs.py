"""The tests' tiny supernet configs, in one place: pick the smallest that exercises what you test."""
from __future__ import annotations

from supernet.config import SupernetConfig


def tiny_config(**overrides) -> SupernetConfig:
    """4 layers, hidden 64, vocab 97, SWA window 6 (shorter than most test sequences)."""
    kwargs = dict(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, swa_window=6, max_position_embeddings=512,
    )
    kwargs.update(overrides)
    return SupernetConfig(**kwargs)


def vllm_config(num_layers: int = 4, vocab_size: int = 264, **overrides) -> SupernetConfig:
    """A 4-layer supernet that vLLM's CPU backend serves (head_dim 32: its attention minimum),
    with GVA in GDN. Untied embeddings: with tied ones a random model mostly repeats its input token."""
    kwargs = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        max_position_embeddings=4096,
        swa_window=8, gdn_num_heads=2, gdn_num_v_heads=4, gdn_head_dim=16, gdn_v_head_dim=16,
        kda_num_heads=2, kda_head_dim=16, kda_v_head_dim=16, linear_conv_size=4,
        bos_token_id=0, eos_token_id=1, pad_token_id=2, tie_word_embeddings=False, rope_theta=10000.0,
    )
    kwargs.update(overrides)
    return SupernetConfig(**kwargs)
