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
* The delta-rule kernels (GDN, KDA) are not traced: fla's Triton entry points are already
  `torch.compiler.disable`d, but the dispatch in front of them (lru_cached kernel lookup, Triton
  version check, the torch fallback's data-dependent `g > 0` check and its Python loop over
  chunks) is not. `disable_kernel_tracing` wraps `supernet.ops.delta_rule._dispatch` in
  `torch.compiler.disable`, so each linear mixer has one clean graph break around its kernel, on
  the CPU (where the test runs) as on CUDA. Projections, short convolutions, gates, norms, RoPE,
  MLP and residuals are compiled.
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


def disable_kernel_tracing() -> bool:
    """Keep Dynamo out of the delta-rule dispatch (fla on CUDA, the torch chunked path on CPU).

    Returns True when the dispatch is (now or already) excluded from tracing.
    """
    from supernet.ops import delta_rule

    fn = getattr(delta_rule, "_dispatch", None)
    if fn is None:
        return False
    if getattr(fn, "_supernet_not_traced", False):
        return True
    wrapped = torch.compiler.disable(fn)
    wrapped._supernet_not_traced = True  # type: ignore[attr-defined]
    delta_rule._dispatch = wrapped
    return True


# argument-less, lru_cached lookups in supernet.ops.attention that Dynamo would otherwise trace
# (it ignores lru_cache): `_flash_attn_func` tries `import flash_attn`, and a failed import inside
# a traced function is a graph break in every fa/swa layer on CUDA hosts without flash-attn
CONSTANT_LOOKUPS = (("supernet.ops.attention", "_flash_attn_func"), ("supernet.ops.attention", "_compiled_flex"))


def resolve_constant_lookups() -> list[str]:
    """Call each cached lookup once, eagerly, and replace it by a plain function returning that
    value, which Dynamo traces as a constant. Lookups that are missing, take arguments or fail
    are left alone. Returns the names replaced."""
    import importlib
    import inspect

    done = []
    for module_name, attr in CONSTANT_LOOKUPS:
        try:
            module = importlib.import_module(module_name)
        except Exception:  # noqa: BLE001
            continue
        fn = getattr(module, attr, None)
        if fn is None or getattr(fn, "_supernet_constant", False):
            done += [attr] if fn is not None else []
            continue
        if not hasattr(fn, "cache_info"):
            continue
        try:
            if inspect.signature(fn).parameters:
                continue
            value = fn()
        except Exception:  # noqa: BLE001 - leave it to the traced code
            continue

        def constant(_value=value):
            return _value

        constant._supernet_constant = True  # type: ignore[attr-defined]
        constant.cache_clear = fn.cache_clear  # type: ignore[attr-defined]
        setattr(module, attr, constant)
        done.append(attr)
    return done


def _inputs_require_grad(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and isinstance(output, torch.Tensor) and not output.requires_grad \
            and output.is_floating_point():
        output.requires_grad_(True)
    return output


def compile_layers(student: nn.Module, teacher: nn.Module | None = None, *, backend: str = "inductor",
                   suppress_errors: bool = True) -> None:
    """torch.compile each decoder layer of the student (and of the teacher) in place."""
    configure_dynamo(suppress_errors)
    disable_kernel_tracing()
    resolve_constant_lookups()
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
