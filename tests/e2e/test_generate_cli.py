"""``swarm generate`` and ``swarm serve-api`` as a user runs them, against a real swarm on loopback."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from typing import Iterator

import openai
import pytest
import torch
from transformers import AutoModelForCausalLM

from shards.tiny import make_tiny_model
from swarm.demo import DEMO_MODEL
from tests.helpers import LocalSwarm

pytestmark = pytest.mark.slow

SWARM = [sys.executable, "-m", "swarm.cli"]
ENV = os.environ | {"PYTHONUNBUFFERED": "1", "COLUMNS": "200"}


@pytest.fixture(scope="module")
def demo_swarm(tmp_path_factory) -> Iterator[tuple[LocalSwarm, AutoModelForCausalLM]]:
    """The demo's byte-level model (no tokenizer files), shallower, on 2 peers."""
    root = tmp_path_factory.mktemp("cli-generate")
    model_dir = make_tiny_model(root / "model", **(DEMO_MODEL | {"num_layers": 2, "hidden_size": 32}))
    swarm = LocalSwarm(model_dir, state_dir=root / "state", num_stages=2, num_peers=2)
    try:
        swarm.start()
        yield swarm, AutoModelForCausalLM.from_pretrained(model_dir)
    finally:
        swarm.stop()


def _greedy_text(reference, prompt: str, new_tokens: int) -> str:
    ids = torch.tensor([list(prompt.encode())])
    new = reference.generate(ids, max_new_tokens=new_tokens, do_sample=False)[0, ids.shape[1]:].tolist()
    return bytes(new).decode("utf-8", errors="replace")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_generate_streams_and_serve_api_answers_then_stops_on_ctrl_c(demo_swarm, tmp_path):
    """Both commands at once (their start-up overlaps): ``generate`` prints the greedy continuation
    piece by piece; ``serve-api`` answers the openai client and leaves cleanly on Ctrl+C."""
    swarm, reference = demo_swarm
    address, port, log = swarm.initial_peers[0], _free_port(), tmp_path / "api.log"
    server = subprocess.Popen(SWARM + ["serve-api", "--bootstrap", address, "--run", swarm.run_id, "--port", str(port),
                                       "--api-key", "sk-1", "--model-name", "demo"],
                              stdout=open(log, "w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=ENV,
                              start_new_session=True)
    try:
        prompt = "def main("
        generate = subprocess.Popen(SWARM + ["generate", "--bootstrap", address, "--run", swarm.run_id,
                                             "--max-new-tokens", "24", prompt],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=ENV)
        reads = []
        while chunk := os.read(generate.stdout.fileno(), 4096):
            reads.append(chunk)
        assert generate.wait(timeout=120) == 0, generate.stderr.read().decode()
        assert b"".join(reads).decode() == prompt + _greedy_text(reference, prompt, 24) + "\n"
        assert len(reads) > 2, "the text came in one piece instead of token by token"
        assert "24 tokens in" in generate.stderr.read().decode()

        deadline = time.monotonic() + 90
        while "serving" not in log.read_text():
            assert server.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-1", max_retries=3)
        reply = client.completions.create(model="demo", prompt="import ", max_tokens=8, temperature=0)
        assert reply.choices[0].text == _greedy_text(reference, "import ", 8)
        with pytest.raises(openai.BadRequestError, match=r"token ids in 'input' must be in \[0, 256\)"):
            client.embeddings.create(model="demo", input=[[1, 2, 300]])
    finally:
        os.killpg(server.pid, signal.SIGINT)  # Ctrl+C in its terminal
        code = server.wait(timeout=60)
    assert code == 0, log.read_text()
    assert "stopping the API server" in log.read_text()


def test_serve_api_run_keys_without_bootstrap_state_names_the_missing_file(tmp_path):
    """``--run-keys`` where no bootstrap keeps its state: a one-line error naming the path, before
    joining anything (the bootstrap address is never dialled)."""
    missing = tmp_path / "no-bootstrap-here"
    done = subprocess.run(SWARM + ["serve-api", "--bootstrap", "/ip4/127.0.0.1/tcp/9/p2p/QmNotDialled", "--run-keys",
                                   "--state-dir", str(missing)],
                          capture_output=True, text=True, timeout=120, env=ENV)
    assert done.returncode != 0
    assert "no bootstrap state at" in done.stderr + done.stdout and str(missing) in done.stderr + done.stdout
