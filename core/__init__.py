"""The bottom layer: what every other package shares and nothing of the project's own.

``core.errors`` (the one error tree), ``core.config`` (the one config tree: ``config.toml`` and
``SWARM_*``), ``core.loop`` (the asyncio lifecycle: one loop per process, bounded shutdown),
``core.types`` (ids and value objects: ``StageIndex``, ``PeerId``, ``LayerRange``) and
``core.messages`` (the frozen message base and ``PROTOCOL_VERSION``).

May import: nothing of the project (third-party libraries only). Everything above may import it.
"""

__all__: list[str] = []
