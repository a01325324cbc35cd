"""``swarm export`` as a user runs it (a separate process, its own DHT client) against a swarm that
has trained a few steps; the HF checkpoint it writes gives the trained swarm's logits."""

from __future__ import annotations

import subprocess

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.e2e.test_cli import ENV, SWARM

pytestmark = pytest.mark.slow


def test_export_writes_a_checkpoint_with_the_swarms_logits(model_factory, swarm_factory, tmp_path):
    model_dir = model_factory("gpt2", num_layers=4, hidden_size=32)
    swarm = swarm_factory(model_dir, num_stages=2, num_peers=2, target_batch_size=8, lr=1e-2)
    address = swarm.initial_peers[0]
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))
    with swarm.client() as remote:
        optimizer = torch.optim.AdamW(remote.parameters(), lr=0.01)
        for step in range(3):
            batch = torch.randint(0, 8, (8, 12), generator=torch.Generator().manual_seed(step))
            remote(batch, labels=batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        assert remote.upload_local_state(3) == 1
        with torch.no_grad():
            expected = remote(ids).logits

    out = tmp_path / "exported"
    result = subprocess.run(SWARM + ["export", "--bootstrap", address, "--run", "test", "--out", str(out)],
                            capture_output=True, text=True, timeout=180, env=ENV)
    assert result.returncode == 0, result.stderr[-2000:]
    screen = result.stdout + result.stderr
    assert "local: trainer upload (step 3)" in screen and "stage-1: replica" in screen, screen
    assert "Traceback" not in screen
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    with torch.no_grad():
        exported = AutoModelForCausalLM.from_pretrained(out)(ids).logits
        original = AutoModelForCausalLM.from_pretrained(model_dir)(ids).logits
    assert (exported - expected).abs().max().item() <= 1e-4
    assert (original - expected).abs().max().item() > 1e-3  # three steps of training moved the weights

    again = subprocess.run(SWARM + ["export", "--bootstrap", address, "--run", "test", "--out", str(out)],
                           capture_output=True, text=True, timeout=60, env=ENV)
    assert again.returncode == 2 and "not an empty directory" in again.stderr and "Traceback" not in again.stderr
