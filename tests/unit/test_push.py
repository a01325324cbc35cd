"""Activations peer to peer (``peers.training.push``, the pipeline's ``push`` mode) over the in-memory transport:
the same training as relaying every hop through the trainer, a fraction of the trainer's traffic, and
no microbatch lost or counted twice when a peer fails in the middle of a push or at the step."""

from __future__ import annotations

import asyncio
import logging

import pytest
import torch

from peers.training.client import StageClient
from peers.training.executor import ForwardInputs
from peers.training.protocol import PUSH, BackwardRequest, ForwardRequest, PushHop, PushRequest, PushResponse
from net.rpc import parse_reply
from peers.training.push import Mailbox
from core.types import LayerRange
from core.errors import BadRequest, CacheMiss, CapacityExceeded, StageTimeout, WrongStage
from tests.helpers import reference_losses
from tests.unit.test_fault_tolerance import LR, Fault, ReplicatedSwarm, _assert_close_losses, _batches, _params, _train_step
from net.rpc import Raw


class _CountingTransport:
    """The trainer's side of the hub: counts the tensor bytes of the trainer's own calls (sent and
    received), which the hub's own counter mixes with the peers' pushes."""

    def __init__(self, inner):
        self.inner, self.bytes = inner, 0

    async def call(self, peer_id, method, message, tensors, *, timeout, **options):
        reply, out = await self.inner.call(peer_id, method, message, tensors, timeout=timeout, **options)
        self.bytes += sum(t.numel() * t.element_size() for t in (*tensors, *out))
        return reply, out


def _train(model_dir, replicas, *, push: bool, steps: int = 3, victim: str = "", fault: Fault = Fault.NONE,
           after: int = 0):
    swarm = ReplicatedSwarm(model_dir, replicas, push=push)
    counting = _CountingTransport(swarm.hub)
    swarm.pipeline.client = StageClient(counting, timeout=3.0, attempts=1)
    swarm.pipeline.spot_check.client = swarm.pipeline.client
    swarm.hub.victim, swarm.hub.fault, swarm.hub.after = victim, fault, after
    batches = _batches(steps, swarm.source.config.vocab_size)
    optimizer = torch.optim.AdamW(swarm.local.parameters(), lr=LR)
    losses = [asyncio.run(_train_step(swarm.pipeline, swarm.local, optimizer, ids, pipelined=True)) for ids in batches]
    return swarm, losses, batches, counting.bytes


def test_pushed_training_equals_relayed_training_with_a_third_of_the_trainers_traffic(model_factory):
    """Three stages: relayed, the trainer's link carries each microbatch six times a direction, pushed
    twice. Parameters after three steps are those of relayed training and of transformers."""
    model_dir = model_factory("llama", num_layers=6, hidden_size=32, num_kv_heads=2)
    relayed, relayed_losses, batches, relayed_bytes = _train(model_dir, [1, 1, 1], push=False)
    pushed, pushed_losses, _, pushed_bytes = _train(model_dir, [1, 1, 1], push=True)
    try:
        _assert_close_losses(pushed_losses, reference_losses(model_dir, batches, lr=LR))
        assert pushed_losses == pytest.approx(relayed_losses, rel=1e-6)
        for peer in ("s0a", "s1a", "s2a"):
            for a, b in zip(_params(pushed.services[peer]), _params(relayed.services[peer])):
                assert (a - b).abs().max().item() <= 1e-5
        assert pushed.pipeline.push_fallbacks == 0
        assert pushed.hub.tensor_bytes[PUSH] > 0, "the hidden states must have gone peer to peer"
        assert pushed_bytes <= 0.4 * relayed_bytes, f"trainer bytes: pushed {pushed_bytes}, relayed {relayed_bytes}"
    finally:
        relayed.close()
        pushed.close()


class _HeldReplies:
    """The trainer's side of the hub, where the replies of its pushes are held until ``release``: a
    trainer that waited for them (three one-way trips up the chain on a WAN) would never go on."""

    def __init__(self, inner):
        self.inner, self.release, self.held = inner, asyncio.Event(), 0

    async def call(self, peer_id, method, message, tensors, *, timeout, **options):
        reply = await self.inner.call(peer_id, method, message, tensors, timeout=timeout, **options)
        if method == PUSH:
            self.held += 1
            await self.release.wait()
        return reply


def test_a_collected_result_goes_on_without_waiting_for_the_pushs_reply(model_factory):
    model_dir = model_factory("llama", num_layers=6, hidden_size=32, num_kv_heads=2)
    swarm = ReplicatedSwarm(model_dir, [1, 1, 1], push=True)
    try:
        batches = _batches(2, swarm.source.config.vocab_size)
        optimizer = torch.optim.AdamW(swarm.local.parameters(), lr=LR)

        async def train():
            held = _HeldReplies(swarm.hub)
            swarm.pipeline.client = StageClient(held, timeout=3.0, attempts=1)
            losses = [await asyncio.wait_for(_train_step(swarm.pipeline, swarm.local, optimizer, ids, pipelined=True),
                                             20.0) for ids in batches]
            waiting = len(swarm.pipeline.pushing._replies)
            held.release.set()
            await asyncio.sleep(0.1)
            return losses, held.held, waiting

        losses, held, waiting = asyncio.run(train())
        _assert_close_losses(losses, reference_losses(model_dir, batches, lr=LR))
        assert held >= 2 * 2 and waiting == held, "every push's reply was still held when the steps ended"
        assert swarm.pipeline.push_fallbacks == 0
        assert not swarm.pipeline.pushing._replies, "a reply that came is let go"
    finally:
        swarm.close()


@pytest.mark.parametrize("fault", [Fault.KILL, Fault.HANG, Fault.ERROR, Fault.GONE_AT_STEP])
def test_a_middle_stage_failing_under_pushes_costs_no_microbatch(model_factory, fault, caplog):
    """The middle stage's replica ``s1a`` fails mid-step, reached only by pushes from stage 0's peers
    and the trainer's replays. Every backward it had counted is replayed on ``s1b`` from what the
    neighbouring hops keep (never recomputed through stages that already stepped)."""
    model_dir = model_factory("llama", num_layers=6, hidden_size=32, num_kv_heads=2)
    with caplog.at_level(logging.INFO, logger="trainer.pipeline"):
        swarm, losses, batches, _ = _train(model_dir, [2, 2, 2], push=True, steps=4, victim="s1a", fault=fault,
                                           after=3)
    try:
        _assert_close_losses(losses, reference_losses(model_dir, batches, lr=LR))
        assert "s1a" in swarm.pipeline.banned()
        if fault is not Fault.GONE_AT_STEP:
            assert swarm.pipeline.push_fallbacks >= 1, "a push through the victim must have broken"
        assert "no longer keeps" not in caplog.text
        survivors = ["s0a", "s0b", "s1b", "s2a", "s2b"]
        assert [swarm.services[p].executor.optimizer_step for p in survivors] == [4] * len(survivors)
        for first, second in (("s0a", "s0b"), ("s2a", "s2b")):
            for a, b in zip(_params(swarm.services[first]), _params(swarm.services[second])):
                assert (a - b).abs().max().item() <= 1e-5
    finally:
        swarm.close()


def test_a_push_to_a_dead_last_stage_is_rebuilt_through_the_trainer(model_factory):
    """The last stage's only replica dies after the first step; a replacement from its state takes
    over a moment later: the broken pushes are relayed and rebuilt, and training goes on exactly."""
    model_dir = model_factory("llama", num_layers=4, hidden_size=32, num_kv_heads=2)
    swarm = ReplicatedSwarm(model_dir, [1, 1], push=True)
    try:
        batches = _batches(3, swarm.source.config.vocab_size)
        optimizer = torch.optim.AdamW(swarm.local.parameters(), lr=LR)
        losses = [asyncio.run(_train_step(swarm.pipeline, swarm.local, optimizer, batches[0], pipelined=True))]
        swarm.hub.victim, swarm.hub.fault, swarm.hub.after = "s1a", Fault.KILL, swarm.hub.calls["s1a"] + 3

        async def step_with_takeover(ids):
            takeover = asyncio.create_task(swarm.take_over("s1a", "s1new"))
            loss = await _train_step(swarm.pipeline, swarm.local, optimizer, ids, pipelined=True)
            await takeover
            return loss

        losses.append(asyncio.run(step_with_takeover(batches[1])))
        losses.append(asyncio.run(_train_step(swarm.pipeline, swarm.local, optimizer, batches[2], pipelined=True)))
        _assert_close_losses(losses, reference_losses(model_dir, batches, lr=LR))
        assert swarm.services["s1new"].executor.optimizer_step == 3
        assert swarm.pipeline.push_fallbacks >= 1
    finally:
        swarm.close()


def test_a_push_naming_another_peer_or_malformed_is_refused_and_the_peer_serves_on(model_factory):
    model_dir = model_factory("llama", num_layers=4, hidden_size=32, num_kv_heads=2)
    swarm = ReplicatedSwarm(model_dir, [1, 1], push=True)
    try:
        client = StageClient(swarm.hub, timeout=3.0, attempts=1)
        layers = swarm.manifest.stages[0]
        hidden = torch.randn(1, 4, 32)
        wrong = PushRequest(hops=[PushHop(stage=0, layers=layers, peer_id="someone-else", request_id="r0")],
                            mailbox="box")
        with pytest.raises(WrongStage, match="one-else"):
            asyncio.run(_raise_reply(swarm.hub, "s0a", wrong.model_dump(mode="json"), [hidden]))
        with pytest.raises(BadRequest, match="hops"):
            asyncio.run(_raise_reply(swarm.hub, "s0a", {"hops": [], "mailbox": "m"}))
        bad_shape = [PushHop(stage=0, layers=layers, peer_id="s0a", request_id="r1")]
        with pytest.raises(BadRequest, match="hidden_states"):
            asyncio.run(client.push(bad_shape, "box", torch.randn(1, 4, 7)))
        # the peer still pushes a good microbatch on to the last stage, whose result waits to be collected
        route = [PushHop(stage=s, layers=swarm.manifest.stages[s], peer_id=f"s{s}a", request_id=f"ok{s}", seed=s)
                 for s in range(2)]

        async def push_and_collect():
            return await client.push(route, "box", hidden), await client.collect("s1a", "box", hidden, timeout=2.0)

        response, (out, collected) = asyncio.run(push_and_collect())
        assert [d.stage for d in response.done] == [0, 1] and response.failed is None
        assert [(d.stage, d.peer_id) for d in collected] == [(0, "s0a"), (1, "s1a")], \
            "the mailbox says which peers computed what it holds"
        relayed = asyncio.run(client.forward("s0a", 0, layers, "x0", (hidden, None, None), train=False, seed=0))[0]
        relayed = asyncio.run(client.forward("s1a", 1, swarm.manifest.stages[1], "x1", (relayed, None, None),
                                             train=False, seed=1))[0]
        assert torch.allclose(out, relayed, atol=1e-6)
    finally:
        swarm.close()


async def _raise_reply(hub, peer: str, message: dict, tensors: list[torch.Tensor] = ()):
    reply, _ = await hub.call(peer, PUSH, Raw(message), list(tensors), timeout=3.0)
    return parse_reply(PushResponse, reply)


def test_mailbox_takes_in_either_order_and_is_bounded():
    async def run():
        box = Mailbox(size=2, ttl=60.0)
        first = torch.ones(2)
        box.put("a", [first])  # put before take
        assert torch.equal((await box.take("a", 1.0))[0], first)
        waiting = asyncio.ensure_future(box.take("b", 5.0))  # take before put
        await asyncio.sleep(0)
        box.put("b", [first * 2])
        assert torch.equal((await waiting)[0], first * 2)
        assert len(box) == 0, "a taken result is not kept"
        with pytest.raises(StageTimeout, match="mailbox c"):
            await box.take("c", 0.05)
        stranded = asyncio.ensure_future(box.take("d", 5.0))
        await asyncio.sleep(0)
        box.put("e", [first])
        box.put("f", [first])  # a third entry: the oldest (a waiter) is dropped with an error
        with pytest.raises(CapacityExceeded, match="mailbox"):
            await stranded

    asyncio.run(run())


def test_a_backward_that_does_not_accumulate_returns_the_same_gradient_and_counts_nothing(model_factory):
    model_dir = model_factory("llama", num_layers=4, hidden_size=32, num_kv_heads=2)
    swarm = ReplicatedSwarm(model_dir, [1, 1])
    try:
        executor = swarm.services["s0a"].executor
        layers: LayerRange = swarm.manifest.stages[0]
        hidden = torch.randn(2, 4, 32)
        inputs = ForwardInputs(hidden, None, None)
        _, output = executor.forward(ForwardRequest(stage=0, layers=layers, request_id="f", train=True, seed=3), inputs)
        grad = torch.randn_like(output)
        base = dict(stage=0, layers=layers, request_id="f", num_samples=2, seed=3)
        with pytest.raises(CacheMiss):
            executor.kept("f", grad=True)
        assert torch.equal(executor.kept("f", grad=False), output), "the output is kept with the graph"
        _, only = executor.backward(BackwardRequest(**base, accumulate=False), grad, inputs)
        assert executor.accumulated_samples == 0
        assert all(p.grad is None for p in executor.module.parameters())
        _, counted = executor.backward(BackwardRequest(**base, with_inputs=True), grad, inputs)
        assert executor.accumulated_samples == 2
        assert torch.allclose(only, counted, atol=1e-6)
        assert torch.equal(executor.kept("f", grad=True), counted)
        assert torch.allclose(executor.kept("f", grad=False), output, atol=1e-6)
    finally:
        swarm.close()


def test_train_step_gives_the_gradients_and_losses_of_loss_backward(model_factory):
    """``SwarmModelForCausalLM.train_step`` (each microbatch's backward under way while others still go
    forward) against ``model(ids, labels=ids).loss.backward()`` on a twin swarm: the same losses, local
    gradients and stage parameters after three steps, padding labels (-100) included."""
    from core.loop import LoopThread
    from trainer.model import SwarmModelForCausalLM

    model_dir = model_factory("llama", num_layers=6, hidden_size=32, num_kv_heads=2)
    twins = [ReplicatedSwarm(model_dir, [1, 1, 1], push=True) for _ in range(2)]
    models = [SwarmModelForCausalLM(swarm.local, swarm.pipeline, LoopThread(), microbatch_size=1) for swarm in twins]
    try:
        batches = _batches(3, twins[0].source.config.vocab_size)
        optimizers = [torch.optim.AdamW(model.parameters(), lr=LR) for model in models]
        for ids in batches:
            labels = ids.clone()
            labels[0, :3] = -100
            overlapped = models[0].train_step(ids, labels=labels)
            phased = models[1](ids, labels=labels).loss
            phased.backward()
            assert overlapped.item() == pytest.approx(phased.item(), rel=1e-6)
            for a, b in zip(models[0].parameters(), models[1].parameters()):
                assert (a.grad - b.grad).abs().max().item() <= 1e-6
            for optimizer in optimizers:
                optimizer.step()
                optimizer.zero_grad()
        for peer in ("s0a", "s1a", "s2a"):
            assert twins[0].services[peer].executor.optimizer_step == 3
            for a, b in zip(_params(twins[0].services[peer]), _params(twins[1].services[peer])):
                assert (a - b).abs().max().item() <= 1e-5
        with pytest.raises(ValueError, match="labels have shape"):
            models[0].train_step(batches[0], labels=batches[0][:, :3])
    finally:
        for model, swarm in zip(models, twins):
            model.close()
            swarm.close()
