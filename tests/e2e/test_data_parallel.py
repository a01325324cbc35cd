"""Data parallel as people run it: two `swarm train` processes with different data (seeds) train one
swarm together. Each brings half of the run's batch, so every collaborative step closes on both: the
run's step counter (the trainer records in the DHT, read by `swarm status --json`) counts collaborative
steps, not batches, and both trainers' losses fall."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shards.tiny import make_tiny_model
from swarm.procs import ProcessGroup

pytestmark = pytest.mark.slow

STEPS = 8
MODEL = dict(family="gpt2", num_layers=2, hidden_size=64, num_heads=4, vocab_size=256, max_positions=64)


def _run_control(action: str, bootstrap_state: Path) -> None:
    """``swarm run pause|resume`` as the run owner types it, on the bootstrap's state."""
    subprocess.run([sys.executable, "-m", "swarm.cli", "run", action, "--state-dir", str(bootstrap_state)],
                   check=True, capture_output=True, timeout=120)


def _log(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


@pytest.mark.timeout(600)
def test_two_trainer_processes_train_one_swarm_data_parallel(tmp_path: Path):
    model_dir = make_tiny_model(tmp_path / "model", **MODEL)
    procs = ProcessGroup(tmp_path)
    try:
        address = procs.start_swarm(model_dir, num_stages=2, num_peers=2, state_dir=tmp_path / "state", lr=3e-3,
                                    target_batch_size=8)
        procs.wait_serving(2)
        # the run is paused until both trainers are up: one that started a few seconds before the
        # other would otherwise close its first steps alone (its own two batches fill a step) and
        # the test would not train data parallel at all (seen once: it ended at run step 4 of 8)
        _run_control("pause", tmp_path / "state")
        time.sleep(3)  # the bootstrap publishes the run state within a second
        results = [tmp_path / f"trainer{seed}.json" for seed in (1, 2)]
        trainers = [procs.start(f"trainer{seed}", ["train", "--bootstrap", address, "--steps", str(STEPS),
                                                   "--batch-size", "4", "--seq-len", "32", "--seed", str(seed),
                                                   "--state-dir", str(tmp_path / "state" / f"trainer{seed}"),
                                                   "--result-json", str(path)])
                    for seed, path in zip((1, 2), results)]
        deadline = time.monotonic() + 180
        while not all("paused by its owner" in _log(tmp_path / f"trainer{seed}.log") for seed in (1, 2)):
            assert all(t.poll() is None for t in trainers) and time.monotonic() < deadline, "trainers never waited"
            time.sleep(0.2)
        _run_control("resume", tmp_path / "state")
        for seed, trainer in zip((1, 2), trainers):
            assert trainer.wait(timeout=400) == 0, (tmp_path / f"trainer{seed}.log").read_text()[-3000:]
        status = subprocess.run([sys.executable, "-m", "swarm.cli", "status", "--bootstrap", address, "--json"],
                                capture_output=True, text=True, timeout=120)
        assert status.returncode == 0, status.stderr[-2000:]
        run = json.loads(status.stdout)
    finally:
        procs.stop_all()
    first, second = (json.loads(path.read_text()) for path in results)
    # 2 trainers x STEPS half batches = STEPS full batches of the run: one collaborative step each
    assert run["step"] == STEPS, run
    assert first["run_step"] == second["run_step"] == STEPS
    assert first["losses"] != second["losses"]  # different data
    for losses in (first["losses"], second["losses"]):
        assert len(losses) == STEPS
        assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
