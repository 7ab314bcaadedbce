"""The gated delta rule (GDN: one decay per head; KDA: one decay per key channel) in pure torch,
and the dispatch that picks fla's Triton kernels on CUDA. Split as fla splits its ops: `recurrent.py`
(token by token, the reference), `chunk.py` (chunked), `dispatch.py` (the kernel choice and the
public entry points), `common.py` (checks and gate formulas they share).

Layout follows fla: q, k [B, T, H, K]; v [B, T, HV, V] with HV a multiple of H (value head j reads
q/k head j // (HV // H)); beta [B, T, HV]; g (log-space decay, <= 0) [B, T, HV] for GDN or
[B, T, HV, K] for KDA; states [B, HV, K, V] in fp32. Per head and token:

    S <- diag(exp(g_t)) S                         (decay)
    S <- S + beta_t k_t (v_t - S^T k_t)^T         (delta-rule write)
    o_t = scale * S^T q_t                         (read)

Torch implementations:
- `recurrent_delta_rule`: token by token; the reference, and the cheapest path for a few tokens.
- `decode_step_vk`: one token per sequence on states in vLLM's page layout, in place (serving).
- `chunk_delta_rule`: chunks of C tokens. Inside a chunk the writes are solved all at once with the
  WY/UT form (one unit-lower-triangular inverse), so the only sequential loop is over T/C chunks
  and everything inside a chunk is batched matmuls: what makes CPU training affordable.
All accumulate in fp32 and return `o` in v's dtype.

Dispatch (`gated_delta_rule`, `kda_rule`): on CUDA with fla importable, fla's `chunk_*` kernels
(training, prefill) or `fused_recurrent_*` (short inference calls); otherwise the torch paths.

Raw gates: with `A_log` given, `g` holds the raw gate input and the log decay is
-exp(A_log) * softplus(g + dt_bias) (`gate_decay`); with `beta_logits`, beta holds logits and goes
through a sigmoid. For CUDA inference fla computes both inside its kernels (no fp32 gate tensors in
memory, no separate elementwise kernels); elsewhere (CPU, training, torch.compile, or the fused paths
switched off: supernet.ops.fla_backend) they are computed in torch before the kernel, where
torch.compile fuses them into the layer's graph.
"""
from __future__ import annotations

from supernet.ops.delta_rule.chunk import chunk_delta_rule
from supernet.ops.delta_rule.common import gate_decay, l2_normalize
from supernet.ops.delta_rule.dispatch import (FLA_RECURRENT_MAX_T, TORCH_RECURRENT_MAX_T, delta_rule_per_token_states,
                                              fla_available, gated_delta_rule, kda_rule, torch_delta_rule)
from supernet.ops.delta_rule.recurrent import decode_step_vk, recurrent_delta_rule

__all__ = ["FLA_RECURRENT_MAX_T", "TORCH_RECURRENT_MAX_T", "chunk_delta_rule", "decode_step_vk", "delta_rule_per_token_states",
           "fla_available", "gate_decay", "gated_delta_rule", "kda_rule", "l2_normalize", "recurrent_delta_rule", "torch_delta_rule"]
