"""``swarm join --devices`` serves one peer per device listed (issue 24), as a user runs it: one
command, a peer process per device, each with its own identity and state dir, measured and placed
like any peer; Ctrl+C stops them all. On a machine without a GPU the devices are ``cpu,cpu``: the
same fan-out as ``--devices 0,1`` on two GPUs."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import psutil
import pytest

from shards.tiny import make_tiny_model
from swarm.procs import ProcessGroup

pytestmark = pytest.mark.slow


def _status(address: str) -> dict:
    result = subprocess.run([sys.executable, "-m", "swarm.cli", "status", "--bootstrap", address, "--json"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)


def _join_two_devices(procs: ProcessGroup, tmp_path, root) -> tuple[str, subprocess.Popen]:
    """A bootstrap and ``swarm join --devices cpu,cpu`` whose two peers both serve."""
    model_dir = make_tiny_model(tmp_path / "model", "gpt2", num_layers=4, hidden_size=32, num_heads=4)
    address = procs.start_bootstrap(["--open", "--model", str(model_dir), "--num-stages", "2", "--host",
                                     "127.0.0.1", "--port", "0", "--state-dir", str(root / "boot")])
    join = procs.start("join", ["join", "--bootstrap", address, "--host", "127.0.0.1", "--threads", "1",
                                "--state-dir", str(root / "machine"), "--devices", "cpu,cpu"])
    procs.wait_for_line("join", join, "serving on 2 devices, one peer each: cpu, cpu")
    lines = [procs.wait_for_line("join", join, f"{name}: ") for name in ("cpu-0", "cpu-1")]
    assert all("Ctrl+C to leave" in line for line in lines), lines
    return address, join


@pytest.mark.timeout(300)
def test_join_with_two_devices_serves_two_peers_and_stops_them_all(tmp_path):
    root = tmp_path / "run"
    root.mkdir()
    procs = ProcessGroup(root)
    try:
        address, join = _join_two_devices(procs, tmp_path, root)
        status = _status(address)
        online = {p["peer_id"]: p for p in status["peers"]}
        assert len(online) == 2, status["peers"]
        assert sorted(s for p in online.values() for s in p["stages"]) == [0, 1]  # split, as peers joining at once
        assert all(p["hardware"]["device"] == "cpu" and p["hardware"]["gpus"] == [] for p in online.values())
        assert (root / "machine" / "cpu-0").is_dir() and (root / "machine" / "cpu-1").is_dir()
        for name in ("cpu-0", "cpu-1"):  # each peer's own output, in the log the launcher keeps for it
            assert "device    cpu (no GPU), float32" in (root / "machine" / "device-logs" / f"{name}.log").read_text()
        procs.stop_all()
        assert join.returncode == 0, (root / "join.log").read_text()[-3000:]
        log = (root / "join.log").read_text()
        assert "leaving the swarm..." in log
    finally:
        procs.stop_all()


@pytest.mark.timeout(300)
def test_a_device_peer_that_dies_stops_the_set_and_join_exits_non_zero(tmp_path):
    """A supervisor (systemd, compose) restarts ``swarm join`` on a non-zero exit: when one device's
    peer dies, the others are stopped and the command says which one died and how."""
    root = tmp_path / "run"
    root.mkdir()
    procs = ProcessGroup(root)
    try:
        _, join = _join_two_devices(procs, tmp_path, root)
        children = psutil.Process(join.pid).children()
        victim = next(c for c in children if str(root / "machine" / "cpu-0") in " ".join(c.cmdline()))
        others = [c for c in children if c.pid != victim.pid]
        victim.send_signal(signal.SIGKILL)
        assert join.wait(timeout=120) == 2, (root / "join.log").read_text()[-3000:]
        log = (root / "join.log").read_text()
        assert "a device's peer left: cpu-0 exited with code -9" in log, log[-3000:]
        gone, alive = psutil.wait_procs(others, timeout=30)
        assert not alive, f"left running: {alive}"
    finally:
        procs.stop_all()
