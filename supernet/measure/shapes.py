"""The model and layer shapes the GPU benchmarks measure, for the benchmarks and their tests."""
from __future__ import annotations

from supernet.config import SupernetConfig

# Linear-mixer layer shapes: SmolLM2-135M's (hidden 576, 9 heads x 64) and FACTS.md's (16 x 128, hidden 2048).
LINEAR_SHAPES = {
    "smollm2": dict(hidden=576, heads=9, head_dim=64),
    "facts-16x128": dict(hidden=2048, heads=16, head_dim=128),
}


def smollm2_config(**kw) -> SupernetConfig:
    """SmolLM2-135M's dimensions as a supernet config (30 layers, 9 x 64 heads, 3 KV heads)."""
    base = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0, swa_window=4096,
                max_position_embeddings=65536)
    base.update(kw)
    return SupernetConfig(**base)


def linear_config(hidden: int, heads: int, head_dim: int) -> SupernetConfig:
    """A one-layer config holding a linear-mixer layer of the given shape."""
    return SupernetConfig(
        vocab_size=256, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=1,
        num_attention_heads=heads, num_key_value_heads=heads, head_dim=head_dim,
        max_position_embeddings=65536,
    )
