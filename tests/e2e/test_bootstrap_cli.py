"""The bootstrap's state as its owner uses it: `swarm keys`, `swarm run`, and a kill -9 of the
bootstrap in the middle of training (the trainer and peers go on; the state survives a restart)."""

from __future__ import annotations

import json
import math
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch
from hivemind.utils.crypto import RSAPrivateKey

from bootstrap.state import StateDB
from dht.schemas import RunState
from peers.server import Peer
from core.loop import LoopThread
from core.config import load_settings
from core.errors import PeerUnavailable, RunStopped
from trainer.model import SwarmModelForCausalLM
from tests.e2e.test_cli import ENV, SWARM, _address, _descendants, _start, _terminate, _wait_for

pytestmark = pytest.mark.slow


def _swarm(*args: str, state: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(SWARM + list(args) + ["--state-dir", str(state)], capture_output=True, text=True,
                          timeout=timeout, env=ENV)


def _step(state: Path) -> int:
    db = StateDB(state / "swarm" / "state.db")
    try:
        return db.step()
    finally:
        db.close()


def _kill9(proc: subprocess.Popen) -> None:
    descendants = [p for p in _descendants(proc) if p.name() != "torch_shm_manager"]
    proc.kill()
    proc.wait(timeout=10)
    _, alive = psutil.wait_procs(descendants, timeout=15)
    assert not alive, f"orphans after SIGKILL: {alive}"


def _wait(predicate, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.3)
    return False


def _train(model, batch: torch.Tensor, optimizer, steps: range) -> list[float]:
    losses = []
    for step in steps:
        loss = model(batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        model.report_progress(step + 1, losses[-1], 1.0)
    return losses


def test_kill9_bootstrap_mid_training_and_restart(model_factory, tmp_path):
    """A keyed run. The bootstrap is a separate process killed with SIGKILL; peers and the trainer run
    in this process (cheaper than four more interpreters) over real DHT/P2P, as in the other tiers.
    Their tokens outlive the outage, so training and a join through a running peer go on."""
    model_dir = model_factory("gpt2", num_layers=2, hidden_size=32, num_heads=4)
    state = tmp_path / "state"
    boot_args = ["bootstrap", "--model", str(model_dir), "--num-stages", "2", "--host", "127.0.0.1",
                 "--target-batch-size", "2", "--state-dir", str(state)]
    ENV["SWARM_BOOTSTRAP__METRICS_INTERVAL"] = "0.5"
    procs: list[subprocess.Popen] = []
    loop = LoopThread("kill9-test")
    peers: list[Peer] = []
    model = None
    try:
        boot = _start(boot_args, tmp_path / "boot.log")
        procs.append(boot)
        address = _address(_wait_for(tmp_path / "boot.log", boot, "swarm join --bootstrap"))
        made = _swarm("keys", "create", "--name", "alice", "--expires", "30d", state=state)
        assert made.returncode == 0, made.stderr
        secret = made.stdout.strip()
        assert secret.startswith("swk_") and "shown only now" in made.stderr

        def join(stage: int, through: list[str]) -> Peer:
            peer = Peer(load_settings(key=secret, network={"host": "127.0.0.1", "initial_peers": through},
                                      peer={"stage": stage, "threads": 1}))
            peers.append(peer)
            loop.run(peer.start(), timeout=120)
            return peer

        join(0, [address])
        join(1, [address])
        model = SwarmModelForCausalLM.from_pretrained(str(model_dir), initial_peers=[address], key=secret)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        batch = torch.randint(0, 64, (2, 8))
        _train(model, batch, optimizer, range(3))
        assert _wait(lambda: _step(state) >= 3)
        _kill9(boot)

        # the bootstrap is gone: training goes on; a new peer finds the run through a running peer
        # but cannot get a token for its key until a bootstrap is back, and says so
        losses = _train(model, batch, optimizer, range(3, 6))
        assert all(math.isfinite(x) for x in losses)
        assert [p.service.executor.optimizer_step for p in peers] == [6, 6]
        with pytest.raises(PeerUnavailable):
            join(0, peers[1].maddrs)
        peers.pop()

        again = _start(boot_args, tmp_path / "boot2.log")
        procs.append(again)
        assert _address(_wait_for(tmp_path / "boot2.log", again, "swarm join --bootstrap")) == address
        listed = json.loads(_swarm("keys", "list", "--json", state=state).stdout)
        assert [(k["name"], k["state"]) for k in listed] == [("alice", "active")]

        # the tallies go on from where they were: 6 batches of 2 for the trainer and each stage
        expected = {model.dht.peer_id: 12, peers[0].peer_id: 12, peers[1].peer_id: 12}

        def shown() -> dict:
            return json.loads(_swarm("run", "show", state=state).stdout)

        assert _wait(lambda: {k: v for k, v in shown()["contributions"].items() if k in expected} == expected)
        assert shown()["step"] == 6 and shown()["state"] == "running"

        # the owner stops the run from the CLI: the peers leave by themselves, the trainer ends
        stopped = _swarm("run", "stop", state=state)
        assert stopped.returncode == 0 and "run is stopped" in stopped.stderr
        assert _wait(lambda: all(p._closed.is_set() for p in peers) and model.run_state == RunState.STOPPED)
        with pytest.raises(RunStopped):
            model(batch, labels=batch)
        db = StateDB(state / "swarm" / "state.db")
        actions = [e.action for e in db.audit_log()]
        db.close()
        assert actions[0] == "run.stopped" and "key.create" in actions and actions.count("bootstrap.start") == 2
        code, leftovers = _terminate(again)
        assert code == 0 and not leftovers
    finally:
        ENV.pop("SWARM_BOOTSTRAP__METRICS_INTERVAL", None)
        if model is not None:
            model.close()
        for peer in peers:
            loop.run(peer.stop(), timeout=60)
        loop.stop()
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.mark.parametrize("args, words", [
    (["keys", "list"], "no bootstrap state at"),
    (["keys", "create", "--name", "bob", "--expires", "3 fortnights"], "is not a duration"),
    (["keys", "revoke", "deadbeef"], "no API key with id"),
    (["keys", "create", "--name", "bob", "--scope", "root"], "unknown key scope 'root'"),
    (["run", "pause", "--run", "other"], "no bootstrap state at"),
])
def test_keys_and_run_errors_are_one_line(args, words, tmp_path):
    if args[:2] != ["keys", "list"]:  # the first case has no state at all
        (tmp_path / "swarm").mkdir()
        StateDB(tmp_path / "swarm" / "state.db").close()
    result = _swarm(*args, state=tmp_path)
    assert result.returncode == 2 and words in result.stderr and "Traceback" not in result.stderr, result


def test_keys_have_scopes_from_the_cli(tmp_path):
    (tmp_path / "swarm").mkdir()
    StateDB(tmp_path / "swarm" / "state.db").close()
    made = _swarm("keys", "create", "--name", "inference", "--scope", "api", "--scope", "admin", state=tmp_path)
    assert made.returncode == 0 and "(scope api,admin)" in made.stderr, made.stderr
    default = _swarm("keys", "create", "--name", "volunteer", state=tmp_path)
    listed = json.loads(_swarm("keys", "list", "--json", state=tmp_path).stdout)
    assert default.returncode == 0 and [(k["name"], k["scopes"]) for k in listed] == [
        ("inference", ["api", "admin"]), ("volunteer", ["join"])]


def test_bootstrap_help_documents_mirror():
    result = subprocess.run(SWARM + ["bootstrap", "--help"], capture_output=True, text=True, timeout=60,
                            env={**ENV, "COLUMNS": "200"})
    assert result.returncode == 0 and "--mirror" in result.stdout and "--authority-key" in result.stdout
    assert "authority.key" in result.stdout


_NOWHERE = "/ip4/127.0.0.1/tcp/9/p2p/QmbQ3pZqWtWfK1hSzV6XKdPEKJpkfhgfqGfmUbJZhEXPxV"


def test_unreachable_mirror_is_one_line(tmp_path):
    """The other bad mirror inputs (no key, a wrong key, not a key, not an address) are tested in
    process in tests/integration/test_mirror.py; this one checks the CLI's one-line error."""
    key = tmp_path / "authority.key"
    key.write_bytes(RSAPrivateKey().to_bytes())
    result = _swarm("bootstrap", "--mirror", _NOWHERE, "--authority-key", str(key), "--host", "127.0.0.1",
                    "--dashboard-port", "0", state=tmp_path / "state")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result
    assert f"cannot reach the bootstrap to mirror at {_NOWHERE}" in " ".join(result.stderr.split()), result.stderr
