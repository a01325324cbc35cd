"""A peer shares tensors with its DHT and averager children by file descriptor (issue 27, point 6):
no ``torch_shm_manager`` process beside it, unless the environment asks for hivemind's default."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

_PROBE = """
import time, psutil, torch
import dht.records
shared = torch.zeros(1024).share_memory_()
time.sleep(0.2)
names = sorted(p.name() for p in psutil.Process().children(recursive=True))
print(torch.multiprocessing.get_sharing_strategy(), "torch_shm_manager" in names)
"""


@pytest.mark.parametrize("environment, strategy, manager", [
    ({}, "file_descriptor", False),  # swarm's choice: one process fewer per peer
    ({"HIVEMIND_MEMORY_SHARING_STRATEGY": "file_system"}, "file_system", True),  # the user's choice wins
])
def test_sharing_a_tensor_starts_no_shm_manager_unless_asked(environment, strategy, manager):
    env = {k: v for k, v in os.environ.items() if k != "HIVEMIND_MEMORY_SHARING_STRATEGY"} | environment
    result = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == [strategy, str(manager)]
