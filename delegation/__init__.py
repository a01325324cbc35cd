"""Delegation: a weak machine takes part through a strong peer (session protocol over hivemind P2P).

Not built yet: it is its own issue ("Delegation: a weak machine takes part through a strong peer").
The package exists so the layout and the import rule (swarm -> bootstrap, delegation -> peers) are
fixed from the start; it exports nothing until that issue lands.
"""

__all__: list[str] = []
