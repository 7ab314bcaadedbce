"""supernet: one checkpoint, many speeds.

Every decoder layer carries four trained token mixers (fa, swa, gdn, kda); a placement picks one per
layer, switchable at run time without reloading weights.

Imports are lazy (PEP 562) so that light users such as `placement optimize` do not pay for torch and
transformers. Touching `supernet.SupernetForCausalLM` / `supernet.SupernetConfig` (or importing
`supernet.model`) registers model_type "supernet" with transformers' Auto classes.
"""
from __future__ import annotations

from typing import Any

_LAZY = {
    "SupernetCache": "supernet.cache",
    "SupernetConfig": "supernet.config",
    "SupernetForCausalLM": "supernet.model",
    "SupernetModel": "supernet.model",
    "register_auto_classes": "supernet.model",
    "MIXERS": "supernet.layout",
    "Placement": "supernet.layout",
    "PlacementError": "supernet.layout",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'supernet' has no attribute {name!r}")
    import importlib

    module = importlib.import_module(_LAZY[name])
    if _LAZY[name] in ("supernet.config", "supernet.model"):
        importlib.import_module("supernet.model")  # registers the Auto classes
    return getattr(module, name)
