"""Training on a dataset as people run it: the run owner names it once (`swarm bootstrap --dataset`),
trainers need only `--bootstrap`. A trainer killed mid-shard (kill -9 of its whole process group,
as when a machine dies) has its shard taken over by the next trainer, once the lease expires, from the
position it last committed (read from the bootstrap's state.db); that trainer also evaluates the
held-out split, and `swarm status` shows the data progress and the evaluation. Peers start at once,
unpinned."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shards.tiny import make_tiny_model
from swarm.procs import ProcessGroup

pytestmark = pytest.mark.slow

MODEL = dict(family="gpt2", num_layers=2, hidden_size=32, num_heads=4, vocab_size=256, max_positions=64)
TTL = 5


def _dataset(directory: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory.mkdir()
    pq.write_table(pa.table({"text": [f"sample {i}: " + "the quick brown fox " * (i % 4 + 1) for i in range(400)]}),
                   directory / "train.parquet")
    pq.write_table(pa.table({"text": [f"held out {i}: jumps over the lazy dog" for i in range(16)]}),
                   directory / "test.parquet")
    return directory


def _result(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # not written yet
        return {}


def _held_shards(state: Path) -> list[tuple]:
    with sqlite3.connect(f"file:{state / 'swarm' / 'state.db'}?mode=ro", uri=True) as db:
        return db.execute("SELECT shard, doc, doc_offset, tokens FROM data_shards WHERE holder IS NOT NULL").fetchall()


@pytest.mark.timeout(600)
def test_a_killed_trainers_shard_is_taken_over_from_its_committed_position_and_evaluated(tmp_path: Path):
    model_dir = make_tiny_model(tmp_path / "model", **MODEL)
    data = _dataset(tmp_path / "data")
    state = tmp_path / "state"
    procs = ProcessGroup(tmp_path)
    try:
        address = procs.start_swarm(model_dir, num_stages=2, num_peers=2, state_dir=state, lr=3e-3,
                                    target_batch_size=4, free=True,
                                    bootstrap_args=["--dataset", str(data), "--data-shards", "4"],
                                    bootstrap_env={"SWARM_DATA__LEASE_TTL": str(TTL)})
        common = ["train", "--bootstrap", address, "--batch-size", "4", "--seq-len", "16"]
        first = procs.start("trainer1", [*common, "--steps", "1000", "--result-json", str(tmp_path / "r1.json"),
                                         "--state-dir", str(state / "trainer1")])
        deadline = time.monotonic() + 240
        while _result(tmp_path / "r1.json").get("run_step", 0) < 3:
            assert first.poll() is None and time.monotonic() < deadline, (tmp_path / "trainer1.log").read_text()[-3000:]
            time.sleep(0.2)
        os.killpg(first.pid, signal.SIGKILL)  # the trainer, its DHT process and p2pd: the machine died
        first.wait(timeout=30)
        [(shard, doc, offset, tokens)] = _held_shards(state)  # still leased to the dead trainer
        killed = _result(tmp_path / "r1.json")["data"]["spans"][-1]
        assert killed["shard"] == shard and killed["end"] <= [doc, offset]  # the result file may lag a commit
        time.sleep(TTL + 1)
        result = tmp_path / "r2.json"
        second = procs.start("trainer2", [*common, "--steps", "2", "--eval-split", "test", "--eval-every", "2",
                                          "--result-json", str(result), "--state-dir", str(state / "trainer2")])
        assert second.wait(timeout=300) == 0, (tmp_path / "trainer2.log").read_text()[-3000:]
        status = subprocess.run([sys.executable, "-m", "swarm.cli", "status", "--bootstrap", address, "--json"],
                                capture_output=True, text=True, timeout=120)
        view = subprocess.run([sys.executable, "-m", "swarm.cli", "status", "--bootstrap", address, "--once"],
                              capture_output=True, text=True, timeout=120)
    finally:
        procs.stop_all()
    taken = json.loads(result.read_text())
    span = taken["data"]["spans"][0]
    assert (span["shard"], span["start"]) == (shard, [doc, offset]), taken["data"]
    assert span["end"] > span["start"] and taken["data"]["num_shards"] == 4
    assert status.returncode == 0, status.stderr[-2000:]
    run = json.loads(status.stdout)
    assert run["data"]["epoch"] == 0 and run["data"]["num_shards"] == 4
    assert run["data"]["tokens"] >= tokens + 2 * 4 * 16
    [evaluation] = taken["evals"]
    assert (run["eval"]["step"], run["eval"]["tokens"]) == (evaluation["step"], evaluation["tokens"])
    assert run["eval"]["loss"] == pytest.approx(evaluation["loss"], abs=1e-6)
    assert "eval loss" in view.stdout and "shards" in view.stdout, view.stdout
