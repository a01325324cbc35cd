"""Run control and metrics over a real swarm: the owner pauses, resumes and stops through the
bootstrap's state.db (as `swarm run` does); a trainer waits and then ends, peers leave; the
bootstrap folds the trainer's and peers' reports into its history; a forged control record is ignored."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from dht.schemas import RunControl, RunState, control_key
from dht.control import get_control
from hivemind.utils import get_dht_time
from core.errors import RunStopped

pytestmark = pytest.mark.slow


def _wait(predicate, timeout: float = 20.0, period: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(period)
    return False


def test_pause_resume_stop_and_metrics(model_factory, swarm_factory):
    swarm = swarm_factory(model_factory("gpt2", num_layers=2, hidden_size=32, num_heads=4), num_stages=2, num_peers=2,
                          target_batch_size=2, metrics_interval=0.5)
    db = swarm.bootstrap.db
    batch = torch.randint(0, 64, (2, 8))
    with swarm.client() as model:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for step in range(3):
            loss = model(batch, labels=batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            model.report_progress(step + 1, loss.item(), 10.0)
        # the trainer fed 3 batches of 2, and each stage did the backward of each
        expected = {model.dht.peer_id: 6} | {p.peer_id: 6 for p in swarm.peers}
        tallies = lambda: {c.peer_id: c.samples for c in db.contributions()}  # noqa: E731
        assert _wait(lambda: tallies() == expected and db.metrics_history()[-1].loss is not None), tallies()
        assert db.step() == 3
        last = db.metrics_history()[-1]
        assert last.loss == pytest.approx(loss.item(), rel=1e-5) and last.peers == 2
        assert {e.action for e in db.audit_log()} >= {"peer.join", "bootstrap.start"}

        # a peer forges a control record under its own subkey: nobody obeys it
        peer_dht = swarm.peers[0].dht
        forged = RunControl(state=RunState.STOPPED, changed_at=get_dht_time() + 1e6)

        async def forge() -> bool:
            return await peer_dht.dht.store(control_key(swarm.run_id), forged.model_dump(mode="json"),
                                            get_dht_time() + 60, subkey=peer_dht._subkey(), return_future=True)

        stored = swarm.loop.run(forge())
        assert stored  # accepted by the DHT (a valid record of its own) ...
        assert swarm.loop.run(get_control(peer_dht)).state == RunState.RUNNING  # ... but not trusted

        db.set_run_state("paused", actor="test")
        assert _wait(lambda: model.run_state == RunState.PAUSED, timeout=10)
        done = threading.Event()
        said: list[str] = []

        def step_while_paused() -> None:
            model.wait_while_paused(on_pause=lambda: said.append("paused"))
            done.set()

        waiter = threading.Thread(target=step_while_paused)
        waiter.start()
        time.sleep(1.5)
        assert not done.is_set() and said == ["paused"]
        db.set_run_state("running", actor="test")
        assert done.wait(10)
        waiter.join()

        db.set_run_state("stopped", actor="test")
        assert _wait(lambda: model.run_state == RunState.STOPPED, timeout=10)
        with pytest.raises(RunStopped):
            model(batch, labels=batch)
        assert _wait(lambda: all(p._closed.is_set() for p in swarm.peers), timeout=15)
    actions = [e.action for e in db.audit_log() if e.action.startswith("run.")]
    assert actions == ["run.stopped", "run.running", "run.paused"]  # newest first
