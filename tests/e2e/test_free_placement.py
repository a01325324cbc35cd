"""Unpinned peers, as volunteers run them: every peer is `swarm join` with no `--stage`, no
`--max-stages` and no fixed throughput, started at the same moment as the others; the trainer is
the README's plain loop (`loss.backward(); optimizer.step()` with `create_optimizer()`).

The yardstick is local training: after the run, the weights `swarm export` writes equal those of
transformers' model trained locally by AdamW (the run's lr, betas, eps and weight decay) on the same
batches. With peers killed and joining mid-run too."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import swarm
from shards.tiny import make_tiny_model
from swarm.procs import ProcessGroup
from tests.helpers import local_adamw, max_difference

pytestmark = pytest.mark.slow

LR = 3e-3
MODEL = dict(family="gpt2", num_layers=4, hidden_size=64, num_heads=4, vocab_size=256, max_positions=64)
SEQ = 32
# float32 training that sums the same gradients in another order (two replicas of a stage, a replayed
# microbatch) differs in the last bits, and AdamW's first steps turn that into up to ~lr x 1e-3
TOLERANCE = 1e-4


def _batches(count: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(11)
    return [torch.randint(0, 256, (8, SEQ), generator=generator) for _ in range(count)]


def _status(address: str) -> dict:
    result = subprocess.run([sys.executable, "-m", "swarm.cli", "status", "--bootstrap", address, "--json"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)


def _served(address: str) -> dict[int, list[str]]:
    return {stage["index"]: stage["online_peers"] for stage in _status(address)["stages"]}


def _start(root: Path, model_dir: Path) -> tuple[ProcessGroup, str]:
    root.mkdir()
    procs = ProcessGroup(root)
    boot = procs.start("bootstrap", ["bootstrap", "--open", "--model", str(model_dir), "--num-stages", "2",
                                     "--host", "127.0.0.1", "--port", "0", "--state-dir", str(root / "state"),
                                     "--lr", str(LR), "--target-batch-size", "8"])
    address = procs.wait_for_line("bootstrap", boot, "swarm join --bootstrap").split("--bootstrap", 1)[1].split()[0]
    return procs, address


def _train(address: str, batches: list[torch.Tensor], on_step=None) -> None:
    """The README's loop; ``on_step(step)`` runs before each step (kills and joins)."""
    with swarm.connect(address) as model:
        optimizer = model.create_optimizer()
        for step, input_ids in enumerate(batches):
            if on_step is not None:
                on_step(step)
            loss = model(input_ids, labels=input_ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        assert model.upload_local_state(len(batches)) >= 1


def _exported(address: str, out: Path) -> dict[str, torch.Tensor]:
    result = subprocess.run([sys.executable, "-m", "swarm.cli", "export", "--bootstrap", address, "--out", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return AutoModelForCausalLM.from_pretrained(out).state_dict()


@pytest.mark.timeout(600)
def test_two_peers_joining_at_once_split_the_pipeline_and_train_like_local(tmp_path):
    model_dir = make_tiny_model(tmp_path / "model", **MODEL)
    batches = _batches(12)
    procs, address = _start(tmp_path / "run", model_dir)
    try:
        ids = procs.start_peers_at_once(["peer1", "peer2"], address, tmp_path / "run" / "state")
        served = _served(address)
        assert sorted(p for peers in served.values() for p in peers) == sorted(ids.values()), served
        assert all(len(peers) == 1 for peers in served.values()), f"the peers replicated instead of splitting: {served}"
        _train(address, batches)
        exported = _exported(address, tmp_path / "exported")
    finally:
        procs.stop_all()
    local = local_adamw(model_dir, batches, lr=LR)
    assert max_difference(exported, AutoModelForCausalLM.from_pretrained(model_dir).state_dict()) > 1e-3
    assert max_difference(exported, local) <= TOLERANCE


@pytest.mark.timeout(900)
def test_four_peers_at_once_with_a_join_and_a_kill_train_like_local(tmp_path):
    model_dir = make_tiny_model(tmp_path / "model", **MODEL)
    batches = _batches(24)
    root = tmp_path / "run"
    procs, address = _start(root, model_dir)
    events: dict = {}
    try:
        ids = procs.start_peers_at_once(["peer1", "peer2", "peer3", "peer4"], address, root / "state")
        served = _served(address)
        assert sorted(len(peers) for peers in served.values()) == [2, 2], f"not two replicas a stage: {served}"

        def churn(step: int) -> None:
            if step == 3:  # a volunteer joins mid-run: it takes a stage's current state from a live replica
                procs.join_unpinned("peer5", address, root / "state")
            if step == 6:
                events["joined"] = procs.wait_joined("peer5")
            if step == 12:  # SIGKILL a peer whose stages keep another online replica (from the live status)
                served_now = _served(address)
                by_name = {name: peer for name, peer in ids.items()}
                victim = next(name for name, peer in sorted(by_name.items())
                              if all(len(served_now[s]) > 1 for s, peers in served_now.items() if peer in peers)
                              and any(peer in peers for peers in served_now.values()))
                proc = dict(procs.procs)[victim]
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                events["killed"] = victim

        _train(address, batches, on_step=churn)
        exported = _exported(address, tmp_path / "exported")
        logs = {name: (root / f"{name}.log").read_text(errors="replace") for name, _ in procs.procs}
    finally:
        procs.stop_all()
    assert events.get("killed") and events.get("joined"), events
    joined = logs["peer5"]
    assert "took the current state" in joined, joined[-2000:]
    for name, text in logs.items():
        assert "were lost" not in text, f"{name} lost steps:\n{text[-3000:]}"
    local = local_adamw(model_dir, batches, lr=LR)
    assert max_difference(exported, local) <= TOLERANCE
