"""Helpers for tests: an in-process local swarm over real hivemind on loopback."""

from __future__ import annotations

import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

from bootstrap.node import BootstrapNode
from delegation.delegator import Delegator
from delegation.service import serve_delegations
from delegation.sessions import DelegateSessions
from peers.server import Peer
from core.loop import LoopThread
from core.config import load_settings
from trainer.model import SwarmModelForCausalLM

__all__ = ["LocalSwarm", "train_steps", "reference_losses", "plain_loop", "local_adamw", "max_difference", "Webhook"]


class LocalSwarm:
    """A bootstrap and ``num_peers`` peers in this process (each with its own DHT process and p2pd),
    driven from a background event loop. Peers claim stages by themselves unless ``pin_stages``."""

    def __init__(self, model_dir: Path, *, state_dir: Path, num_stages: int = 3, num_peers: int = 3,
                 run_id: str = "test", pin_stages: bool = True, peer_settings: dict | None = None,
                 data: dict | None = None, **bootstrap: object):
        self.model_dir, self.state_dir = model_dir, state_dir
        self.num_stages, self.num_peers, self.run_id = num_stages, num_peers, run_id
        self.pin_stages = pin_stages
        self.peer_settings = peer_settings or {}
        self.bootstrap_overrides = bootstrap
        self.data_settings = data or {}  # the bootstrap's [data] section (the run's dataset, lease TTL)
        self.loop = LoopThread("test-swarm")
        self.bootstrap: BootstrapNode | None = None
        self.peers: list[Peer] = []
        self.delegators: list[Delegator] = []
        self.delegate_sessions: list[DelegateSessions] = []

    def start(self) -> None:
        settings = load_settings(
            run_id=self.run_id, state_dir=self.state_dir, network={"host": "127.0.0.1"},
            bootstrap={"model": str(self.model_dir), "num_stages": self.num_stages, "open": True,
                       "dashboard_port": 0,
                       **self.bootstrap_overrides},
            data=self.data_settings,
        )
        self.bootstrap = BootstrapNode(settings)
        self.loop.run(self.bootstrap.start(), timeout=60)
        for i in range(self.num_peers):
            self.add_peer(stage=i % self.num_stages if self.pin_stages else None)

    def add_peers_at_once(self, count: int, **peer: object) -> list[Peer]:
        """``count`` unpinned peers whose starts run at the same moment (volunteers pasting the line
        together): placement decides where each goes."""
        peers = [self._new_peer(None, None, None, None, **peer) for _ in range(count)]

        async def start_all() -> None:
            await asyncio.gather(*(p.start() for p in peers))

        self.loop.run(start_all(), timeout=180)
        return peers

    def add_peer(self, stage: int | None = None, key: str | None = None, *, initial_peers: list[str] | None = None,
                 delegation: dict | None = None, **peer: object) -> Peer:
        """Each peer has a state dir of its own (``peer<n>``), as on separate machines; it joins
        through ``initial_peers`` (default: the bootstrap). ``delegation``: its ``delegation.*`` settings
        (with ``accept``, the test registers the delegation RPCs with ``accept_delegations``)."""
        peer = self._new_peer(stage, key, initial_peers, delegation, **peer)
        self.loop.run(peer.start(), timeout=120)
        return peer

    def _new_peer(self, stage: int | None, key: str | None, initial_peers: list[str] | None,
                  delegation: dict | None, **peer: object) -> Peer:
        settings = load_settings(
            run_id=self.run_id, key=key,
            network={"host": "127.0.0.1", "initial_peers": initial_peers or self.initial_peers},
            state_dir=self.state_dir / f"peer{len(self.peers)}",
            peer={"stage": stage, "threads": 1, **self.peer_settings, **peer}, delegation=delegation or {},
        )
        peer = Peer(settings)
        self.peers.append(peer)
        return peer

    def accept_delegations(self, peer: Peer, **delegation: object) -> DelegateSessions:
        """Make ``peer`` a delegate with its ``delegation`` settings (``delegation`` overrides them); its
        sessions end when the swarm stops."""
        settings = peer.settings.delegation.model_copy(update=delegation)
        sessions = self.loop.run(serve_delegations(peer.delegate, settings), timeout=30)
        self.delegate_sessions.append(sessions)
        return sessions

    def add_delegator(self, delegate_to: list[Peer], token: str, *, key: str | None = None, start: bool = True,
                      **delegation: object) -> Delegator:
        """A weak machine with a state dir of its own that has ``delegate_to`` (tried in order) serve its stage."""
        settings = load_settings(
            run_id=self.run_id, key=key, network={"host": "127.0.0.1", "initial_peers": self.initial_peers},
            state_dir=self.state_dir / f"delegator{len(self.delegators)}",
            delegation={"delegate_to": [p.maddrs[0] for p in delegate_to], "token": token, **delegation},
        )
        delegator = Delegator(settings)
        self.delegators.append(delegator)
        if start:
            self.loop.run(delegator.start(), timeout=60)
        return delegator

    @property
    def initial_peers(self) -> list[str]:
        return self.bootstrap.maddrs

    def client(self, **kwargs) -> SwarmModelForCausalLM:
        return SwarmModelForCausalLM.from_pretrained(
            str(self.model_dir), initial_peers=self.initial_peers, run_id=self.run_id, **kwargs
        )

    def stop(self) -> None:
        """Stop everything; a second call does nothing (a test may stop a swarm before it ends)."""
        if self.loop is None:
            return
        for delegator in self.delegators:
            self.loop.run(delegator.stop(), timeout=60)
        for sessions in self.delegate_sessions:
            self.loop.run(sessions.stop(), timeout=60)
        for peer in self.peers:
            self.loop.run(peer.stop(), timeout=60)
        if self.bootstrap is not None:
            self.loop.run(self.bootstrap.stop(), timeout=60)
        self.loop.stop()
        self.loop = None


def train_steps(model, steps: int) -> None:
    """``steps`` AdamW steps of a swarm client with the run's settings, on small seeded batches."""
    settings = model.manifest.optimizer
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    plain_loop(model, optimizer, (torch.randint(0, 8, (4, 12), generator=torch.Generator().manual_seed(step))
                                  for step in range(steps)))


def plain_loop(model, optimizer, batches, *, autocast: torch.dtype | None = None) -> list[float]:
    """The README's loop (``loss.backward(); optimizer.step()``) over ``batches`` (labels = inputs, on
    the model's device); ``autocast``: the forward under that dtype on the model's device. The losses."""
    device = next(model.parameters()).device
    losses = []
    for ids in batches:
        ids = ids.to(device)
        with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def local_adamw(model_dir, batches, *, lr: float, dtype: torch.dtype = torch.float32,
                device: str = "cpu") -> dict[str, torch.Tensor]:
    """transformers' model trained locally on ``batches`` by AdamW (``lr``, betas, eps and weight decay
    as a run's defaults) on ``device``, under ``dtype`` autocast unless float32 (float32 masters either
    way): the yardstick a swarm run's exported weights are held to. Its final weights, on the host."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    plain_loop(model, optimizer, batches, autocast=None if dtype == torch.float32 else dtype)
    return {name: t.cpu() for name, t in model.state_dict().items()}


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest difference between two state dicts with the same names."""
    assert a.keys() == b.keys()
    return max((a[name].float() - b[name].float()).abs().max().item() for name in a)


def reference_losses(model_dir, batches, *, lr: float) -> list[float]:
    """The losses of transformers' own model trained locally on ``batches`` with AdamW (``lr``,
    torch's default weight decay 0.01): what a swarm run of the same batches must follow."""
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(model_dir)
    optimizer = torch.optim.AdamW(reference.parameters(), lr=lr)
    losses = []
    for ids in batches:
        loss = reference(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


class Webhook:
    """An HTTP server on 127.0.0.1 that keeps every JSON body POSTed to it."""

    def __init__(self) -> None:
        received = self.received = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, name="webhook", daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)
