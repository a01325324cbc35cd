"""Pure model code: resolve a HF model, load a stage's layers or the trainer's parts from only their
tensors, and decide layer assignment. No networking and no asyncio here.

May import: core. Imported by: dht and everything above.
"""

from shards.assignment import choose_stage, stage_boundaries
from shards.families import FAMILIES, SUPPORTED_FAMILIES, Family, family_of, num_layers
from shards.local import LocalParts, causal_lm_loss, default_position_ids, load_local_parts
from shards.placement import Move, PlacedPeer, Span, choose_stages, should_move
from shards.source import ModelSource, resolve_model
from shards.stage import StageModule, load_stage
from shards.tiny import make_tiny_model, tiny_config
from core.types import LayerRange, StageIndex

__all__ = [
    "FAMILIES",
    "SUPPORTED_FAMILIES",
    "Family",
    "LayerRange",
    "LocalParts",
    "ModelSource",
    "StageIndex",
    "StageModule",
    "causal_lm_loss",
    "choose_stage",
    "default_position_ids",
    "family_of",
    "load_local_parts",
    "load_stage",
    "make_tiny_model",
    "num_layers",
    "resolve_model",
    "stage_boundaries",
    "tiny_config",
    "Move",
    "PlacedPeer",
    "Span",
    "choose_stages",
    "should_move",
]
