"""Starting and stopping ``swarm`` CLI processes, as the demo and the benchmarks do."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

__all__ = ["ProcessGroup"]

_START_TIMEOUT = 120.0


class ProcessGroup:
    """``swarm`` subprocesses (bootstrap, peers, trainer) with a log each; ``stop_all`` ends them all,
    SIGINT first so they leave the DHT cleanly, SIGKILL only after ``timeout``."""

    def __init__(self, logdir: Path):
        self.logdir = logdir
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, args: list[str], *, log: bool = True, env: dict[str, str] | None = None) -> subprocess.Popen:
        out = open(self.logdir / f"{name}.log", "w") if log else None
        # a session of its own: Ctrl+C reaches only us, and we stop the children in order (trainer,
        # peers, bootstrap) instead of all of them dying at once mid-call
        proc = subprocess.Popen([sys.executable, "-m", "swarm.cli", *args], stdout=out, stderr=out,
                                stdin=subprocess.DEVNULL, env=os.environ | {"PYTHONUNBUFFERED": "1"} | (env or {}),
                                start_new_session=True)
        self.procs.append((name, proc))
        return proc

    def wait_for_line(self, name: str, proc: subprocess.Popen, needle: str) -> str:
        path = self.logdir / f"{name}.log"
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            for line in path.read_text(errors="replace").splitlines():
                if needle in line:
                    return line
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with code {proc.returncode}; see {path}")
            time.sleep(0.1)
        raise TimeoutError(f"{name} did not print {needle!r} in {_START_TIMEOUT:.0f} s; see {path}")

    def stop_all(self, timeout: float = 30.0) -> None:
        """Newest first (trainer, then peers, then the bootstrap), each given ``timeout`` seconds to
        leave after SIGINT, so nobody loses a peer in the middle of a call while stopping."""
        for name, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)  # every swarm command treats it as "stop cleanly"
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                print(f"{name} did not stop in {timeout:.0f} s after SIGINT: killing it", file=sys.stderr)
                proc.kill()
                proc.wait()

    def start_swarm(self, model_dir: Path, *, num_stages: int, num_peers: int, state_dir: Path,
                    lr: float | None = None, target_batch_size: int | None = None, threads: int = 1,
                    on_peer=None, wire: str | None = None, peer_env: dict[str, str] | None = None,
                    free: bool = False, bootstrap_args: Sequence[str] = (),
                    bootstrap_env: dict[str, str] | None = None) -> str:
        """Start a bootstrap on 127.0.0.1, then the peers one after another (each waits until the
        previous one has claimed its stage, so they spread over the stages; ``free``: all at once, no
        ``--max-stages``, each serving when this returns). Returns the bootstrap's
        multiaddr; ``on_peer(i, claim_line)`` is told of each claim; ``peer_env``: the peers' extra
        environment (``SWARM_*`` settings); ``bootstrap_args`` and ``bootstrap_env``: the bootstrap's
        extra flags and environment."""
        args = ["--open", "--model", str(model_dir), "--num-stages", str(num_stages), "--host", "127.0.0.1",
                "--port", "0", "--state-dir", str(state_dir)] + (["--lr", str(lr)] if lr else [])
        if target_batch_size:
            args += ["--target-batch-size", str(target_batch_size)]
        if wire:
            args += ["--wire", wire]
        address = self.start_bootstrap([*args, *bootstrap_args], env=bootstrap_env)
        if free:  # as volunteers do: all at once, no pins, placement decides
            self.start_peers_at_once([f"peer{i + 1}" for i in range(num_peers)], address, state_dir, threads=threads,
                                     env=peer_env)
            return address
        for i in range(num_peers):
            claim = self.start_peer(f"peer{i + 1}", address, state_dir, threads=threads, env=peer_env)
            if on_peer is not None:
                on_peer(i, claim.split("claiming", 1)[1].strip())
        return address

    def start_bootstrap(self, args: list[str], *, env: dict[str, str] | None = None) -> str:
        """Start ``swarm bootstrap`` with ``args`` as the process ``bootstrap`` and return the multiaddr
        it prints in the join line, once it has printed it."""
        boot = self.start("bootstrap", ["bootstrap", *args], env=env)
        return self.wait_for_line("bootstrap", boot, "swarm join --bootstrap").split("--bootstrap", 1)[1].split()[0]

    def start_peer(self, name: str, address: str, state_dir: Path, *, threads: int = 1,
                   env: dict[str, str] | None = None) -> str:
        """Start ``swarm join`` (its own state dir under ``state_dir``, as on its own machine) and
        return the line saying which stage it claimed. One stage per peer: the demo and the benchmarks
        show a pipeline (by default a peer with room for the whole tiny model would serve it all)."""
        peer = self.start(name, ["join", "--bootstrap", address, "--host", "127.0.0.1", "--threads", str(threads),
                                 "--state-dir", str(state_dir / name), "--max-stages", "1"], env=env)
        return self.wait_for_line(name, peer, "claiming stage")

    def start_peers_at_once(self, names: list[str], address: str, state_dir: Path, *, threads: int = 1,
                            env: dict[str, str] | None = None) -> dict[str, str]:
        """Start ``swarm join`` for every name at the same moment, as volunteers pasting the line do:
        no ``--stage``, no ``--max-stages``, placement decides. Returns each peer's peer id once it
        serves."""
        for name in names:
            self.join_unpinned(name, address, state_dir, threads=threads, env=env)
        return {name: self.wait_joined(name) for name in names}

    def join_unpinned(self, name: str, address: str, state_dir: Path, *, threads: int = 1,
                      env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start ``swarm join`` as a volunteer pastes it (its own state dir under ``state_dir``)."""
        return self.start(name, ["join", "--bootstrap", address, "--host", "127.0.0.1", "--threads", str(threads),
                                 "--state-dir", str(state_dir / name)], env=env)

    def wait_joined(self, name: str) -> str:
        """Block until peer ``name`` serves; its peer id."""
        self.wait_for_line(name, dict(self.procs)[name], "Ctrl+C to leave")
        return self.peer_id(name)

    def peer_id(self, name: str) -> str:
        """The peer id ``swarm join`` printed when it began serving (the line may be wrapped)."""
        text = (self.logdir / f"{name}.log").read_text(errors="replace")
        match = re.search(r"serving .*? as\s+(\S+?);", text, flags=re.DOTALL)
        if match is None:
            raise RuntimeError(f"{name} has not printed its peer id; see {self.logdir / f'{name}.log'}")
        return match.group(1)

    def wait_serving(self, num_peers: int) -> None:
        """Block until every peer has loaded its layers and announced itself online."""
        for i in range(num_peers):
            name = f"peer{i + 1}"
            self.wait_for_line(name, dict(self.procs)[name], "serving stage")
