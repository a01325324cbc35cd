"""Joining a run: measure this machine (``measure``), read what placement needs from the DHT
(``claims``) and tell whether others can reach it (``reachability``)."""

__all__: list[str] = []
