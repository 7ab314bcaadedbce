"""supernet: one checkpoint, many speeds.

Every decoder layer carries four trained token mixers (fa, swa, gdn, kda); a placement picks one per
layer, switchable at run time without reloading weights. Importing the package registers the model
with transformers' Auto classes (model_type "supernet").
"""
from supernet.cache import SupernetCache
from supernet.config import SupernetConfig
from supernet.model import SupernetForCausalLM, SupernetModel, register_auto_classes
from supernet.placement import MIXERS, Placement, PlacementError

register_auto_classes()

__all__ = [
    "MIXERS",
    "Placement",
    "PlacementError",
    "SupernetCache",
    "SupernetConfig",
    "SupernetForCausalLM",
    "SupernetModel",
]
