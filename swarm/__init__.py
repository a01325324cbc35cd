"""swarm: train and serve transformer language models on volunteer machines.

The public face, the top layer (see the layering at the top of docs/design.md): ``swarm.connect``,
``SwarmModelForCausalLM`` (from ``trainer.model``), ``swarm.errors``, the CLI (``swarm.cli``), the
OpenAI-compatible API (``swarm.api``, ``swarm.serving``), the terminal views, ``swarm.data``,
``swarm.train``, and training on a dataset from any loop: ``swarm.AssignedBatches`` over a
``swarm.DatasetSpec`` (``swarm.assigned``, ``swarm.text_data``, ``swarm.evaluation``). Nothing imports it.

May import: core, shards, dht, net, peers, trainer, delegation, bootstrap.

The public surface is loaded lazily, so ``import swarm`` stays cheap (no torch, no hivemind).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["SwarmModelForCausalLM", "CausalLMOutput", "AssignedBatches", "DatasetSpec", "connect", "errors",
           "__version__"]

__version__ = "0.1.0"

if TYPE_CHECKING:
    from dht.schemas import DatasetSpec
    from swarm.assigned import AssignedBatches
    from trainer.model import CausalLMOutput, SwarmModelForCausalLM


def connect(bootstrap: str, model: str | None = None, **kwargs: Any) -> "SwarmModelForCausalLM":
    """Shortcut: ``SwarmModelForCausalLM.from_pretrained(model, initial_peers=[bootstrap], ...)``."""
    from trainer.model import SwarmModelForCausalLM

    return SwarmModelForCausalLM.from_pretrained(model, initial_peers=[bootstrap], **kwargs)


def __getattr__(name: str) -> Any:
    if name in ("SwarmModelForCausalLM", "CausalLMOutput"):
        from trainer import model

        return getattr(model, name)
    if name == "AssignedBatches":
        from swarm.assigned import AssignedBatches

        return AssignedBatches
    if name == "DatasetSpec":
        from dht.schemas import DatasetSpec

        return DatasetSpec
    raise AttributeError(f"module 'swarm' has no attribute {name!r}")
