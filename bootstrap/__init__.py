"""The bootstrap node: first contact of a run, publisher of its manifest and run state, keeper of the
run's keys, audit log and metrics (``state.db``), and the owner's fleet view (``dashboard``, with
``alerts`` to a webhook).

``BootstrapNode`` is loaded lazily, so ``swarm keys`` / ``swarm run`` (which need only
``bootstrap.state``) start without importing hivemind and torch.

May import: core, shards, dht, net, peers. Not trainer or delegation (its siblings); imported by swarm.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["BootstrapNode", "build_manifest"]

if TYPE_CHECKING:
    from bootstrap.node import BootstrapNode, build_manifest


def __getattr__(name: str) -> Any:
    if name in __all__:
        from bootstrap import node

        return getattr(node, name)
    raise AttributeError(f"module 'bootstrap' has no attribute {name!r}")
