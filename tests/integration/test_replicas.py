"""Replicas and data-parallel trainers over real hivemind DHT, P2P and averaging on loopback."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from dht.schemas import PeerState
from trainer.pipeline import FaultPolicy

pytestmark = pytest.mark.slow

MODEL = dict(family="llama", num_layers=4, hidden_size=32, num_heads=4, num_kv_heads=2)
POLICY = FaultPolicy(averaging_window=0.3)


def _batch(seed: int, rows: int = 4) -> torch.Tensor:
    return torch.randint(0, 8, (rows, 12), generator=torch.Generator().manual_seed(seed))


def _spread_over_replicas(model) -> None:
    """Announce every replica with the same throughput, so routes pick among them at random and the
    microbatches of one step land on different replicas of a stage."""
    source = model.pipeline.replicas.source

    async def equalised():
        records = await source()
        return {stage: [r.model_copy(update={"throughput": 1.0}) for r in rs] for stage, rs in records.items()}

    model.pipeline.replicas.source = equalised


def _max_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a.parameters(), b.parameters()))


def test_replicas_average_each_step_and_follow_local_training(model_factory, swarm_factory):
    """Two replicas per stage, microbatches spread over them: after every step the replicas hold the
    same parameters (<= 1e-5) and the losses follow transformers trained locally."""
    model_dir = model_factory(**MODEL)
    swarm = swarm_factory(model_dir, num_stages=2, num_peers=4, target_batch_size=4, lr=1e-2)
    by_stage = {s: [p for p in swarm.peers if p.record.stage == s] for s in (0, 1)}
    assert all(len(peers) == 2 for peers in by_stage.values())
    reference = AutoModelForCausalLM.from_pretrained(model_dir)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.01)
    with swarm.client(microbatch_size=1, policy=POLICY) as model:
        _spread_over_replicas(model)
        optimizer = model.create_optimizer()
        for step in range(4):
            ids = _batch(step)
            loss = model(ids, labels=ids).loss
            loss.backward()
            assert optimizer.step(), "a batch of target_batch_size rows closes the step"
            optimizer.zero_grad()
            expected = reference(ids, labels=ids).loss
            expected.backward()
            ref_opt.step()
            ref_opt.zero_grad()
            assert abs(loss.item() - expected.item()) <= 1e-3 * abs(expected.item()), f"step {step}"
            for first, second in by_stage.values():
                assert first.service.executor.optimizer_step == second.service.executor.optimizer_step == step + 1
                assert _max_diff(first.service.executor.module, second.service.executor.module) <= 1e-5
        served = [p.service.requests_served for p in swarm.peers]
        assert all(n > 4 for n in served), f"every replica computed microbatches: {served}"
        assert model.step == 4


def _train_together(trainers, optimizers, steps: int) -> dict[int, list[float]]:
    """Each trainer in its own thread, half the target batch each, its own (small) data set, every
    step closed by both; returns each trainer's losses."""
    losses, errors = {i: [] for i in range(len(trainers))}, []
    barrier = threading.Barrier(len(trainers))

    def run(index: int) -> None:
        model, optimizer = trainers[index], optimizers[index]
        try:
            barrier.wait(timeout=60)
            for step in range(steps):
                ids = _batch(1000 * index + step % 2)
                loss = model(ids, labels=ids).loss
                loss.backward()
                assert optimizer.step(), f"trainer {index}: step {step} did not close"
                optimizer.zero_grad()
                losses[index].append(loss.item())
        except BaseException as e:  # reported below: a thread's failure must fail the test
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(trainers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    return losses


def test_two_trainers_train_the_same_swarm_data_parallel(model_factory, swarm_factory):
    """Two trainers with different data, each half the target batch: every collaborative step has
    both, their local parts are summed so they stay equal, and both losses fall."""
    model_dir = model_factory(**MODEL)
    swarm = swarm_factory(model_dir, num_stages=2, num_peers=2, target_batch_size=8, lr=1e-2)
    steps = 6
    with swarm.client(policy=POLICY) as first, swarm.client(policy=POLICY) as second:
        losses = _train_together((first, second), (first.create_optimizer(), second.create_optimizer()), steps)
        assert first.step == second.step == steps
        assert [p.service.executor.optimizer_step for p in swarm.peers] == [steps, steps]
        assert _max_diff(first.local, second.local) <= 1e-5
        records = swarm.loop.run(swarm.bootstrap.dht.trainer_records())
        assert sorted(r.step for r in records if r.online) == [steps, steps]
    for index in (0, 1):
        assert losses[index][-1] < losses[index][0], losses[index]


def test_a_trainer_joining_mid_run_takes_the_local_parts_of_the_others(model_factory, swarm_factory):
    """A second trainer that joins after three steps starts from the first one's embeddings, head
    and AdamW state (hivemind state sharing), not from the model files; training together after
    that keeps both equal."""
    model_dir = model_factory(**MODEL)
    swarm = swarm_factory(model_dir, num_stages=2, num_peers=2, target_batch_size=8, lr=1e-2)
    with swarm.client(policy=POLICY) as first:
        first_optimizer = first.create_optimizer()
        for step in range(3):
            ids = _batch(step, rows=8)
            first(ids, labels=ids).loss.backward()
            assert first_optimizer.step()
            first_optimizer.zero_grad()
        with swarm.client(policy=POLICY) as second:
            assert _max_diff(first.local, second.local) == 0.0
            second_optimizer = second.create_optimizer()
            moments = [(first_optimizer.optimizer.state[a]["exp_avg"], second_optimizer.optimizer.state[b]["exp_avg"])
                       for a, b in zip(first.local.parameters(), second.local.parameters())]
            assert all(torch.equal(x, y) for x, y in moments)
            assert second.pipeline.step == first.step == 3
            _train_together((first, second), (first_optimizer, second_optimizer), 2)
            assert first.step == second.step == 5
            assert _max_diff(first.local, second.local) <= 1e-5


def test_a_new_replica_joins_a_running_stage_at_its_current_step(model_factory, swarm_factory):
    """A replica that joins mid-run takes the state of the others and is a member of the steps once
    the trainer's view has it (read in the background: the first step after the join may come before
    that read, and then the newcomer takes that step from the others, ``ResyncWatch``)."""
    model_dir = model_factory(**MODEL)
    swarm = swarm_factory(model_dir, num_stages=2, num_peers=2, target_batch_size=4, lr=1e-2)
    with swarm.client(policy=POLICY) as model:
        optimizer = model.create_optimizer()
        for step in range(2):
            ids = _batch(step)
            model(ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        newcomer = swarm.add_peer(stage=1)
        old = next(p for p in swarm.peers if p.record.stage == 1 and p is not newcomer)
        assert newcomer.record.state == PeerState.ONLINE
        assert newcomer.service.executor.optimizer_step == old.service.executor.optimizer_step == 2
        assert _max_diff(newcomer.service.executor.module, old.service.executor.module) <= 1e-5
        ids = _batch(7)
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        deadline = time.monotonic() + 30
        while newcomer.service.executor.optimizer_step != 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert newcomer.service.executor.optimizer_step == old.service.executor.optimizer_step == 3
        assert _max_diff(newcomer.service.executor.module, old.service.executor.module) <= 1e-5
        ids = _batch(8)  # the view has the newcomer by now: a member of this step
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        assert newcomer.service.executor.optimizer_step == old.service.executor.optimizer_step == 4
        assert _max_diff(newcomer.service.executor.module, old.service.executor.module) <= 1e-5
