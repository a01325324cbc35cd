"""The trainer's pipeline over the in-memory transport: several peers in one event loop."""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import AutoModelForCausalLM

from dht.schemas import Manifest, OptimizerSettings, PeerRecord, PeerState
from peers.training.client import StageClient
from peers.training.executor import StageExecutor
from peers.training.protocol import BACKWARD, FORWARD
from peers.training.service import StageService
from net.transport import InMemoryTransport
from shards import load_local_parts, load_stage, resolve_model, stage_boundaries
from shards.local import causal_lm_loss
from core.errors import NoRoute, PeerUnavailable
from trainer.pipeline import RemotePipeline


def _build(model_dir, num_stages: int, *, cache_size: int = 64, target_batch_size: int = 2):
    source = resolve_model(str(model_dir))
    stages = stage_boundaries(source.config.num_hidden_layers, num_stages)
    manifest = Manifest(run_id="unit", model=str(model_dir), config_hash=source.config_hash,
                        num_layers=source.config.num_hidden_layers, stages=stages,
                        target_batch_size=target_batch_size, optimizer=OptimizerSettings(lr=1e-2))
    hub = InMemoryTransport()
    records, services = {}, []
    for index, layers in enumerate(stages):
        executor = StageExecutor(load_stage(source, layers), index, layers, manifest.optimizer,
                                 cache_size=cache_size)
        service = StageService(executor, f"peer{index}")
        asyncio.run(service.register(hub.bind(f"peer{index}")))
        services.append(service)
        records[index] = [PeerRecord(peer_id=f"peer{index}", stage=index, layers=layers, state=PeerState.ONLINE)]

    async def source_records():
        return records

    pipeline = RemotePipeline(manifest, StageClient(hub, timeout=30), source_records)
    return pipeline, services, load_local_parts(source), hub


def _step(pipeline, local, ids):
    positions = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    hidden = local.embed(ids, positions)

    async def run():
        out, trace = await pipeline.forward(hidden.detach(), None, positions, train=True)
        out.requires_grad_(True)
        loss = causal_lm_loss(local.head(out), ids)
        loss.backward()
        grad_in = await pipeline.backward(trace, out.grad)
        await pipeline.commit(ids.shape[0])
        hidden.backward(grad_in)
        return loss.item()

    return asyncio.run(run())


def test_training_steps_match_transformers(model_factory):
    model_dir = model_factory("llama", num_layers=3, hidden_size=32, num_kv_heads=2)
    pipeline, services, local, _ = _build(model_dir, 3)
    reference = AutoModelForCausalLM.from_pretrained(model_dir)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    opt = torch.optim.AdamW(local.parameters(), lr=1e-2)
    for step in range(3):
        ids = torch.randint(0, 8, (2, 10), generator=torch.Generator().manual_seed(step))
        loss = _step(pipeline, local, ids)
        opt.step(), opt.zero_grad()
        expected = reference(ids, labels=ids).loss
        expected.backward()
        ref_opt.step(), ref_opt.zero_grad()
        assert abs(loss - expected.item()) <= 1e-4 * abs(expected.item())
    assert [s.executor.optimizer_step for s in services] == [3, 3, 3]


def test_a_cache_miss_is_answered_by_recomputing(model_factory):
    model_dir = model_factory("gpt2", num_layers=2, hidden_size=32)
    pipeline, services, local, _ = _build(model_dir, 2, cache_size=64, target_batch_size=1000)
    ids = torch.randint(0, 256, (2, 6))
    _step(pipeline, local, ids)
    with_cache = [p.grad.clone() for p in services[0].executor.module.parameters()]
    for service in services:
        service.executor.optimizer.zero_grad()
        service.executor._cache.clear()
    positions = torch.arange(6).unsqueeze(0).expand_as(ids)

    async def forward_then_forget():
        hidden = local.embed(ids, positions).detach()
        out, trace = await pipeline.forward(hidden, None, positions, train=True)
        for service in services:
            service.executor._cache.clear()  # as if the peer had restarted between forward and backward
        out.requires_grad_(True)
        causal_lm_loss(local.head(out), ids).backward()
        await pipeline.backward(trace, out.grad)

    asyncio.run(forward_then_forget())
    recomputed = [p.grad for p in services[0].executor.module.parameters()]
    for a, b in zip(with_cache, recomputed):
        assert torch.allclose(a, b, atol=1e-6)


def test_a_dead_lone_peer_is_retried_then_the_trainer_waits_for_a_takeover(model_factory):
    """The stage's only peer fails every call: retried (bounded), then the trainer waits for another
    peer to take the stage over, and gives up after ``route_wait`` with a message naming the stage."""
    model_dir = model_factory("gpt2", num_layers=2, hidden_size=32)
    pipeline, _, local, hub = _build(model_dir, 2)
    pipeline.client.backoff = 0.0
    pipeline.replicas.route_wait = 1.0
    hub.fail["peer1"] = PeerUnavailable("peer1 is gone")
    with pytest.raises(NoRoute, match=r"no online peer serves stage\(s\) 1 .*waited 1 s"):
        _step(pipeline, local, torch.randint(0, 256, (2, 6)))
    assert "peer1" in pipeline.banned()


@pytest.mark.parametrize("lost_peer", ["peer0", "peer1"])
def test_a_lost_reply_is_retried_without_applying_a_gradient_twice(model_factory, lost_peer):
    """The call runs on the peer but its reply is lost: the retry must not accumulate again."""
    model_dir = model_factory("gpt2", num_layers=2, hidden_size=32)
    ids = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(5))
    grads = {}
    for lose in (0, 1):
        pipeline, services, local, hub = _build(model_dir, 2, target_batch_size=1000)
        pipeline.client.backoff = 0.0
        hub.lose_replies[(lost_peer, FORWARD)] = lose
        hub.lose_replies[(lost_peer, BACKWARD)] = lose
        loss = _step(pipeline, local, ids)
        grads[lose] = (loss, [p.grad.clone() for s in services for p in s.executor.module.parameters()])
        assert all(s.executor.accumulated_samples == 2 for s in services)
    assert grads[0][0] == grads[1][0]
    for a, b in zip(grads[0][1], grads[1][1]):
        assert torch.equal(a, b)


def test_microbatches_are_spread_over_replicas_by_expected_time(model_factory):
    model_dir = model_factory("gpt2", num_layers=2, hidden_size=32)
    pipeline, _, local, hub = _build(model_dir, 1, target_batch_size=1000)
    layers = pipeline.manifest.stages[0]
    speeds = {"fast": 250.0, "slow": 100.0}
    replicas = {}
    for name in speeds:
        executor = StageExecutor(load_stage(resolve_model(str(model_dir)), layers), 0, layers,
                                 pipeline.manifest.optimizer)
        replicas[name] = StageService(executor, name)
        asyncio.run(replicas[name].register(hub.bind(name)))
    records = {0: [PeerRecord(peer_id=name, stage=0, layers=layers, state=PeerState.ONLINE, throughput=speed)
                   for name, speed in speeds.items()]}

    async def source_records():
        return records

    pipeline.replicas.source = source_records
    pipeline.spot_check.rate = 0.0  # this counts requests: no spot checks
    ids = torch.randint(0, 8, (2, 8), generator=torch.Generator().manual_seed(0))
    for _ in range(5):
        _step(pipeline, local, ids)
    served = {name: service.requests_served for name, service in replicas.items()}
    # 16 tokens a microbatch: expected back after 64, 128, 192 ms on "fast" and 160 ms on "slow", so
    # of every 4 microbatches "fast" takes 3; 5 forwards (each with its backward): 4 and 1
    assert served == {"fast": 8, "slow": 2}


def test_a_span_peer_missing_from_one_read_keeps_every_stage_it_serves():
    """A DHT read can miss some entries: a peer serving stages 0 and 1 that is missing only from stage 1
    in one read is still a replica of stage 1 (records are remembered per peer and stage)."""
    layers = stage_boundaries(4, 2)
    manifest = Manifest(run_id="unit", model="m", config_hash="h", num_layers=4, stages=layers)
    span = [PeerRecord(peer_id="span", stage=i, layers=layers[i], state=PeerState.ONLINE) for i in (0, 1)]
    other = PeerRecord(peer_id="other", stage=1, layers=layers[1], state=PeerState.ONLINE)
    reads = [{0: [span[0]], 1: [span[1], other]}, {0: [span[0]], 1: [other]}]

    async def source():
        return reads.pop(0)

    pipeline = RemotePipeline(manifest, StageClient(InMemoryTransport(), timeout=1), source)

    async def views():
        first = await pipeline.replicas.current(fresh=True)
        second = await pipeline.replicas.current(fresh=True)
        return first, second

    first, second = asyncio.run(views())
    for view in (first, second):
        peers = {stage: sorted(r.peer_id for r in rs) for stage, rs in view.items()}
        assert peers == {0: ["span"], 1: ["other", "span"]}
    assert sorted(pipeline.replicas.live(1)) == ["other", "span"]


def _pipelined_grads(model_dir, ids, rows_per_microbatch: int):
    """Stage and embedding gradients of one step whose batch goes as microbatches of that many rows."""
    pipeline, services, local, _ = _build(model_dir, 3, target_batch_size=1000)
    positions = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    hidden = local.embed(ids, positions)
    cuts = list(range(0, ids.shape[0], rows_per_microbatch))

    async def run():
        parts = [(hidden[r:r + rows_per_microbatch].detach(), None, positions[r:r + rows_per_microbatch])
                 for r in cuts]
        done = await pipeline.forward_microbatches(parts, train=True)
        out = torch.cat([o for o, _ in done]).requires_grad_(True)
        causal_lm_loss(local.head(out), ids).backward()
        grads = [out.grad[r:r + rows_per_microbatch].contiguous() for r in cuts]
        return await pipeline.backward_microbatches([t for _, t in done], grads)

    hidden.backward(torch.cat(asyncio.run(run())))
    stage_grads = [p.grad.clone() for s in services for p in s.executor.module.parameters()]
    return stage_grads + [p.grad.clone() for p in local.parameters() if p.grad is not None]


def test_pipelined_microbatches_give_the_gradients_of_the_whole_batch(model_factory):
    model_dir = model_factory("llama", num_layers=3, hidden_size=32, num_kv_heads=2)
    ids = torch.randint(0, 8, (6, 10), generator=torch.Generator().manual_seed(3))
    whole, pipelined = _pipelined_grads(model_dir, ids, 6), _pipelined_grads(model_dir, ids, 1)
    assert len(whole) == len(pipelined) > 10
    for a, b in zip(whole, pipelined):
        assert (a - b).abs().max().item() <= 1e-5
    assert max(g.abs().max().item() for g in whole) > 1e-3  # the comparison is not between zeros


def test_stages_compute_different_microbatches_at_once(model_factory):
    """Stage 0's second forward waits (bounded) until stage 1 has started on microbatch 0: that only
    ends well when microbatches are in flight on both stages together."""
    import threading

    model_dir = model_factory("gpt2", num_layers=2, hidden_size=32)
    pipeline, services, local, _ = _build(model_dir, 2, target_batch_size=1000)
    stage1_started, overlapped, calls = threading.Event(), [], []
    forward0, forward1 = services[0].executor.forward, services[1].executor.forward

    def first_stage(request, inputs):
        calls.append(request.request_id)
        if len(calls) == 2:  # the second microbatch
            overlapped.append(stage1_started.wait(timeout=10))
        return forward0(request, inputs)

    def second_stage(request, inputs):
        stage1_started.set()
        return forward1(request, inputs)

    services[0].executor.forward, services[1].executor.forward = first_stage, second_stage
    ids = torch.randint(0, 256, (4, 6), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(6).unsqueeze(0).expand_as(ids)
    hidden = local.embed(ids, positions).detach()
    parts = [(hidden[r:r + 1], None, positions[r:r + 1]) for r in range(4)]
    done = asyncio.run(pipeline.forward_microbatches(parts, train=False))
    assert overlapped == [True]
    assert services[1].requests_served == 4
    sequential = asyncio.run(pipeline.forward(hidden, None, positions, train=False))[0]
    assert torch.allclose(torch.cat([out for out, _ in done]), sequential, atol=1e-5)


@pytest.mark.parametrize("wire, smaller, tolerance", [("float32", 1.0, 1e-4), ("float16", 2.0, 1e-2),
                                                     ("bfloat16", 2.0, 3e-2), ("int8", 3.5, 3e-2)])
def test_compressed_wire_formats_train_close_to_float32_with_fewer_bytes(model_factory, wire, smaller, tolerance):
    model_dir = model_factory("llama", num_layers=2, hidden_size=64, num_kv_heads=2)
    ids = [torch.randint(0, 8, (2, 16), generator=torch.Generator().manual_seed(s)) for s in range(3)]
    runs = {}
    for fmt in ("float32", wire):
        pipeline, services, local, _ = _build(model_dir, 2)
        hub = InMemoryTransport()
        for service in services:
            asyncio.run(service.register(hub.bind(service.peer_id)))
        pipeline.client = StageClient(hub, timeout=30, wire=fmt)
        opt = torch.optim.AdamW(local.parameters(), lr=1e-2)
        losses = []
        for batch in ids:
            losses.append(_step(pipeline, local, batch))
            opt.step(), opt.zero_grad()
        runs[fmt] = (losses, hub.tensor_bytes[FORWARD] + hub.tensor_bytes[BACKWARD])
    (exact, exact_bytes), (lossy, lossy_bytes) = runs["float32"], runs[wire]
    assert exact_bytes / lossy_bytes >= smaller * 0.95
    for a, b in zip(exact, lossy):
        assert abs(a - b) <= tolerance * abs(a)
