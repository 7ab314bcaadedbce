"""Tensor parallelism of the served GDN/KDA layers: two real ranks (two processes, a gloo group,
vLLM's own column/row-parallel layers and all-reduce) against the unsharded layer.

Each rank loads the full checkpoint tensors and keeps its share of the heads; both run the same
steps (fresh, chunked and one-token prefills, decodes, and a switchable-mode step in which only
some rows use the mixer) on their own state pages. Must hold:
- the pages vLLM is told about are the rank's share: conv tail [C/2, W-1], matrix [HV/2, V, K];
- after o_proj's all-reduce both ranks hold the unsharded layer's output;
- each rank's pages hold exactly its heads' slice of the unsharded layer's pages.
Tolerances: a rank computes its heads with the same float32 operations as the unsharded layer but
in GEMMs of other shapes (other blockings) and the output is the sum of two partial o_proj
products, so results agree to float32 rounding of O(1) values accumulated over D = 64 and the
recurrence, the bound the layer tests use (atol 2e-5, rtol 1e-4); the two ranks' outputs come out
of one all-reduce and are equal bit for bit.
"""
from __future__ import annotations

import multiprocessing as mp
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.helpers.configs import vllm_config
from tests.helpers.served_layers import (PAGES, build_served, checkpoint_tensors, mixed_steps, run_rows_step,
                                         run_step, vllm_group)

KINDS = ["gdn", "kda"]
ATOL, RTOL = 2e-5, 1e-4
WORLD = 2


def _run_rank(rank: int, port: int, out: str) -> None:
    """One tensor-parallel rank: for each kind build the layer, run the steps, save outputs and pages."""
    results = {}
    with vllm_group(WORLD, rank, port) as cfg:
        for kind in KINDS:
            served = build_served(kind, cfg, checkpoint_tensors(kind))
            outputs = [run_step(served, meta, hidden) for meta, hidden in mixed_steps(vllm_config().hidden_size)]
            outputs.append(run_rows_step(served, vllm_config().hidden_size))  # switchable: some rows only
            results[kind] = {"outputs": outputs, "pages": served.kv_cache, "shape": served.get_state_shape(),
                             "heads": (served.h, served.hv)}
    torch.save(results, Path(out) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Both ranks' results, kind -> [rank 0, rank 1], from one spawn of two processes."""
    from supernet.serving.server import free_port

    out = tmp_path_factory.mktemp("tp")
    port = free_port()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_run_rank, args=(r, port, str(out))) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert codes == [0] * WORLD, f"rank exit codes {codes}"
    per_rank = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    return {kind: [per_rank[r][kind] for r in range(WORLD)] for kind in KINDS}


@pytest.fixture(scope="module")
def unsharded():
    """The same steps through the layer at tensor-parallel size 1."""
    out = {}
    with vllm_group(1) as cfg:
        for kind in KINDS:
            served = build_served(kind, cfg, checkpoint_tensors(kind))
            outputs = [run_step(served, meta, hidden) for meta, hidden in mixed_steps(vllm_config().hidden_size)]
            outputs.append(run_rows_step(served, vllm_config().hidden_size))
            out[kind] = {"outputs": outputs, "pages": served.kv_cache, "layer": served}
    return out


def _rank_slices(layer, rank: int):
    """Rows of the unsharded conv page and heads of its matrix that `rank` of WORLD holds."""
    hk, hvv = layer.h * layer.k_dim, layer.hv * layer.v_dim
    q, v = hk // WORLD, hvv // WORLD
    conv_rows = torch.cat([torch.arange(rank * q, (rank + 1) * q), hk + torch.arange(rank * q, (rank + 1) * q),
                           2 * hk + torch.arange(rank * v, (rank + 1) * v)])
    hv = layer.hv // WORLD
    return conv_rows, slice(rank * hv, (rank + 1) * hv)


@pytest.mark.slow  # two spawned ranks each import vLLM
@pytest.mark.parametrize("kind", KINDS)
def test_each_rank_reports_its_share_of_the_state_page(kind, ranks):
    from supernet.serving.linear_layers import linear_mixer_dims, linear_state_shapes

    full = linear_mixer_dims(vllm_config(), kind)
    for result in ranks[kind]:
        conv, ssm = result["shape"]
        assert (tuple(conv), tuple(ssm)) == linear_state_shapes(vllm_config(), kind, WORLD)
        assert tuple(conv) == (full["C"] // WORLD, full["W"] - 1)
        assert tuple(ssm) == (full["HV"] // WORLD, full["V"], full["K"])
        assert tuple(result["heads"]) == (full["H"] // WORLD, full["HV"] // WORLD)


@pytest.mark.slow  # two spawned ranks each import vLLM
@pytest.mark.parametrize("kind", KINDS)
def test_sharded_outputs_equal_the_unsharded_layer(kind, ranks, unsharded):
    for step, expect in enumerate(unsharded[kind]["outputs"]):
        r0, r1 = (ranks[kind][r]["outputs"][step] for r in range(WORLD))
        assert torch.equal(r0, r1), f"step {step}: the all-reduce left the ranks with different outputs"
        torch.testing.assert_close(r0, expect, atol=ATOL, rtol=RTOL)


@pytest.mark.slow  # two spawned ranks each import vLLM
@pytest.mark.parametrize("kind", KINDS)
def test_each_rank_pages_hold_its_heads_of_the_unsharded_pages(kind, ranks, unsharded):
    full_conv, full_ssm = unsharded[kind]["pages"]
    used = torch.tensor([3, 5, 7, 9, 11, 12])  # the pages mixed_steps writes; the others stay NaN
    for rank, result in enumerate(ranks[kind]):
        conv, ssm = result["pages"]
        rows, heads = _rank_slices(unsharded[kind]["layer"], rank)
        torch.testing.assert_close(conv[used], full_conv[used][:, rows], atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(ssm[used], full_ssm[used][:, heads], atol=ATOL, rtol=RTOL)
        unused = torch.tensor([p for p in range(PAGES) if p not in used.tolist()])
        assert torch.isnan(ssm[unused]).all()


def test_mamba_specs_are_per_rank():
    """What vLLM sizes its state pages from, at TP=2: half the heads of every served linear kind."""
    from supernet.serving.linear_layers import linear_state_shapes
    from supernet.serving.vllm_model import SupernetForCausalLM

    config = vllm_config()
    config.placement = ["fa", "swa", "gdn", "kda"]
    fake = SimpleNamespace(model_config=SimpleNamespace(hf_config=config, dtype=torch.float32),
                           parallel_config=SimpleNamespace(tensor_parallel_size=2))
    specs = SupernetForCausalLM.get_mamba_specs_from_config(fake)
    assert [s.shapes for s in specs] == [linear_state_shapes(config, k, 2) for k in ("gdn", "kda")]
    assert specs[0].shapes[1][0] == config.gdn_num_v_heads // 2


def test_heads_that_do_not_split_are_refused_in_one_line():
    from supernet.serving.linear_layers import linear_mixer_dims

    with pytest.raises(ValueError, match=r"gdn: 2 q/k heads do not split over tensor-parallel size 4"):
        linear_mixer_dims(vllm_config(), "gdn", 4)
