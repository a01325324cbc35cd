"""Export over real hivemind DHT/P2P: after swarm training, the HF checkpoint written by
``export_swarm`` (and by a live trainer's ``save_pretrained``) gives the swarm's logits."""

from __future__ import annotations

import io

import pytest
import torch
from rich.console import Console
from transformers import AutoModelForCausalLM

from trainer.export import export_swarm
from tests.helpers import train_steps

pytestmark = pytest.mark.slow

FAMILIES = {
    "gpt2-tied": dict(family="gpt2", num_layers=3, hidden_size=32, num_heads=4),
    "llama-gqa": dict(family="llama", num_layers=3, hidden_size=32, num_heads=4, num_kv_heads=2),
}


def _max_diff(directory, ids: torch.Tensor, expected: torch.Tensor) -> float:
    model = AutoModelForCausalLM.from_pretrained(directory)
    with torch.no_grad():
        return (model(ids).logits - expected).abs().max().item()


@pytest.mark.parametrize("name", FAMILIES)
def test_export_gives_the_swarms_logits(name, model_factory, swarm_factory, tmp_path):
    model_dir = model_factory(**FAMILIES[name])
    swarm = swarm_factory(model_dir, num_stages=2, num_peers=2, target_batch_size=4, lr=1e-2)
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(7))
    screen = io.StringIO()
    with swarm.client() as remote:
        train_steps(remote, 3)
        assert remote.upload_local_state(3) == 1
        report = export_swarm(swarm.initial_peers, tmp_path / "export", run_id="test",
                              console=Console(file=screen, width=200))
        remote.save_pretrained(tmp_path / "live")
        with torch.no_grad():
            expected = remote(ids).logits

    assert report.sources["local"] == "trainer upload (step 3)"
    assert all(report.sources[f"stage-{i}"].startswith("replica") for i in range(2)), report.sources
    assert "exported" in screen.getvalue() and "stage-1: replica" in screen.getvalue()
    assert _max_diff(tmp_path / "export", ids, expected) <= 1e-4
    assert _max_diff(tmp_path / "live", ids, expected) <= 1e-4
    assert _max_diff(model_dir, ids, expected) > 1e-3  # the swarm did train: the original differs

    # stage 1 loses its only replica (which checkpoints on leaving): the export takes the checkpoint
    swarm.loop.run(swarm.peers[1].stop(), timeout=90)
    report = export_swarm(swarm.initial_peers, tmp_path / "fallback", run_id="test",
                          console=Console(file=io.StringIO()))
    assert report.sources["stage-1"] == "checkpoint (step 3), no replica online"
    assert report.sources["stage-0"].startswith("replica")
    assert _max_diff(tmp_path / "fallback", ids, expected) <= 1e-4
