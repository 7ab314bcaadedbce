"""`train.compile`: torch.compile of every decoder layer (student and teacher), made safe for
placements that change every step.

What goes wrong with a plain `layer.compile()` and what this module does about it:
* Dynamo keeps its compiled graphs per *code object*, so the 30 student layers share one cache for
  `SupernetDecoderLayer.forward`, guarded on the mixer name (4 choices) and on whether the layer's
  input requires grad. That input requires grad after the first trainable mixer of a placement and
  not before it (the embeddings are frozen), so the same layer code meets 8 variants in training
  alone, and evaluation (no grad, another batch size) adds more: past `recompile_limit` (8)
  Dynamo silently runs the layer eagerly, and a variant first met in the middle of a timed run
  compiles there. Here: the embedding output is marked as requiring grad in training (the
  parameter gradients are unchanged; backward also forms the input gradient of the layers before
  the first trainable mixer, about 1/30 of a forward per such layer), so training meets exactly
  one variant per mixer, all of them in the first step; shapes are static (`dynamic=False`); the
  recompile limit is raised as a safety margin; and evaluation runs eagerly
  (`eager_region`), so it neither recompiles nor is timed with compile work in it.
* The delta-rule kernels (GDN, KDA) are not traced: `supernet.ops.delta_rule._dispatch` is
  `torch.compiler.disable`d, so each linear mixer has one clean graph break around its kernel, on
  the CPU (where the test runs) as on CUDA, and supernet.ops.attention resolves flash-attn at
  import. Projections, short convolutions, gates, norms, RoPE, MLP and residuals are compiled.
* A compiler failure on one frame falls back to eager for that frame (`suppress_errors`) instead
  of ending a run; `compile_stats` reports how many graphs were compiled, so a benchmark can say
  whether compilation happened while it was timing.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

RECOMPILE_LIMIT = 64


def configure_dynamo(suppress_errors: bool = True) -> None:
    """Raise the per-code-object recompile limit (the name changed across torch versions)."""
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(int(getattr(cfg, name)), RECOMPILE_LIMIT))
    for name in ("accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(int(getattr(cfg, name)), 8 * RECOMPILE_LIMIT))
    cfg.suppress_errors = suppress_errors


def _inputs_require_grad(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and isinstance(output, torch.Tensor) and not output.requires_grad \
            and output.is_floating_point():
        output.requires_grad_(True)
    return output


def compile_layers(student: nn.Module, teacher: nn.Module | None = None, *, backend: str = "inductor",
                   suppress_errors: bool = True) -> None:
    """torch.compile each decoder layer of the student (and of the teacher) in place."""
    configure_dynamo(suppress_errors)
    # one compiled variant per mixer: every student layer input requires grad in training
    student.get_input_embeddings().register_forward_hook(_inputs_require_grad)
    layers = list(student.model.layers) + (list(teacher.model.layers) if teacher is not None else [])
    for layer in layers:
        layer.compile(backend=backend, dynamic=False)


@contextlib.contextmanager
def eager_region(enabled: bool = True) -> Iterator[None]:
    """Run compiled modules eagerly inside (evaluation: other shapes, no grad, not worth compiling)."""
    if not enabled or not hasattr(torch.compiler, "set_stance"):
        yield
        return
    with torch.compiler.set_stance("force_eager"):
        yield


def compile_stats() -> dict[str, int]:
    """Dynamo's counters so far in this process: graphs compiled, graph breaks, frames that failed
    to compile (run eagerly), and frames left eager because they hit the recompile limit."""
    from torch._dynamo.utils import counters

    frames = counters["frames"]
    return {"unique_graphs": int(counters["stats"].get("unique_graphs", 0)),
            "graph_breaks": int(sum(counters["graph_break"].values())),
            "failed_frames": int(frames.get("total", 0) - frames.get("ok", 0)),
            "recompile_limit_hits": int(sum(v for k, v in counters["unimplemented"].items()
                                            if "recompile limit" in k.lower() or "cache_size_limit" in k))}
