"""What the parts of a ``RemotePipeline`` hand each other: the trace a training forward leaves for
its backward, the backwards a replica holds in the open step, and the connections and bounds every
part calls through (``Wiring``)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from dht.schemas import Manifest
from peers.training.client import StageClient, StageInputs
from peers.training.routing import Hop
from trainer.faults import FaultPolicy

__all__ = ["HopTrace", "Trace", "Contribution", "Wiring"]


@dataclass
class HopTrace:
    hop: Hop
    request_id: str
    inputs: StageInputs | None  # None: pushed there peer to peer (``trainer.pushing`` rebuilds it)
    seed: int


@dataclass
class Trace:
    """What a training forward left behind for its backward."""

    hops: list[HopTrace] = field(default_factory=list)
    num_samples: int = 0
    grad: torch.Tensor | None = None  # of the last stage's output, once the backward has started

    @property
    def pushed(self) -> bool:
        """Some hop's input went peer to peer: the trainer does not hold it."""
        return any(hop.inputs is None for hop in self.hops)


@dataclass
class Contribution:
    """A backward that a replica has accumulated in the open step: enough to replay it elsewhere
    (``grad_output`` None: a pushed one, rebuilt from its ``trace``)."""

    hop: HopTrace
    grad_output: torch.Tensor | None
    num_samples: int
    trace: Trace | None = None


@dataclass
class Wiring:
    """The run, the client and the bounds every part of one pipeline uses, held once: a client or a
    policy set on the pipeline is the one all its parts call with. ``timings``: wall seconds spent
    reading the DHT's records (``dht``), applying steps (``averaging``) and committing them
    (``commit``), for benchmarks/train_throughput.py."""

    manifest: Manifest
    client: StageClient
    policy: FaultPolicy
    timings: Counter[str] = field(default_factory=Counter)
