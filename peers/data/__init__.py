"""Data shards leased to trainers: the ``swarm.data.*`` messages (``protocol``) and the trainer's stub
(``client``); the bootstrap serves them (``bootstrap.data``)."""

from peers.data.client import DataClient, find_data_service
from peers.data.protocol import Lease, Position
from peers.data.spec import spec_from_settings

__all__ = ["DataClient", "Lease", "Position", "find_data_service", "spec_from_settings"]
