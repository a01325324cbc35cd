"""``swarm demo``: a whole swarm on 127.0.0.1, each part in its own process as on separate machines.

1. build a tiny GPT-2 (byte-level vocabulary) from a config and ``save_pretrained`` it,
2. start ``swarm bootstrap`` on it, then the peers one after another (each claims the least-covered
   stage, so they spread over the stages), then ``swarm train`` with its live progress bar,
3. print the first and last loss and a sample, and stop every process (SIGTERM, then wait).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

from shards.tiny import make_tiny_model

__all__ = ["run_demo", "DEMO_MODEL"]

DEMO_MODEL = dict(family="gpt2", num_layers=6, hidden_size=128, num_heads=4, vocab_size=256, max_positions=128)
DEMO_LR = 1e-3
_START_TIMEOUT = 120.0


class _Procs:
    """Child processes started by the demo; ``stop_all`` ends them all, politely first."""

    def __init__(self, logdir: Path):
        self.logdir = logdir
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, args: list[str], *, log: bool = True) -> subprocess.Popen:
        out = open(self.logdir / f"{name}.log", "w") if log else None
        proc = subprocess.Popen([sys.executable, "-m", "swarm.cli", *args], stdout=out, stderr=out,
                                stdin=subprocess.DEVNULL, env=os.environ | {"PYTHONUNBUFFERED": "1"})
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
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for name, proc in reversed(self.procs):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def run_demo(*, steps: int, num_peers: int, workdir: Path | None, console: Console) -> int:
    """Run the demo; returns the process exit code (0 when the loss clearly fell)."""
    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="swarm-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    console.rule("[bold]swarm demo")
    with console.status("building a tiny GPT-2 from a config..."):
        model_dir = make_tiny_model(root / "model", **DEMO_MODEL)
    console.print(f"model: {model_dir} ({DEMO_MODEL['num_layers']} layers, width {DEMO_MODEL['hidden_size']}, "
                  f"byte-level vocabulary); logs in {root}")
    procs = _Procs(root)
    try:
        with console.status("starting the bootstrap..."):
            boot = procs.start("bootstrap", ["bootstrap", "--model", str(model_dir), "--num-stages",
                                             str(num_peers), "--host", "127.0.0.1", "--port", "0",
                                             "--state-dir", str(root / "state"), "--lr", str(DEMO_LR)])
            join_line = procs.wait_for_line("bootstrap", boot, "swarm join --bootstrap")
        address = join_line.split("--bootstrap", 1)[1].split()[0]
        console.print(f"bootstrap up: [cyan]{join_line.strip()}[/]")
        for i in range(num_peers):
            with console.status(f"starting peer {i + 1}/{num_peers}..."):
                peer = procs.start(f"peer{i + 1}", ["join", "--bootstrap", address, "--host", "127.0.0.1",
                                                    "--threads", "1"])
                claim = procs.wait_for_line(f"peer{i + 1}", peer, "claiming stage")
            console.print(f"peer {i + 1}: {claim.split('claiming', 1)[1].strip()}")
        result_path = root / "result.json"
        trainer = procs.start("trainer", ["train", "--bootstrap", address, "--steps", str(steps),
                                          "--result-json", str(result_path)], log=False)
        if trainer.wait() != 0:
            console.print(f"[red]the trainer failed (exit {trainer.returncode}); logs in {root}")
            return 1
        result = json.loads(result_path.read_text())
    except (RuntimeError, TimeoutError) as e:
        console.print(f"[red]demo failed:[/] {e}")
        return 1
    except KeyboardInterrupt:
        console.print("interrupted: stopping every process...")
        return 130
    finally:
        with console.status("stopping the peers and the bootstrap..."):
            procs.stop_all()
    first, last = result["first_loss"], result["last_loss"]
    fell = last < first * 0.8
    verdict = "[bold green]the loss fell[/]" if fell else "[bold red]the loss did not fall enough[/]"
    console.print(f"{verdict}: {first:.3f} -> {last:.3f} over {steps} steps; every process stopped.")
    return 0 if fell else 1
