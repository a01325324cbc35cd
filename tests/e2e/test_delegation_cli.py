"""Delegation from the CLI, each side its own process: `swarm join --accept-delegations` and
`swarm join --delegate-to ... --delegation-token ...` (settings also from SWARM_DELEGATION__* env),
`swarm status` showing the link and the delegate's sessions, clean Ctrl+C on both sides."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from swarm.procs import ProcessGroup

pytestmark = pytest.mark.slow

SWARM = [sys.executable, "-m", "swarm.cli"]
TOKEN = "cli-delegation-token-0123456789"
FAST = {"SWARM_MONITOR__INTERVAL": "1", "SWARM_DELEGATION__POLL_INTERVAL": "0.5"}


def _status(*args: str) -> dict:
    result = subprocess.run(SWARM + ["status", *args, "--json"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_delegate_and_delegator_from_the_cli(model_factory, tmp_path):
    model_dir = model_factory("gpt2", num_layers=4, hidden_size=32)
    procs = ProcessGroup(tmp_path)
    try:
        address = procs.start_swarm(model_dir, num_stages=2, num_peers=0, state_dir=tmp_path / "state")
        delegate = procs.start("delegate", [
            "join", "--bootstrap", address, "--host", "127.0.0.1", "--threads", "1", "--stage", "0",
            "--state-dir", str(tmp_path / "delegate"), "--accept-delegations", "--delegation-token", TOKEN,
        ], env=FAST | {"SWARM_DELEGATION__MAX_SESSIONS": "3"})
        line = procs.wait_for_line("delegate", delegate, "--delegate-to")
        delegate_addr = line.split("--delegate-to", 1)[1].split()[0]

        # a wrong token (one-line error, exit 2) and the right one, started side by side to save time
        refused = subprocess.Popen(SWARM + ["join", "--bootstrap", address, "--host", "127.0.0.1", "--delegate-to",
                                            delegate_addr, "--delegation-token", "not-the-token", "--state-dir",
                                            str(tmp_path / "refused")], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        weak = procs.start("weak", ["join", "--bootstrap", address, "--host", "127.0.0.1", "--delegate-to",
                                    delegate_addr, "--delegation-token", TOKEN, "--state-dir", str(tmp_path / "weak")],
                           env=FAST | {"SWARM_DELEGATION__STAGE": "1"})
        _, errors = refused.communicate(timeout=120)
        assert refused.returncode == 2 and "does not accept that delegation token" in errors, errors
        assert "Traceback" not in errors
        weak_id = procs.wait_for_line("weak", weak, "delegator ").split("delegator ", 1)[1].split()[0]
        served = procs.wait_for_line("weak", weak, "stage 1 active")
        assert "delegation_mode on" in served and "0 GPU(s)" in served

        report = _status("--bootstrap", address)
        delegate_id = delegate_addr.rsplit("/p2p/", 1)[1]
        assert report["delegations"] == [{"delegate": delegate_id, "delegator": weak_id, "stage": 1, "gpu_count": 0}]
        sessions = _status("--bootstrap", address, "--delegate", delegate_addr)
        assert (sessions["total_sessions"], sessions["active_sessions"], sessions["max_sessions"]) == (1, 1, 3)
        assert [(s["delegator"], s["stage"], s["status"]) for s in sessions["sessions"]] == [(weak_id, 1, "active")]

        weak.send_signal(2)  # Ctrl+C: the delegator stops its session and leaves
        assert weak.wait(timeout=60) == 0
        procs.wait_for_line("delegate", delegate, "stopped by its delegator")
        assert "1 of 3 sessions active" in (tmp_path / "delegate.log").read_text()  # its live line
    finally:
        procs.stop_all()
    assert all(proc.returncode == 0 for _, proc in procs.procs), [(n, p.returncode) for n, p in procs.procs]


def test_delegating_and_accepting_at_once_is_refused(tmp_path):
    peer = "/ip4/127.0.0.1/tcp/1/p2p/QmPp7mVpGjGpud2UMFiQ5a9j7natSgHTHmtStNPVbCernk"
    result = subprocess.run(SWARM + ["join", "--bootstrap", peer, "--accept-delegations", "--delegate-to", peer],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 2 and "exclude each other" in result.stderr, result.stderr
