"""The client commands on a keyed run, as a user runs them: every handler but the token exchange
wants a presented token, so ``swarm export`` and ``swarm ledger verify <bootstrap>`` take ``--key``
(or ``SWARM_KEY``) and, without one, stop with one line naming it."""

from __future__ import annotations

import subprocess

import pytest
import torch

from tests.e2e.test_cli import ENV, SWARM

pytestmark = pytest.mark.slow


def test_export_and_ledger_need_the_key_of_a_keyed_run(model_factory, swarm_factory, tmp_path):
    model_dir = model_factory("gpt2", num_layers=2, hidden_size=32, num_heads=4)
    swarm = swarm_factory(model_dir, num_stages=2, num_peers=0, target_batch_size=4, open=False)
    key = swarm.bootstrap.db.create_key("volunteers", actor="test").secret
    swarm.add_peer(stage=0, key=key)
    swarm.add_peer(stage=1, key=key)
    address = swarm.initial_peers[0]
    with swarm.client(key=key) as remote:
        optimizer = torch.optim.AdamW(remote.parameters(), lr=0.01)
        batch = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(0))
        remote(batch, labels=batch).loss.backward()
        optimizer.step()
        assert remote.upload_local_state(1) == 1

    out = tmp_path / "exported"
    refused = subprocess.run(SWARM + ["export", "--bootstrap", address, "--run", "test", "--out", str(out)],
                             capture_output=True, text=True, timeout=180, env=ENV)
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "needs an API key: pass --key or set SWARM_KEY" in refused.stderr, refused.stderr[-2000:]
    assert "Traceback" not in refused.stderr + refused.stdout
    assert not (out / "model.safetensors").exists()

    exported = subprocess.run(SWARM + ["export", "--bootstrap", address, "--run", "test", "--out", str(out),
                                       "--key", key], capture_output=True, text=True, timeout=180, env=ENV)
    screen = exported.stdout + exported.stderr
    assert exported.returncode == 0, screen[-2000:]
    assert "stage-0: replica" in screen and "stage-1: replica" in screen and "local: trainer upload" in screen, screen
    assert (out / "model.safetensors").is_file() and "Traceback" not in screen

    no_key = subprocess.run(SWARM + ["ledger", "verify", address, "--run", "test"],
                            capture_output=True, text=True, timeout=120, env=ENV)
    assert no_key.returncode == 2 and "needs an API key" in no_key.stderr, no_key.stderr[-2000:]
    with_env_key = subprocess.run(SWARM + ["ledger", "verify", address, "--run", "test"],
                                  capture_output=True, text=True, timeout=120, env=ENV | {"SWARM_KEY": key})
    assert with_env_key.returncode == 0, (with_env_key.stdout + with_env_key.stderr)[-2000:]
    assert "OK" in with_env_key.stdout and "Traceback" not in with_env_key.stderr
