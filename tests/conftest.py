"""Fixtures shared by every tier: tiny models, a local swarm over real hivemind, and a reaper that
fails any test leaving a child process (a DHT process, a p2pd daemon) behind."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import psutil
import pytest
import torch

from shards.tiny import make_tiny_model
from tests.helpers import LocalSwarm

# Commands that keep state (ledgers, logs) without an explicit --state-dir write here, never into the
# home directory of whoever runs the tests; set before test modules build their subprocess env.
_STATE_DIR = tempfile.mkdtemp(prefix="swarm-test-state-")
os.environ["SWARM_STATE_DIR"] = _STATE_DIR
atexit.register(shutil.rmtree, _STATE_DIR, True)
# datasets the tests write are read into a HF cache of the test run's own (subprocesses inherit it)
os.environ["HF_DATASETS_CACHE"] = os.path.join(_STATE_DIR, "hf-datasets")

# torch_shm_manager is torch's per-process shared-memory helper (hivemind shares tensors through it);
# it lives as long as this process and exits with it.
_IGNORED_CHILDREN = ("resource_tracker", "forkserver", "semaphore_tracker", "torch_shm_manager")


def _children() -> list[psutil.Process]:
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            cmdline = " ".join(proc.cmdline())
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            continue
        if not any(name in cmdline for name in _IGNORED_CHILDREN):
            found.append(proc)
    return found


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``@pytest.mark.gpu`` tests need CUDA: without it they are skipped, saying so (every other test
    runs on a machine without a GPU)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none here)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _state_dir_of_its_own(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing a test starts (peers in process, CLI subprocesses) keeps state in ~/.swarm or shares it
    with another test: a checkpoint left by one run would be restored by the next (seen: a stage
    restored at step 6 in a test that expected a fresh one)."""
    monkeypatch.setenv("SWARM_STATE_DIR", str(tmp_path_factory.mktemp("default-state-dir")))


@pytest.fixture(autouse=True)
def reaper() -> Iterator[None]:
    """After each test every child process it started must be gone (after a short grace period)."""
    before = {p.pid for p in _children()}
    yield
    deadline = time.monotonic() + 10
    leftovers = [p for p in _children() if p.pid not in before]
    while leftovers and time.monotonic() < deadline:
        time.sleep(0.2)
        leftovers = [p for p in leftovers if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    if leftovers:
        names = []
        for proc in leftovers:
            try:
                names.append(f"{proc.pid}:{' '.join(proc.cmdline())[:80]}")
                proc.kill()
            except psutil.NoSuchProcess:
                continue
        pytest.fail(f"test left child processes behind: {names}")


@pytest.fixture(autouse=True)
def _torch_determinism() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def model_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Build (once per set of arguments) a tiny HF model directory via ``save_pretrained``."""
    cache: dict[tuple, Path] = {}

    def build(family: str = "gpt2", **kwargs) -> Path:
        key = (family, tuple(sorted(kwargs.items())))
        if key not in cache:
            cache[key] = make_tiny_model(tmp_path_factory.mktemp(f"model-{family}"), family, **kwargs)
        return cache[key]

    return build


@pytest.fixture
def swarm_factory(tmp_path: Path) -> Iterator[Callable[..., LocalSwarm]]:
    """``swarm_factory(model_dir, num_stages=3, num_peers=3)``: a bootstrap and peers over real
    hivemind DHT/P2P on 127.0.0.1, all stopped when the test ends."""
    started: list[LocalSwarm] = []

    def factory(model_dir: Path, **kwargs) -> LocalSwarm:
        swarm = LocalSwarm(model_dir, state_dir=tmp_path / f"state{len(started)}", **kwargs)
        started.append(swarm)
        swarm.start()
        return swarm

    yield factory
    for swarm in started:
        swarm.stop()
