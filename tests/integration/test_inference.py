"""Generation through a real swarm (hivemind DHT + P2P on loopback, 3 peers over 3 stages) equals
``AutoModelForCausalLM.generate`` token for token, with one position per step on the peers."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest
import torch
from transformers import AutoModelForCausalLM

from shards.tiny import make_tiny_model
from tests.helpers import LocalSwarm
from net.rpc import Raw

pytestmark = pytest.mark.slow

FAMILIES = {
    "gpt2": dict(family="gpt2", num_layers=3, hidden_size=32, num_heads=4),
    "llama-gqa": dict(family="llama", num_layers=3, hidden_size=32, num_heads=4, num_kv_heads=2),
}
NEW_TOKENS = 32


@pytest.fixture(scope="module", params=list(FAMILIES))
def served(request, tmp_path_factory) -> Iterator[tuple[Path, LocalSwarm, object]]:
    """Per family, a swarm of 3 stages with a 4th peer as a second replica of stage 0, and one client
    of it, shared by the tests of this module (the failover test, which stops a peer, runs last)."""
    root = tmp_path_factory.mktemp(f"inference-{request.param}")
    model_dir = make_tiny_model(root / "model", **FAMILIES[request.param])
    swarm = LocalSwarm(model_dir, state_dir=root / "state", num_stages=3, num_peers=4)
    try:
        swarm.start()
        with swarm.client() as client:
            yield model_dir, swarm, client
    finally:
        swarm.stop()


def _prompts(batch: int, seq: int = 7, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 200, (batch, seq), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    for row in range(1, batch):  # rows after the first are left-padded by 1, 2, ... positions
        mask[row, :row] = 0
    return ids, mask


def test_greedy_equals_transformers_one_position_per_step(served):
    model_dir, swarm, remote = served
    reference = AutoModelForCausalLM.from_pretrained(model_dir)
    steps_before = [p.inference.steps_served for p in swarm.peers]
    for batch in (1, 3):
        ids, mask = _prompts(batch)
        expected = reference.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
        got = remote.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS)
        assert got.shape == (batch, ids.shape[1] + NEW_TOKENS)
        assert torch.equal(got, expected), f"batch {batch}: swarm {got.tolist()} != transformers {expected.tolist()}"
        sent = [[t.shape[1] for t in stage.inputs] for stage in remote.last_session.stages]
        assert sent == [[ids.shape[1]] + [1] * (NEW_TOKENS - 1)] * 3  # the prompt once, then one position
    served_steps = {p.peer_id: p.inference.steps_served - b for p, b in zip(swarm.peers, steps_before)}
    assert sum(served_steps.values()) == 3 * 2 * NEW_TOKENS  # 3 stages, 2 generations of 32 steps
    assert [len(p.inference.sessions) for p in swarm.peers] == [0] * 4  # closed after generating


def test_sampling_and_stop_tokens_equal_transformers(served):
    model_dir, _, remote = served
    reference = AutoModelForCausalLM.from_pretrained(model_dir)
    ids, mask = _prompts(3, seed=2)
    settings = dict(do_sample=True, temperature=0.8, top_k=20, top_p=0.9, max_new_tokens=NEW_TOKENS)
    torch.manual_seed(7)
    expected = reference.generate(ids, attention_mask=mask, **settings)
    torch.manual_seed(7)
    assert torch.equal(remote.generate(ids, attention_mask=mask, **settings), expected)

    greedy = reference.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
    stop = int(greedy[0, ids.shape[1] + 4])  # row 0's fifth new token ends it there
    stopped = dict(max_new_tokens=NEW_TOKENS, eos_token_id=stop, pad_token_id=0)
    expected = reference.generate(ids, attention_mask=mask, do_sample=False, **stopped)
    got = remote.generate(ids, attention_mask=mask, **stopped)
    assert torch.equal(got, expected)
    new = got[0, ids.shape[1]:].tolist()
    first = new.index(stop)  # row 0 ends at its first stop token and is padded after it
    assert first <= 4 and new[first + 1:] == [0] * (len(new) - first - 1)


@pytest.mark.parametrize("case", ["not-a-map", "no-session", "wrong-width", "wrong-stage", "tensors-on-open"])
def test_bad_inference_requests_are_named_and_the_peer_goes_on(served, case):
    from peers.inference.protocol import OPEN, STEP

    _, swarm, remote = served
    peer = swarm.peers[1]
    transport, width = remote.pipeline.client.transport, remote.local.config.hidden_size
    stage = {"stage": 1, "layers": peer.record.layers.model_dump(), "batch_size": 1, "max_length": 8}
    opened = {"session_id": f"bad-{case}", **stage}
    assert "ok" in remote._runner.run(transport.call(peer.peer_id, OPEN, Raw(opened), [], timeout=30))[0]
    step = {"session_id": f"bad-{case}", "start": 0}
    hidden, positions = torch.zeros(1, 2, width), torch.arange(2).unsqueeze(0)
    message, tensors, code, words = {
        "not-a-map": (["step"], [hidden, positions], "BadRequest", "expected a map"),
        "no-session": ({**step, "session_id": "nobody"}, [hidden, positions], "CacheMiss", "no inference session"),
        "wrong-width": (step, [torch.zeros(1, 2, width + 1), positions], "BadRequest", f"[1, seq, {width}]"),
        "wrong-stage": ({**opened, "stage": 0}, [], "WrongStage", "not stage 0"),
        "tensors-on-open": (opened, [hidden], "BadRequest", "open takes no tensors"),
    }[case]
    method = OPEN if "stage" in message else STEP
    reply, _ = remote._runner.run(transport.call(peer.peer_id, method, Raw(message), tensors, timeout=30))
    assert reply["error"]["code"] == code and words in reply["error"]["message"]
    reply, out = remote._runner.run(transport.call(peer.peer_id, STEP, Raw(step), [hidden, positions], timeout=30))
    assert reply["ok"]["length"] == 2 and out[0].shape == (1, 2, width)  # the session still works
    assert remote._runner.run(remote.inference_client.close(peer.peer_id, f"bad-{case}")).closed


class _StopPeerAt:
    """A transformers-style streamer that stops the peer serving ``stage`` of the live session once
    ``after`` new tokens have come: the peer dies in the middle of the generation."""

    def __init__(self, swarm: LocalSwarm, remote, stage: int, after: int):
        self.swarm, self.remote, self.stage, self.after = swarm, remote, stage, after
        self.seen, self.stopped = -1, None  # the first put() is the prompt

    def put(self, tokens: torch.Tensor) -> None:
        self.seen += 1
        if self.seen == self.after:
            victim = self.remote.last_session.route[self.stage].peer_id
            peer = next(p for p in self.swarm.peers if p.peer_id == victim)
            self.swarm.loop.run(peer.stop(), timeout=60)
            self.stopped = victim

    def end(self) -> None:
        pass


def test_failover_mid_generation_keeps_the_output(served):
    model_dir, swarm, remote = served
    reference = AutoModelForCausalLM.from_pretrained(model_dir)
    ids, mask = _prompts(2, seed=3)
    expected = reference.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
    killer = _StopPeerAt(swarm, remote, stage=0, after=10)
    got = remote.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, streamer=killer)
    session = remote.last_session
    assert killer.stopped is not None and session.failovers == 1
    assert session.route[0].peer_id != killer.stopped  # stage 0 moved to its other replica
    assert torch.equal(got, expected)
