"""Trainers on a real dataset through a real swarm (hivemind DHT/P2P, the bootstrap's SQLite leases):
two trainers read disjoint samples; a trainer that dies without giving its shard back has it taken
over, after the lease expires, from the position it last committed; the held-out loss computed
through the swarm equals a local evaluation of the same weights, and reaches the bootstrap (status,
Prometheus)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from dht.schemas import DatasetSpec
from peers.data.client import DataClient, find_data_service
from swarm.assigned import AssignedBatches
from swarm.evaluation import eval_batches, evaluate
from swarm.text import ByteCodec
from swarm.text_data import Packer, shard_texts, open_split

pytestmark = pytest.mark.slow

MODEL = dict(family="gpt2", num_layers=2, hidden_size=32, num_heads=4, vocab_size=256, max_positions=64)
SEQ, BATCH, LR = 16, 4, 3e-3
TTL = 5.0


def _dataset(directory: Path) -> Path:
    directory.mkdir()
    with open(directory / "train.jsonl", "w") as f:
        for i in range(80):
            f.write(json.dumps({"text": f"sample {i}: " + "the quick brown fox " * (i % 3 + 1)}) + "\n")
    with open(directory / "test.jsonl", "w") as f:
        for i in range(12):
            f.write(json.dumps({"text": f"held out {i}: jumps over the lazy dog"}) + "\n")
    return directory


def _train(model, data: AssignedBatches, optimizer, steps: int) -> list[float]:
    """The plain loop, committing the data position after every step."""
    losses = []
    for _ in range(steps):
        ids = next(data)
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        data.commit(model.step)
        losses.append(loss.item())
    return losses


@pytest.mark.timeout(600)
def test_two_trainers_read_disjoint_samples_and_a_dead_ones_shard_is_taken_over(model_factory, swarm_factory,
                                                                                  tmp_path: Path):
    spec = DatasetSpec(source=str(_dataset(tmp_path / "data")), num_shards=4)
    swarm = swarm_factory(model_factory(**MODEL), num_stages=2, num_peers=0, pin_stages=False,
                          target_batch_size=BATCH, lr=LR, data={"lease_ttl": TTL})
    swarm.add_peers_at_once(2)
    with swarm.client() as first, swarm.client() as second:
        a = AssignedBatches.for_model(first, spec, batch_size=BATCH, seq_len=SEQ)
        b = AssignedBatches.for_model(second, spec, batch_size=BATCH, seq_len=SEQ)
        opt_a, opt_b = first.create_optimizer(), second.create_optimizer()
        losses = []
        for _ in range(3):  # taking turns: each batch fills a step of its own
            losses += _train(first, a, opt_a, 1) + _train(second, b, opt_b, 1)
        ids_a = {i for span in a.spans for i in span.sample_ids(spec.num_shards)}
        ids_b = {i for span in b.spans for i in span.sample_ids(spec.num_shards)}
        assert ids_a and ids_b and not ids_a & ids_b, (a.spans, b.spans)
        assert {i % 4 for i in ids_a} == {a.lease.shard} != {i % 4 for i in ids_b} == {b.lease.shard}
        assert second.step == 6 and all(torch.isfinite(torch.tensor(losses)))
        dead_shard, committed = a.lease.shard, a.committed
        book = swarm.bootstrap.data.book
        row = next(r for r in book.rows(spec.dataset_id) if r.shard == dead_shard)
        assert (row.holder, row.doc, row.offset, row.step) == (first.dht.peer_id, committed.doc, committed.offset,
                                                               committed.step)
        left = b.lease.shard
        b.close()  # leaves: its shard is given back at once, at its committed position
        released = next(r for r in book.rows(spec.dataset_id) if r.shard == left)
        assert released.holder is None and (released.doc, released.offset) == (b.committed.doc, b.committed.offset)
        # `first` dies here: no more renewals, its shard is not given back
        a._heartbeat.cancel()
        a._heartbeat = None
        status = swarm.loop.run(swarm.bootstrap.status_report(max_age=0), timeout=60)
        assert (status.data.epoch, status.data.shards_in_progress, status.data.tokens) == (
            0, 1, (committed.tokens - 0) + b.committed.tokens)
        time.sleep(TTL + 1)
        c = AssignedBatches.for_model(second, spec, batch_size=BATCH, seq_len=SEQ)
        first_batch = next(c)
        assert (c.lease.shard, c.lease.position.doc, c.lease.position.offset) == (dead_shard, committed.doc,
                                                                                  committed.offset)
        expected = Packer(shard_texts(open_split(spec), spec, dead_shard, committed.doc), ByteCodec(), SEQ,
                          start=committed)
        assert first_batch.tolist() == [expected.next().tokens for _ in range(BATCH)]
        c.close()
        a.lease = None  # the dead trainer's object must not give back what is now another's


@pytest.mark.timeout(600)
def test_the_eval_loss_through_the_swarm_equals_a_local_evaluation_and_reaches_the_bootstrap(
        model_factory, swarm_factory, tmp_path: Path):
    data = _dataset(tmp_path / "data")
    spec = DatasetSpec(source=str(data), num_shards=2)
    swarm = swarm_factory(model_factory(**MODEL), num_stages=2, num_peers=2, target_batch_size=BATCH, lr=LR,
                          metrics_interval=1.0)
    held_out = eval_batches(spec.model_copy(update={"split": "test"}), ByteCodec(), batch_size=BATCH, seq_len=SEQ,
                            batches=3)
    with swarm.client() as model:
        with AssignedBatches.for_model(model, spec, batch_size=BATCH, seq_len=SEQ) as batches:
            _train(model, batches, model.create_optimizer(), 3)
        before = evaluate(model, held_out)
        swarm_eval = evaluate(model, held_out)
        assert model.step == 3  # evaluating is no step
        model.save_pretrained(tmp_path / "weights")
        client = DataClient(model.pipeline.client.transport, lambda: find_data_service(model.dht))
        perplexity = model.loop.run(client.report_eval(spec.dataset_id, model.step, swarm_eval.loss, swarm_eval.tokens),
                                    timeout=60)
    local = evaluate(AutoModelForCausalLM.from_pretrained(tmp_path / "weights"), held_out)
    assert before == swarm_eval and swarm_eval.tokens == local.tokens == sum(b.shape[0] * (SEQ - 1) for b in held_out)
    assert swarm_eval.loss == pytest.approx(local.loss, rel=1e-5, abs=1e-6)
    assert perplexity == pytest.approx(swarm_eval.perplexity, rel=1e-9)
    status = swarm.loop.run(swarm.bootstrap.status_report(max_age=0), timeout=60)
    assert (status.eval.step, status.eval.tokens) == (3, swarm_eval.tokens)
    assert status.eval.loss == pytest.approx(swarm_eval.loss, rel=1e-9)
    registry = swarm.bootstrap.telemetry.metrics.registry
    assert registry.get_sample_value("swarm_eval_loss") == pytest.approx(swarm_eval.loss, rel=1e-9)
    assert registry.get_sample_value("swarm_eval_step") == 3
    assert registry.get_sample_value("swarm_data_shards_in_progress") == 0  # the trainer gave its shard back
    assert registry.get_sample_value("swarm_data_tokens") == 3 * BATCH * SEQ


@pytest.mark.timeout(300)
def test_the_example_fine_tunes_on_a_local_jsonl_file(model_factory, swarm_factory, tmp_path: Path):
    import subprocess
    import sys

    data = _dataset(tmp_path / "data") / "train.jsonl"
    swarm = swarm_factory(model_factory(**MODEL), num_stages=2, num_peers=2, target_batch_size=BATCH, lr=LR)
    example = Path(__file__).resolve().parents[2] / "examples" / "finetune_jsonl.py"
    result = subprocess.run([sys.executable, str(example), "--bootstrap", swarm.initial_peers[0], "--data", str(data),
                             "--steps", "5", "--seq-len", str(SEQ), "--shards", "2", "--run", "test"],
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    steps = [line.split() for line in result.stdout.splitlines() if line.startswith("step")]
    assert [int(s[1]) for s in steps] == list(range(5)) and {s[5] for s in steps} == {"0"}
    assert "perplexity" in result.stdout.splitlines()[-1]
    [row] = swarm.bootstrap.data.book.rows(DatasetSpec(source=str(data), num_shards=2).dataset_id)
    assert (row.shard, row.holder, row.tokens, row.step) == (0, None, 5 * BATCH * SEQ, 5)  # given back on exit
