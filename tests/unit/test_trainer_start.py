"""``SwarmModelForCausalLM.from_pretrained``: its keyword settings go through ``TrainerSettings``
(a bad one is named), and a start that fails part-way stops everything it had started, in reverse
order. The network parts are fakes that write down when they are stopped."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

import trainer.model as model_module
import trainer.run_link as run_link_module
from dht.schemas import Manifest
from shards.assignment import stage_boundaries
from shards.source import resolve_model
from core.loop import LoopThread
from core.errors import ConfigError, PeerUnavailable
from trainer.model import SwarmModelForCausalLM
from trainer.pipeline import FaultPolicy

PEERS = ["/ip4/127.0.0.1/tcp/1/p2p/QmUnused"]


@pytest.mark.parametrize("overrides, policy, words", [
    ({"timeout": 0}, None, "setting trainer.timeout: Input should be greater than 0"),
    ({"route_wait": -1.0}, None, "setting trainer.route_wait"),
    ({"microbatch_size": 0}, None, "setting trainer.microbatch_size"),
    ({"push": "sometimes"}, None, "setting trainer.push"),
    ({"spot_check_rate": 2.0}, None, "setting trainer.spot_check_rate"),
    ({"timeuot": 60.0}, None, "setting trainer.timeuot: Extra inputs are not permitted"),
    ({"checkpoint_every": 5}, None, "trainer.checkpoint_every is the training loop's"),
    ({"ban_time": 5.0}, FaultPolicy(), "trainer.ban_time is given both as a keyword and by policy="),
])
def test_a_bad_setting_is_named_before_anything_starts(monkeypatch, overrides, policy, words):
    monkeypatch.setattr(model_module, "LoopThread", _refuse_to_start)
    with pytest.raises(ConfigError, match=words):
        SwarmModelForCausalLM.from_pretrained(initial_peers=PEERS, policy=policy, **overrides)


def _refuse_to_start(*_args, **_kwargs):
    raise AssertionError("a bad setting must be refused before anything starts")


@pytest.mark.parametrize("failing, stopped", [
    ("manifest", ["dht", "runner"]),
    ("model", ["auth", "dht", "runner"]),
    ("averager", ["coordinator", "p2p", "auth", "dht", "runner"]),
    # the model owns everything by then: its close() stops it, in its own order
    ("catch up", ["watcher", "auth", "averager", "coordinator", "dht", "p2p", "runner"]),
])
def test_a_failed_start_stops_everything_it_started(monkeypatch, model_factory, failing, stopped):
    source = resolve_model(str(model_factory("gpt2", num_layers=2, hidden_size=32)))
    manifest = Manifest(run_id="unit", model=str(source.root), num_layers=2, stages=stage_boundaries(2, 2),
                        config_hash="another model" if failing == "model" else source.config_hash)
    events = _fake_network(monkeypatch, manifest, failing)
    with pytest.raises((PeerUnavailable, ConfigError)):
        SwarmModelForCausalLM.from_pretrained(initial_peers=PEERS, run_id="unit")
    assert events == stopped


def test_a_start_that_works_stops_nothing_until_closed(monkeypatch, model_factory):
    source = resolve_model(str(model_factory("gpt2", num_layers=2, hidden_size=32)))
    manifest = Manifest(run_id="unit", model=str(source.root), num_layers=2, stages=stage_boundaries(2, 2),
                        config_hash=source.config_hash)
    events = _fake_network(monkeypatch, manifest, failing=None)
    model = SwarmModelForCausalLM.from_pretrained(initial_peers=PEERS, run_id="unit", timeout=7.0, push=False)
    assert events == [] and model.pipeline.client.timeout == 7.0 and not model.pipeline.push
    model.close()
    assert events == ["watcher", "auth", "averager", "coordinator", "dht", "p2p", "runner"]


def _fake_network(monkeypatch, manifest: Manifest, failing: str | None) -> list[str]:
    """Replace every part ``from_pretrained`` starts with one that notes its stop in the returned
    list; ``failing`` names the step that raises."""
    events: list[str] = []

    def fail_at(step: str) -> None:
        if failing == step:
            raise PeerUnavailable(f"injected: {step}")

    async def note(what: str) -> None:
        events.append(what)

    class Runner(LoopThread):
        def stop(self) -> None:
            if "runner" not in events:
                events.append("runner")
            super().stop()

    class DHT:
        peer_id, dht = "trainer", None

        @staticmethod
        def create_client(*_args, **_kwargs):
            return DHT()

        async def wait_manifest(self, timeout):
            fail_at("manifest")
            return manifest

        async def trainer_records(self):
            fail_at("catch up")
            return []

        def shutdown(self):
            events.append("dht")

    class Transport:
        def close(self):  # its data channel's connections and its p2p
            return note("p2p")

    auth = SimpleNamespace(stop=lambda: note("auth"), start=lambda: None, follow=None, token=None,
                           token_text=lambda: "token")

    class Coordinator:
        defer_commits = True

        def __init__(self, dht, target, me):
            self.me = me

        async def start(self, step):
            return None

        async def leave(self):
            events.append("coordinator")

    class Averager:
        def __init__(self, *args, **kwargs):
            fail_at("averager")

        def share_state(self, parts):
            return None

        def shutdown(self):
            events.append("averager")

    class Watcher:
        def __init__(self, dht, report, on_control=None):
            self.state = None

        async def poll_once(self):
            return None

        def start(self):
            return None

        async def stop(self):
            events.append("watcher")

    async def nothing(*_args, **_kwargs):
        return None

    async def joined(*_args, **_kwargs):
        return auth

    async def p2p_of(_dht, channel):
        return Transport()

    monkeypatch.setattr(model_module, "LoopThread", Runner)
    monkeypatch.setattr(model_module, "SwarmDHT", DHT)
    monkeypatch.setattr(model_module, "check_clock", nothing)
    monkeypatch.setattr(model_module.RunAuth, "join", staticmethod(joined))
    monkeypatch.setattr(model_module, "AuthedTransport", lambda inner, token: inner)
    monkeypatch.setattr(model_module, "_p2p_transport", p2p_of)
    monkeypatch.setattr(model_module, "P2PTransport", Transport)  # close() stops its resources by type
    monkeypatch.setattr(model_module, "DHTCoordinator", Coordinator)
    monkeypatch.setattr(model_module, "HivemindGradientSync", Averager)
    monkeypatch.setattr(run_link_module, "RunWatcher", Watcher)
    return events
