"""The monitoring CLI as a user sees it: `swarm join` talking to its owner, `swarm status` live in a
real 80-column terminal (tmux), `swarm ledger verify` against the bootstrap, and the join's log file."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest
import torch

pytestmark = pytest.mark.slow

SWARM = [sys.executable, "-m", "swarm.cli"]
ENV = os.environ | {"PYTHONUNBUFFERED": "1", "COLUMNS": "200", "SWARM_MONITOR__INTERVAL": "1",
                    "SWARM_MONITOR__LEDGER_WINDOW": "1"}


def _wait_for(log: Path, proc: subprocess.Popen, needle: str, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        if needle in text:
            return text
        assert proc.poll() is None, f"exited early:\n{text}"
        time.sleep(0.2)
    raise AssertionError(f"{needle!r} not seen in {log}:\n{log.read_text()}")


class Tmux:
    """A private tmux server (its own socket) running one command in an 80-column window."""

    def __init__(self, command: list[str], width: int = 80, height: int = 50):
        if shutil.which("tmux") is None:
            pytest.fail("tmux is not installed: `make install` installs it (apt-get install tmux)")
        self.socket = f"swarm-test-{uuid.uuid4().hex[:8]}"
        line = " ".join(f"'{part}'" for part in command)
        self._tmux("new-session", "-d", "-s", "status", "-x", str(width), "-y", str(height),
                   f"env COLUMNS={width} TERM=xterm-256color {line}")

    def _tmux(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True, text=True, timeout=30)

    def screen(self) -> list[str]:
        return self._tmux("capture-pane", "-p", "-t", "status").stdout.splitlines()

    def wait_screen(self, *needles: str, timeout: float = 120) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lines = self.screen()
            if all(any(n in line for line in lines) for n in needles):
                return lines
            time.sleep(0.5)
        raise AssertionError(f"{needles} not on the screen:\n" + "\n".join(self.screen()))

    def ctrl_c_and_wait_exit(self, timeout: float = 60) -> bool:
        self._tmux("send-keys", "-t", "status", "C-c")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._tmux("has-session", "-t", "status").returncode != 0:
                return True
            time.sleep(0.3)
        return False

    def kill(self) -> None:
        self._tmux("kill-server")


def test_join_speaks_status_is_live_in_80_columns_ledger_verifies(model_factory, swarm_factory, tmp_path):
    model_dir = model_factory("gpt2", num_layers=2, hidden_size=32, num_heads=4)
    swarm = swarm_factory(model_dir, num_stages=2, num_peers=1, target_batch_size=2)  # stage 1 uncovered
    address = swarm.initial_peers[0]
    state = tmp_path / "joiner"
    log = tmp_path / "join.log"
    join = subprocess.Popen(SWARM + ["join", "--bootstrap", address, "--run", "test", "--host", "127.0.0.1",
                                     "--threads", "1", "--state-dir", str(state), "--metrics-port", "0",
                                     "--max-stages", "1"],  # the claim below is the one-stage one
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=ENV,
                            start_new_session=True)
    # started at once, the live view first shows the bootstrap's one peer, then the joiner as it comes
    tmux = Tmux(SWARM + ["status", "--bootstrap", address, "--run", "test", "--interval", "1"])
    try:
        text = _wait_for(log, join, "contributed")
        peer_id = text.split("identity  peer ", 1)[1].split()[0]
        assert "swarm join --bootstrap /ip4/127.0.0.1/tcp/" in text and f"/p2p/{peer_id} --run test" in text
        assert "reach     ok reachable on this machine only" in text and "fix: fine for a local swarm" in text
        # the claim names the placement decision: the empty stage, and the bottleneck it lifts (to this
        # peer's measured throughput, printed before it, or stage 0's if that is lower)
        claim = re.search(r"stage     1 \(layers \[1, 2\)\): nobody served it; bottleneck 0 -> (\d+) tokens/s; "
                          r"tokens/s per stage \{0:(\d+), 1:0\}", text)
        measured = re.search(r"measured ([\d,]+) tokens/s for one stage", text)
        assert claim and measured, text
        after, stage0, mine = int(claim.group(1)), int(claim.group(2)), int(measured.group(1).replace(",", ""))
        assert stage0 > 0 and mine > 0 and after == min(stage0, mine)
        assert "Prometheus metrics at http://127.0.0.1:" in text or "metrics   http://127.0.0.1:" in text

        with swarm.client() as remote:  # one training microbatch through both stages
            ids = torch.randint(0, 8, (2, 8), generator=torch.Generator().manual_seed(0))
            remote(ids, labels=ids).loss.backward()
        _wait_for(log, join, "contributed 32 tokens in 2 microbatches")  # forward + backward, 16 tokens each

        screen = tmux.wait_screen("stages x peers", peer_id[-8:], swarm.peers[0].peer_id[-8:], "32")
        assert max(len(line) for line in screen) <= 80, "\n".join(screen)
        joined = next(line for line in screen if peer_id[-8:] in line and "online" in line)
        assert "cpu" in joined and "G" in joined  # hardware column
        assert any("◀" in line for line in screen)  # the bottleneck stage is marked
        assert any("stage 0 has one replica" in line for line in screen)
        assert any("stage 1 has one replica" in line for line in screen)
        assert any("training" in line or "idle" in line for line in screen)
        assert tmux.ctrl_c_and_wait_exit(), "swarm status did not exit on Ctrl+C"

        verify = subprocess.run(SWARM + ["ledger", "verify", address, "--run", "test"], capture_output=True,
                                text=True, timeout=180, env=ENV)
        assert verify.returncode == 0, verify
        assert "OK:" in verify.stdout and peer_id in verify.stdout.replace("\n", "")

        descendants = psutil.Process(join.pid).children(recursive=True)
        os.killpg(join.pid, signal.SIGINT)
        assert join.wait(timeout=60) == 0
        _, alive = psutil.wait_procs(descendants, timeout=10)
        assert not alive
        records = [json.loads(line) for line in (state / "test" / "logs" / "join.log").read_text().splitlines()]
        serving = [r for r in records if r["msg"].startswith("serving stage 1")]
        assert serving and serving[0]["level"] == "INFO" and serving[0]["logger"] == "peers.server"
        assert any(r["peer"] == peer_id for r in records)
        own = [json.loads(line) for line in (state / "test" / "ledger" / f"{peer_id}.jsonl").read_text().splitlines()]
        assert sum(e["tokens"] for e in own) == 32
    finally:
        tmux.kill()
        if join.poll() is None:
            join.kill()
            join.wait()
