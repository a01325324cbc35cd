"""Inference sessions of a stage (KV cache, budget, idle timeout, replay, bad input) and the client's
session over the in-memory transport (failover to another replica, errors crossing the wire), and
the checks of a prompt before generation."""

from __future__ import annotations

import asyncio
import random
import re
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from transformers import GPT2Config

from dht.schemas import Manifest, PeerRecord, PeerState
from peers.inference.sessions import InferenceSessions, admit, idle_sessions
from peers.inference.client import InferenceClient
from peers.inference.protocol import OpenRequest, StepRequest
from peers.inference.service import InferenceService
from net.transport import InMemoryTransport
from shards import LayerRange, load_local_parts, load_stage, resolve_model, stage_boundaries
from shards.families import kv_bytes_per_token
from core.errors import BadRequest, CacheMiss, CapacityExceeded, ConfigError, PeerUnavailable, WrongStage
from trainer.generation import GenerationParams, RemoteSession, generate_tokens, generation_length

MIB = 1 << 20


@pytest.mark.parametrize(
    "ids_shape, mask_shape, new_tokens, refused",
    [
        ((2, 5), None, 3, None),
        ((2, 5), (2, 5), 11, None),
        ((2, 5), (2, 5), 12, "5 prompt tokens + 12 new tokens exceed the model's 16 positions"),
        ((5,), None, 3, "input_ids must have shape [batch, seq] with seq >= 1, got [5]"),
        ((2, 0), None, 3, "input_ids must have shape [batch, seq] with seq >= 1, got [2, 0]"),
        ((2, 5), (2, 4), 3, "attention_mask has shape [2, 4], input_ids [2, 5]"),
    ],
)
def test_generation_length(ids_shape, mask_shape, new_tokens, refused):
    config = GPT2Config(n_positions=16)
    ids = torch.zeros(ids_shape, dtype=torch.long)
    mask = torch.ones(mask_shape, dtype=torch.long) if mask_shape is not None else None
    params = GenerationParams(max_new_tokens=new_tokens)
    if refused is None:
        assert generation_length(ids, mask, params, config) == ids_shape[1] + new_tokens
    else:
        with pytest.raises(ConfigError, match=re.escape(refused)):
            generation_length(ids, mask, params, config)


@pytest.mark.parametrize(
    "budget, reserved, need, refused",
    [
        (100, 0, 100, None),
        (100, 60, 40, None),
        (100, 61, 40, "only 0.0 MiB of 0.0 MiB is free"),
        (100, 0, 101, "more than this peer's whole budget"),
        (10 * MIB, 4 * MIB, 7 * MIB, "only 6.0 MiB of 10.0 MiB is free"),
    ],
)
def test_admit(budget, reserved, need, refused):
    reason = admit(budget, reserved, need)
    assert (reason is None) if refused is None else (refused in reason)


@pytest.mark.parametrize(
    "last_used, now, timeout, expected",
    [
        ({}, 100.0, 10.0, []),
        ({"a": 95.0, "b": 80.0}, 100.0, 10.0, ["b"]),
        ({"a": 50.0, "b": 80.0, "c": 99.0}, 100.0, 10.0, ["a", "b"]),
        ({"a": 90.0}, 100.0, 10.0, []),  # exactly at the timeout is still alive
    ],
)
def test_idle_sessions(last_used, now, timeout, expected):
    assert idle_sessions(last_used, now, timeout) == expected


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from shards.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("llama"), "llama", num_layers=4, hidden_size=32, num_heads=4,
                           num_kv_heads=2)


def _sessions(model_dir, *, sessions_fit: float = 1.0, batch: int = 2, max_length: int = 16, clock=None):
    layers = LayerRange(start=0, end=2)
    module = load_stage(model_dir, layers)
    per_session = kv_bytes_per_token(module.config, 2, torch.float32) * batch * max_length
    return InferenceSessions(module, 0, layers, memory_budget=int(per_session * sessions_fit), idle_timeout=60.0,
                             clock=clock or _Clock()), module


def _open(sessions, sid: str, batch: int = 2, max_length: int = 16):
    return sessions.open(OpenRequest(stage=0, layers=LayerRange(start=0, end=2), session_id=sid, batch_size=batch,
                                     max_length=max_length))


def _step(sessions, sid, start, hidden, mask=None):
    positions = torch.arange(start, start + hidden.shape[1]).unsqueeze(0).expand(hidden.shape[0], -1)
    tensors = [hidden] + ([mask] if mask is not None else []) + [positions]
    return sessions.step(StepRequest(session_id=sid, start=start, has_attention_mask=mask is not None), tensors)


def test_steps_with_the_cache_equal_the_full_forward(llama_dir):
    sessions, module = _sessions(llama_dir)
    hidden = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(0))
    _open(sessions, "s")
    outs = [_step(sessions, "s", 0, hidden[:, :6])[1]]
    outs += [_step(sessions, "s", i, hidden[:, i:i + 1])[1] for i in range(6, 9)]
    with torch.no_grad():
        full = module(hidden)
    assert (torch.cat(outs, dim=1) - full).abs().max().item() < 1e-5
    reply, _ = _step(sessions, "s", 9, hidden[:, :1])
    assert reply.length == 10


def test_a_full_peer_refuses_new_sessions_and_keeps_the_old(llama_dir):
    sessions, _ = _sessions(llama_dir, sessions_fit=1.5)
    hidden = torch.randn(2, 4, 32)
    _open(sessions, "first")
    _step(sessions, "first", 0, hidden)
    with pytest.raises(CapacityExceeded, match="refuses session second"):
        _open(sessions, "second")
    reply, out = _step(sessions, "first", 4, hidden[:, :1])  # the old session is untouched
    assert reply.length == 5 and out.shape == (2, 1, 32)
    assert sessions.close("first") and not sessions.close("first")
    _open(sessions, "second")
    assert "second" in sessions and len(sessions) == 1


def test_idle_sessions_expire_and_then_miss(llama_dir):
    clock = _Clock()
    sessions, _ = _sessions(llama_dir, sessions_fit=1.0, clock=clock)
    _open(sessions, "idle")
    clock.now = 61.0
    _open(sessions, "fresh")  # the idle session's memory is reclaimed for the newcomer
    assert "idle" not in sessions and "fresh" in sessions
    with pytest.raises(CacheMiss, match="no inference session idle"):
        _step(sessions, "idle", 0, torch.randn(2, 1, 32))


def test_a_repeated_step_is_replayed_and_a_gap_misses(llama_dir):
    sessions, _ = _sessions(llama_dir)
    hidden = torch.randn(2, 3, 32)
    _open(sessions, "s")
    _, first = _step(sessions, "s", 0, hidden)
    reply, again = _step(sessions, "s", 0, hidden)  # the reply was lost; the client repeats the step
    assert reply.length == 3 and torch.equal(first, again)
    with pytest.raises(CacheMiss, match="holds 3 positions"):
        _step(sessions, "s", 5, hidden[:, :1])


@pytest.mark.parametrize(
    "case, error, message",
    [
        ("dtype", BadRequest, "must be torch.float32"),
        ("width", BadRequest, "must have shape [2, seq, 32]"),
        ("batch", BadRequest, "must have shape [2, seq, 32]"),
        ("mask_shape", BadRequest, "attention_mask must have shape [2, 3]"),
        ("mask_dtype", BadRequest, "attention_mask must be an integer tensor"),
        ("too_long", BadRequest, "opened for 16 positions"),
        ("count", BadRequest, "takes 2 tensor(s)"),
    ],
)
def test_bad_steps_are_refused_by_name(llama_dir, case, error, message):
    sessions, _ = _sessions(llama_dir)
    _open(sessions, "s")
    hidden, positions = torch.randn(2, 3, 32), torch.arange(3).expand(2, 3)
    mask, has_mask = None, False
    if case == "dtype":
        hidden = hidden.double()
    elif case == "width":
        hidden = torch.randn(2, 3, 16)
    elif case == "batch":
        hidden = torch.randn(3, 3, 32)
    elif case == "mask_shape":
        mask, has_mask = torch.ones(2, 2, dtype=torch.long), True
    elif case == "mask_dtype":
        mask, has_mask = torch.ones(2, 3), True
    elif case == "too_long":
        hidden, positions = torch.randn(2, 17, 32), torch.arange(17).expand(2, 17)
    tensors = [hidden] + ([mask] if mask is not None else []) + ([] if case == "count" else [positions])
    with pytest.raises(error) as raised:
        sessions.step(StepRequest(session_id="s", start=0, has_attention_mask=has_mask), tensors)
    assert message in str(raised.value)
    assert _step(sessions, "s", 0, torch.randn(2, 3, 32))[0].length == 3  # and the session still works


def test_open_names_the_stage_it_serves(llama_dir):
    sessions, _ = _sessions(llama_dir)
    with pytest.raises(WrongStage, match="serves stage 0"):
        sessions.open(OpenRequest(stage=1, layers=LayerRange(start=2, end=4), session_id="s", batch_size=1,
                                  max_length=4))


# -- the client's session over the in-memory transport ------------------------------------------------


def _swarm(model_dir, replicas: list[int], budgets: dict[str, int] | None = None):
    """Peers over the in-memory transport: ``replicas[i]`` peers serve stage i (2 stages)."""
    source = resolve_model(str(model_dir))
    stages = stage_boundaries(4, len(replicas))
    manifest = Manifest(run_id="unit", model=str(model_dir), config_hash=source.config_hash, num_layers=4,
                        stages=stages)
    hub, records, worker = InMemoryTransport(), {}, ThreadPoolExecutor(max_workers=1)
    services = {}
    for index, (layers, count) in enumerate(zip(stages, replicas)):
        module = load_stage(source, layers)
        for replica in range(count):
            name = f"s{index}r{replica}"
            sessions = InferenceSessions(module, index, layers, memory_budget=(budgets or {}).get(name, 1 << 30),
                                         idle_timeout=60.0)
            services[name] = InferenceService(sessions, worker, sweep_every=3600)
            asyncio.run(_register(services[name], hub.bind(name)))
            records.setdefault(index, []).append(  # replica 0 is the fastest: routes pick it first
                PeerRecord(peer_id=name, stage=index, layers=layers, state=PeerState.ONLINE,
                           throughput=2.0 if replica == 0 else 1.0))

    async def source_records():
        return records

    return manifest, hub, source_records, services, load_local_parts(source)


async def _register(service, bound):
    for method, handler in service.handlers().items():
        await bound.serve(method, handler)


def _generate(model_dir, manifest, hub, records, local, ids, *, on_token=None, seed=0, fresh_records=None,
              on_step=None):
    loop = asyncio.new_event_loop()
    client = InferenceClient(hub, timeout=30, backoff=0.0, on_step=on_step)
    session = RemoteSession(manifest, client, records, batch_size=ids.shape[0],
                            max_length=ids.shape[1] + 12, rng=random.Random(seed), fresh_records=fresh_records)
    try:
        loop.run_until_complete(session.open())
        tokens = []
        for i, token in enumerate(generate_tokens(local, loop.run_until_complete, session, ids, None,
                                                  GenerationParams(max_new_tokens=12))):
            tokens.append(token)
            if on_token is not None:
                on_token(i, session)
        loop.run_until_complete(session.close())
    finally:
        loop.close()
    return torch.stack(tokens, 1), session


def test_a_dead_replica_is_replaced_and_the_tokens_do_not_change(llama_dir):
    manifest, hub, records, services, local = _swarm(llama_dir, [2, 1])
    ids = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(4))
    expected, _ = _generate(llama_dir, manifest, hub, records, local, ids)

    def kill(i, session):
        if i == 4:
            hub.fail[session.route[0].peer_id] = PeerUnavailable("the peer is gone")

    got, session = _generate(llama_dir, manifest, hub, records, local, ids, on_token=kill)
    assert torch.equal(got, expected)
    assert session.failovers == 1 and session.banned == set(hub.fail)
    survivor = services[session.route[0].peer_id]
    assert len(survivor.sessions) == 0  # the replacement session was closed at the end


def test_the_first_route_comes_from_the_view_and_a_replacement_from_a_fresh_read(llama_dir):
    manifest, hub, records, _, local = _swarm(llama_dir, [2, 1])
    ids = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(4))
    reads = {"view": 0, "fresh": 0}

    def counted(kind):
        async def source():
            reads[kind] += 1
            return await records()
        return source

    def kill(i, session):
        if i == 4:
            hub.fail[session.route[0].peer_id] = PeerUnavailable("the peer is gone")

    _, session = _generate(llama_dir, manifest, hub, counted("view"), local, ids, on_token=kill,
                           fresh_records=counted("fresh"))
    assert reads == {"view": 1, "fresh": 1} and session.failovers == 1


def test_each_answered_step_is_told_with_its_round_trip_and_the_peers_compute(llama_dir):
    manifest, hub, records, _, local = _swarm(llama_dir, [1, 1])
    ids = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(4))
    told = []
    _, session = _generate(llama_dir, manifest, hub, records, local, ids,
                           on_step=lambda peer, seconds, reply: told.append((peer, seconds, reply)))
    # 12 tokens: the prefill and 11 one-token steps, through both stages
    assert [peer for peer, _, _ in told] == [hop.peer_id for hop in session.route] * 12
    assert all(0 < reply.compute_ms <= seconds * 1000 for _, seconds, reply in told)
    assert [reply.length for _, _, reply in told[::2]] == [5 + i for i in range(12)]
    assert session.open_seconds is not None and session.open_seconds > 0


def test_a_full_replica_sends_the_session_to_another(llama_dir):
    per_session = kv_bytes_per_token(resolve_model(str(llama_dir)).config, 2, torch.float32) * 2 * 17
    manifest, hub, records, _, local = _swarm(llama_dir, [2, 1])
    ids = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(4))
    expected, _ = _generate(llama_dir, manifest, hub, records, local, ids)
    manifest, hub, records, _, local = _swarm(llama_dir, [2, 1], budgets={"s0r0": per_session - 1})
    got, session = _generate(llama_dir, manifest, hub, records, local, ids)
    # the fastest replica answered CapacityExceeded over the wire; the session went to the other
    assert session.banned == {"s0r0"} and session.route[0].peer_id == "s0r1" and session.failovers == 1
    assert torch.equal(got, expected)


def test_a_stage_whose_only_replica_is_full_refuses_at_once(llama_dir):
    manifest, hub, records, _, local = _swarm(llama_dir, [1, 1], budgets={"s1r0": 1})
    ids = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(4))
    with pytest.raises(CapacityExceeded, match="stage 1 refuses session .* no other replica of that stage is free"):
        _generate(llama_dir, manifest, hub, records, local, ids)
