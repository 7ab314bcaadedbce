"""Served GDN/KDA layers outside a vLLM server: vLLM-shaped step metadata, a patched forward context,
random checkpoint weights. Shared by the layer tests (tests/test_serving_layers.py) and the
tensor-parallel ones (tests/test_serving_tp.py), which run the same steps on every rank."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from supernet.threads import torch_threads
from tests.helpers.checkpoints import random_state_dict
from tests.helpers.configs import vllm_config

PAGES = 40


def checkpoint_tensors(kind: str, config=None, seed: int = 7) -> dict[str, torch.Tensor]:
    """Layer 0's `kind` mixer tensors of a random checkpoint, names relative to the mixer."""
    config = config or vllm_config()
    prefix = f"model.layers.0.mixers.{kind}."
    return {k[len(prefix):]: v for k, v in random_state_dict(config, seed=seed).items() if k.startswith(prefix)}


def build_served(kind: str, cfg, weights: dict[str, torch.Tensor], config=None):
    """A served layer holding `weights` (full checkpoint tensors; each rank keeps its share) and
    state pages full of NaN (a page a fresh sequence must not read)."""
    from supernet.serving.linear_layers import SupernetLinearAttention

    config = config or vllm_config()
    prefix = f"model.layers.0.mixers.{kind}.{len(cfg.compilation_config.static_forward_context)}"
    served = SupernetLinearAttention(config, kind, prefix)
    for name, tensor in weights.items():
        assert served.load_checkpoint_tensor(name, tensor) is not None, name
    for m in served.modules():
        if hasattr(m, "quant_method"):
            m.quant_method.process_weights_after_loading(m)
    conv_shape, ssm_shape = served.get_state_shape()
    served.kv_cache = (torch.full((PAGES, *conv_shape), float("nan")), torch.full((PAGES, *ssm_shape), float("nan")))
    return served


def run_step(served, meta, hidden: torch.Tensor, tokens: torch.Tensor | None = None, row_filter=None) -> torch.Tensor:
    """One forward of the served layer with `meta` as its attention metadata; with `tokens` and
    `row_filter` (switchable mode) only those rows run it (`forward_rows`)."""
    from supernet.serving import linear_layers

    context = SimpleNamespace(attn_metadata={served.prefix: meta}, no_compile_layers={served.prefix: served})
    original = linear_layers.get_forward_context
    linear_layers.get_forward_context = lambda: context
    try:
        with torch.no_grad():
            return served(hidden) if tokens is None else served.forward_rows(hidden, tokens, row_filter)
    finally:
        linear_layers.get_forward_context = original


def plain_meta(rows: list[tuple[int, int, bool]], num_decodes: int):
    """rows: (tokens, page, has previous state) in vLLM's order, decodes first."""
    lens = torch.tensor([r[0] for r in rows])
    qsl = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)]).int()
    return SimpleNamespace(
        spec_sequence_masks=None, non_spec_query_start_loc=qsl,
        non_spec_state_indices_tensor=torch.tensor([r[1] for r in rows], dtype=torch.int32),
        has_initial_state=torch.tensor([r[2] for r in rows]), num_decodes=num_decodes,
        num_prefills=len(rows) - num_decodes, num_prefill_tokens=int(lens[num_decodes:].sum()),
        num_actual_tokens=int(lens.sum()))


def mixed_steps(hidden_size: int, seed: int = 0) -> list[tuple[object, torch.Tensor]]:
    """Three steps: four fresh prefills; three decodes, a continuing (chunked) prefill, a fresh
    prefill and a one-token prompt; then every sequence decodes. (metadata, hidden [N, D]) each."""
    gen = torch.Generator().manual_seed(seed)
    page = {"a": 3, "b": 5, "c": 7, "d": 9, "e": 11, "f": 12}
    first = {"a": 5, "b": 9, "c": 3, "d": 6}
    second = {"a": 1, "b": 1, "c": 1, "d": 7, "e": 11, "f": 1}
    steps = [(plain_meta([(n, page[s], False) for s, n in first.items()], 0),
              torch.randn(sum(first.values()), hidden_size, generator=gen))]
    steps.append((plain_meta([(n, page[s], s in first) for s, n in second.items()], 3),
                  torch.randn(sum(second.values()), hidden_size, generator=gen)))
    steps.append((plain_meta([(1, page[s], True) for s in second], 6), torch.randn(len(second), hidden_size, generator=gen)))
    return steps


def vllm_group(world_size: int = 1, rank: int = 0, port: int | None = None):
    """Context manager: a vLLM config and a tensor-parallel group of `world_size` ranks over gloo
    (what vLLM's parallel linear layers need to exist and to all-reduce)."""
    from contextlib import contextmanager

    @contextmanager
    def group():
        from vllm.config import VllmConfig, set_current_vllm_config
        from vllm.distributed import destroy_distributed_environment, destroy_model_parallel
        from vllm.distributed import init_distributed_environment, initialize_model_parallel

        from supernet.serving.server import free_port

        cfg = VllmConfig()
        cfg.model_config = SimpleNamespace(dtype=torch.float32, is_moe=False)
        with torch_threads(1), set_current_vllm_config(cfg):
            init_distributed_environment(world_size=world_size, rank=rank, local_rank=rank, backend="gloo",
                                         distributed_init_method=f"tcp://127.0.0.1:{port or free_port()}")
            initialize_model_parallel(world_size)
            try:
                yield cfg
            finally:
                destroy_model_parallel()
                destroy_distributed_environment()

    return group()


def run_rows_step(served, hidden_size: int, seed: int = 1) -> torch.Tensor:
    """After `mixed_steps`: one decode step of its six sequences in which (switchable mode) only
    rows 0, 2 and 4 use this mixer (`forward_rows`); returns their outputs [3, D]."""
    from supernet.serving import linear_layers

    page = [3, 5, 7, 9, 11, 12]
    meta = plain_meta([(1, p, True) for p in page], 6)
    hidden = torch.randn(6, hidden_size, generator=torch.Generator().manual_seed(seed))
    keep = torch.tensor([True, False, True, False, True, False])
    return run_step(served, meta, hidden, torch.tensor([0, 2, 4]), linear_layers.RowFilter(keep, torch.ones(6, dtype=torch.long)))
