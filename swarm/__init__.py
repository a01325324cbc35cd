"""swarm: train and serve transformer language models on volunteer machines.

The public surface is loaded lazily, so ``import swarm.errors`` (used by every layer) stays cheap and
free of import cycles.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["SwarmModelForCausalLM", "CausalLMOutput", "connect", "errors", "__version__"]

__version__ = "0.1.0"

if TYPE_CHECKING:
    from swarm.model import CausalLMOutput, SwarmModelForCausalLM


def connect(bootstrap: str, model: str | None = None, **kwargs: Any) -> "SwarmModelForCausalLM":
    """Shortcut: ``SwarmModelForCausalLM.from_pretrained(model, initial_peers=[bootstrap], ...)``."""
    from swarm.model import SwarmModelForCausalLM

    return SwarmModelForCausalLM.from_pretrained(model, initial_peers=[bootstrap], **kwargs)


def __getattr__(name: str) -> Any:
    if name in ("SwarmModelForCausalLM", "CausalLMOutput"):
        from swarm import model

        return getattr(model, name)
    raise AttributeError(f"module 'swarm' has no attribute {name!r}")
