"""Serving a stage for training: the stage RPCs (``protocol``, ``service``), the compute (``executor``,
``worker``), activations peer to peer (``push``), replica averaging (``averaging``), checks of numbers
from other machines (``sanity``), the client stubs (``client``) and route planning (``routing``)."""

__all__: list[str] = []
