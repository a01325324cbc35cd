"""The CLI as a user runs it: separate processes, real signals, one-line errors."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.slow

SWARM = [sys.executable, "-m", "swarm.cli"]
ENV = os.environ | {"PYTHONUNBUFFERED": "1", "COLUMNS": "200", "SWARM_BOOTSTRAP__DASHBOARD_PORT": "0"}


def _start(args: list[str], log: Path) -> subprocess.Popen:
    # its own process group, as a command started from a shell prompt has
    return subprocess.Popen(SWARM + args, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, env=ENV, start_new_session=True)


def _wait_for(log: Path, proc: subprocess.Popen, needle: str, timeout: float = 90) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in log.read_text(errors="replace").splitlines():
            if needle in line:
                return line
        assert proc.poll() is None, f"exited early:\n{log.read_text()}"
        time.sleep(0.2)
    raise AssertionError(f"{needle!r} not seen in {log}:\n{log.read_text()}")


def _descendants(proc: subprocess.Popen) -> list[psutil.Process]:
    try:
        return psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _terminate(proc: subprocess.Popen, how: str = "SIGTERM") -> tuple[int, list[psutil.Process]]:
    """Stop a swarm process with ``how``: "SIGTERM" (to the process, as a service manager does) or
    "Ctrl+C" (SIGINT to its whole process group, as a terminal does). Return its exit code and any
    descendant (DHT process, p2pd) still alive afterwards."""
    descendants = _descendants(proc)
    assert descendants, "a running swarm process has its DHT process and p2pd below it"
    if how == "Ctrl+C":
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=60)
    _, alive = psutil.wait_procs(descendants, timeout=10)
    for leftover in alive:
        leftover.kill()
    return code, alive


def _address(line: str) -> str:
    return line.split("--bootstrap", 1)[1].split()[0]


def test_bootstrap_join_status_and_clean_shutdown(model_factory, tmp_path):
    model_dir = model_factory("gpt2", num_layers=4, hidden_size=32)
    state = tmp_path / "state"
    boot_args = ["bootstrap", "--open", "--model", str(model_dir), "--num-stages", "2", "--host", "127.0.0.1",
                 "--port", "0", "--state-dir", str(state)]
    boot = _start(boot_args, tmp_path / "boot.log")
    procs = [boot]
    try:
        address = _address(_wait_for(tmp_path / "boot.log", boot, "swarm join --bootstrap"))
        assert address.startswith("/ip4/127.0.0.1/tcp/")
        peers = []
        for i in range(2):
            peer = _start(["join", "--bootstrap", address, "--host", "127.0.0.1", "--threads", "1",
                           "--state-dir", str(tmp_path / f"state-peer{i}")], tmp_path / f"peer{i}.log")
            procs.append(peer)
            peers.append(peer)
            # room for both stages: alone, the first serves them both; placement decides where the second goes
            # (tests/unit/test_placement.py and tests/e2e/test_free_placement.py check where)
            _wait_for(tmp_path / f"peer{i}.log", peer, "Ctrl+C to leave", timeout=120)
            if i == 0:
                assert "serving stages 0-1 (layers [0, 4))" in (tmp_path / "peer0.log").read_text()
            # the measurement is shown; the second peer times its link to the first
            joined = (tmp_path / f"peer{i}.log").read_text()
            assert "tokens/s[/] for one stage" not in joined and " tokens/s for one stage" in joined
            assert bool(re.search(r"latency [0-9.]+ ms, bandwidth [0-9,]+ Mbit/s", joined)) == (i == 1), joined[-1500:]
        status = subprocess.run(SWARM + ["status", "--bootstrap", address, "--json"], capture_output=True,
                                text=True, timeout=120, env=ENV)
        assert status.returncode == 0, status.stderr
        report = json.loads(status.stdout)
        assert [s["index"] for s in report["stages"]] == [0, 1]
        assert [s["layers"] for s in report["stages"]] == [[0, 2], [2, 4]]
        assert all(s["peers"] for s in report["stages"]), report["stages"]  # every stage served
        assert len(report["peers"]) == 2 and all(p["stages"] for p in report["peers"]), report["peers"]
        assert all(p["throughput"] > 0 and p["state"] in ("online", "draining") for p in report["peers"])

        table = subprocess.run(SWARM + ["status", "--bootstrap", address], capture_output=True, text=True,
                               timeout=120, env=ENV)
        assert table.returncode == 0 and "[0, 2)" in table.stdout and "online" in table.stdout

        for how, peer in zip(("SIGTERM", "Ctrl+C"), peers):
            code, leftovers = _terminate(peer, how)
            assert code == 0 and not leftovers, f"{how}: exit {code}, left {leftovers}"
        code, leftovers = _terminate(boot, "Ctrl+C")
        assert code == 0 and not leftovers, f"exit {code}, left {leftovers}"

        # the bootstrap keeps its identity and port: same multiaddr after a restart
        again = _start(boot_args[:-4] + ["--state-dir", str(state)], tmp_path / "boot2.log")
        procs.append(again)
        assert _address(_wait_for(tmp_path / "boot2.log", again, "swarm join --bootstrap")) == address
        code, leftovers = _terminate(again)
        assert code == 0 and not leftovers
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.mark.parametrize(
    "args, words",
    [
        (["join", "--port", "notaport"], "Invalid value for '--port'"),
        (["bootstrap", "--model", "/no/such/model", "--host", "127.0.0.1"], "/no/such/model does not exist"),
        (["bootstrap", "--num-stages", "3"], "needs --model"),
        (["join"], "--bootstrap"),
        (["status"], "--bootstrap"),
        (["frobnicate"], "No such command"),
        (["join", "--bootstrap", "not-a-multiaddr"], "'not-a-multiaddr' is not a multiaddr"),
        (["status", "--bootstrap", "/ip4/127.0.0.1/tcp/9"], "lacks the peer id"),
        # rich read the bracketed address as a closing tag: a MarkupError traceback instead of this line
        (["train", "--bootstrap", "[/ip4/127.0.0.1/tcp/1]"], "'[/ip4/127.0.0.1/tcp/1]' is not a multiaddr"),
        (["join", "--bootstrap", "/ip4/127.0.0.1/tcp/1/p2p/x", "--config", "/no/such.toml"], "does not exist"),
        (["train", "--bootstrap", "/ip4/127.0.0.1/tcp/1/p2p/QmZz3MAFD5zNBuGo1kMoD83gihnmRCdbXN9Xxw47iv5nXu",
          "--eval-every", "5"], "--eval-every needs --eval-split"),
        (["train", "--bootstrap", "/ip4/127.0.0.1/tcp/1/p2p/x", "--data-shards", "0"],
         "Invalid value for '--data-shards'"),
        (["bootstrap", "--model", "/no/such/model", "--dataset", "/no/such/texts.jsonl"],
         "--dataset /no/such/texts.jsonl: no such file or directory"),
    ],
)
def test_bad_arguments_give_one_line_errors(args, words, tmp_path):
    result = subprocess.run(SWARM + args + ["--state-dir", str(tmp_path)] * (args[0] == "bootstrap"),
                            capture_output=True, text=True, timeout=60, env=ENV, cwd=tmp_path)
    assert result.returncode == 2, result
    assert words in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_broken_config_file_is_named(tmp_path):
    config = tmp_path / "swarm.toml"
    config.write_text("[network]\nport = 'high'\n")
    result = subprocess.run(SWARM + ["join", "--bootstrap", "/ip4/127.0.0.1/tcp/1"], capture_output=True,
                            text=True, timeout=60, env=ENV, cwd=tmp_path)
    assert result.returncode == 2
    assert "network.port" in result.stderr and "Traceback" not in result.stderr


def test_a_killed_swarm_process_takes_its_dht_process_and_p2pd_along(model_factory, tmp_path):
    """SIGKILL gives the process no chance to clean up; the kernel ends its children for it."""
    model_dir = model_factory("gpt2", num_layers=2, hidden_size=32)
    boot = _start(["bootstrap", "--open", "--model", str(model_dir), "--host", "127.0.0.1", "--state-dir",
                   str(tmp_path / "state")], tmp_path / "boot.log")
    try:
        _wait_for(tmp_path / "boot.log", boot, "swarm join --bootstrap")
        descendants = [p for p in _descendants(boot) if p.name() != "torch_shm_manager"]
        assert {p.name() for p in descendants} >= {"p2pd"}, descendants
        boot.kill()
        boot.wait(timeout=10)
        _, alive = psutil.wait_procs(descendants, timeout=15)
        for leftover in alive:
            leftover.kill()
        assert not alive, f"orphans after SIGKILL: {alive}"
    finally:
        if boot.poll() is None:
            boot.kill()
            boot.wait()


def test_a_revoked_join_exits_non_zero_for_its_supervisor(model_factory, swarm_factory, tmp_path):
    """systemd's Restart=on-failure and compose's restart policy act on the exit code: a peer cut off
    by the owner leaves cleanly, says why in one line, and exits 2 (a stopped run still exits 0)."""
    swarm = swarm_factory(model_factory("gpt2", num_layers=2, hidden_size=32), num_stages=1, num_peers=0,
                          open=False)
    key = swarm.bootstrap.db.create_key("service", actor="test")
    log = tmp_path / "peer.log"
    peer = _start(["join", "--bootstrap", swarm.initial_peers[0], "--host", "127.0.0.1", "--threads", "1",
                   "--key", key.secret, "--run", swarm.run_id, "--state-dir", str(tmp_path / "peer")], log)
    try:
        _wait_for(log, peer, "Ctrl+C to leave", timeout=120)
        descendants = _descendants(peer)
        swarm.bootstrap.db.revoke_key(key.key.id, actor="cli:test")  # what `swarm keys revoke` does
        code = peer.wait(timeout=90)
        _, alive = psutil.wait_procs(descendants, timeout=10)
        text = log.read_text()
        assert code == 2 and not alive, text[-2000:]
        assert "error: this peer's API key was revoked by the run owner" in text and "Traceback" not in text
    finally:
        if peer.poll() is None:
            peer.kill()
            peer.wait()
