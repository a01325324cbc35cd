"""The OpenAI-compatible server on 127.0.0.1 with a real 2-peer swarm behind it, called with the
official ``openai`` client: answers equal transformers' greedy output decoded with the tokenizer."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import httpx
import openai
import pytest
import torch
import uvicorn
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from shards.tiny import make_tiny_model
from bootstrap.state import StateDB
from swarm.api import AnyOf, RateLimits, RunKeys, StaticKeys, create_app
from swarm.serving import api_readiness, codec_of, model_id_of
from tests.helpers import LocalSwarm

pytestmark = pytest.mark.slow

KEY = "sk-swarm-test"
WORDS = ("the cat dog sat ran on a mat hat red blue big small and or it is was hello world how are you fine "
         "thanks what why yes no").split()
CHAT_TEMPLATE = ("{% for m in messages %}< {{ m['role'] }} > {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}< assistant >{% endif %}")


def _save_tokenizer(model_dir: Path) -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose last id is the model's end-of-sequence token, with a chat template."""
    vocab = {"[UNK]": 0, "<": 1, ">": 2, "system": 3, "user": 4, "assistant": 5}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    vocab["<eos>"] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="<eos>")
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(model_dir)
    return tokenizer


class _Server:
    """uvicorn in a thread on a free port of 127.0.0.1; ``stop`` ends it."""

    def __init__(self, app) -> None:
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                                    lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, name="api-server", daemon=True)

    def start(self) -> int:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the API server did not start"
            time.sleep(0.05)
        return self.server.servers[0].sockets[0].getsockname()[1]

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def api(tmp_path_factory) -> Iterator[tuple[openai.OpenAI, PreTrainedTokenizerFast, AutoModelForCausalLM, str, StateDB,
                                            str]]:
    """The client of an open-limits server, and the URL of a second one on the same swarm with tight
    limits (3 requests a minute per key, 2 in flight) and readiness checks."""
    root = tmp_path_factory.mktemp("api")
    tokenizer_size = len(WORDS) + 7
    model_dir = make_tiny_model(root / "model", "gpt2", num_layers=2, hidden_size=32, num_heads=4,
                                vocab_size=tokenizer_size)
    tokenizer = _save_tokenizer(model_dir)
    assert tokenizer.eos_token_id == tokenizer_size - 1
    swarm = LocalSwarm(model_dir, state_dir=root / "state", num_stages=2, num_peers=2)
    server = None
    try:
        swarm.start()
        with swarm.client() as remote:
            model_id = model_id_of(remote)
            run_keys = StateDB(root / "bootstrap-state.db")  # the run's keys, as `swarm serve-api --run-keys` reads them
            keys = AnyOf(StaticKeys([KEY]), RunKeys(run_keys))
            server = _Server(create_app(remote, codec_of(remote), model_id=model_id, keys=keys))
            port = server.start()
            limited = _Server(create_app(remote, codec_of(remote), model_id=model_id, keys=keys,
                                         limits=RateLimits(requests_per_minute=3, max_concurrent=2),
                                         checks=lambda: api_readiness(remote)))
            limited_url = f"http://127.0.0.1:{limited.start()}"
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=120)
            yield client, tokenizer, AutoModelForCausalLM.from_pretrained(model_dir), model_id, run_keys, limited_url
            limited.stop()
            server.stop()
    finally:
        swarm.stop()


def _expected(reference, tokenizer, prompts: list[list[int]], max_new: int) -> list[str]:
    """transformers' greedy continuation of each prompt (left-padded batch), decoded up to the end token."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = reference.generate(ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False)
    texts = []
    for row in out[:, width:].tolist():
        row = row[:row.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in row else row
        texts.append(tokenizer.decode(row, skip_special_tokens=True))
    return texts


def test_models_and_completions(api):
    client, tokenizer, reference, model_id, _, _ = api
    assert [m.id for m in client.models.list().data] == [model_id]
    prompts = ["the cat sat on", "hello world how are you"]
    expected = _expected(reference, tokenizer, [tokenizer.encode(p) for p in prompts], 12)
    assert any(expected), "the reference generated nothing to compare"

    one = client.completions.create(model=model_id, prompt=prompts[0], max_tokens=12, temperature=0)
    assert one.choices[0].text == _expected(reference, tokenizer, [tokenizer.encode(prompts[0])], 12)[0]
    assert one.usage.prompt_tokens == 4 and one.choices[0].finish_reason in ("length", "stop")

    both = client.completions.create(model=model_id, prompt=prompts, max_tokens=12, temperature=0)
    assert [c.text for c in sorted(both.choices, key=lambda c: c.index)] == expected

    pieces: dict[int, str] = {0: "", 1: ""}
    for chunk in client.completions.create(model=model_id, prompt=prompts, max_tokens=12, temperature=0,
                                           stream=True):
        for choice in chunk.choices:
            pieces[choice.index] += choice.text
    assert [pieces[0], pieces[1]] == expected


def test_chat_uses_the_template_and_streams(api):
    client, tokenizer, reference, model_id, _, _ = api
    messages = [{"role": "system", "content": "yes"}, {"role": "user", "content": "how are you"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    expected = _expected(reference, tokenizer, [list(prompt)], 10)[0]

    reply = client.chat.completions.create(model=model_id, messages=messages, max_tokens=10, temperature=0)
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == expected
    assert reply.usage.prompt_tokens == len(prompt)

    streamed, finish = "", None
    for chunk in client.chat.completions.create(model=model_id, messages=messages, max_tokens=10, temperature=0,
                                                stream=True):
        delta = chunk.choices[0].delta
        streamed += delta.content or ""
        finish = chunk.choices[0].finish_reason or finish
    assert streamed == expected and finish in ("length", "stop")


def test_embeddings_are_mean_pooled_final_hidden_states(api):
    client, tokenizer, reference, model_id, _, _ = api
    texts = ["the red hat", "a big blue dog ran"]
    got = client.embeddings.create(model=model_id, input=texts)
    for text, item in zip(texts, sorted(got.data, key=lambda d: d.index)):
        ids = torch.tensor([tokenizer.encode(text)])
        with torch.no_grad():
            hidden = reference(ids, output_hidden_states=True).hidden_states[-1][0]
        assert torch.allclose(torch.tensor(item.embedding), hidden.mean(0), atol=1e-4)
    floats = client.embeddings.create(model=model_id, input=texts[0], encoding_format="float")
    assert torch.allclose(torch.tensor(floats.data[0].embedding), torch.tensor(got.data[0].embedding), atol=1e-6)


def test_errors_have_openai_shape(api):
    client, _, _, model_id, _, _ = api
    with pytest.raises(openai.AuthenticationError) as raised:
        openai.OpenAI(base_url=str(client.base_url), api_key="sk-wrong", max_retries=0).models.list()
    assert raised.value.status_code == 401 and raised.value.code == "invalid_api_key"
    with pytest.raises(openai.NotFoundError) as raised:
        client.completions.create(model="no-such-model", prompt="the cat", max_tokens=2)
    assert raised.value.code == "model_not_found" and "no-such-model" in raised.value.message
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(model=model_id, prompt="the cat", max_tokens=10_000)
    assert raised.value.code == "context_length_exceeded" and "maximum context length is 256" in raised.value.message
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(model=model_id, prompt="the cat", max_tokens=2, temperature=5)
    assert raised.value.param == "temperature" and "less than or equal to 2" in raised.value.message
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=model_id, messages=[], max_tokens=2)
    assert raised.value.param == "messages"


def test_the_runs_api_keys_are_accepted_until_revoked(api):
    client, _, _, model_id, run_keys, _ = api
    issued = run_keys.create_key("api-user", actor="test", scopes=("api",))
    holder = openai.OpenAI(base_url=str(client.base_url), api_key=issued.secret, max_retries=0, timeout=60)
    assert [m.id for m in holder.models.list().data] == [model_id]
    run_keys.revoke_key(issued.key.id, actor="test")
    with pytest.raises(openai.AuthenticationError):
        holder.models.list()
    assert [m.id for m in client.models.list().data] == [model_id]  # the static key still works


def test_a_burst_gets_429_with_retry_after_and_health_needs_no_key(api):
    *_, model_id, run_keys, url = api
    user = run_keys.create_key("bursty", actor="test", scopes=("api",)).secret
    third = run_keys.create_key("third", actor="test", scopes=("api",)).secret
    headers = {"Authorization": f"Bearer {user}"}
    with httpx.Client(base_url=url, timeout=120) as http:
        assert http.get("/health").json() == {"status": "ok"}
        ready = http.get("/ready")
        assert ready.status_code == 200 and ready.json()["checks"] == {"dht": True, "stages": True, "bootstrap": True}
        codes = [http.get("/v1/models", headers=headers).status_code for _ in range(5)]
        assert codes == [200, 200, 200, 429, 429]
        limited = http.get("/v1/models", headers=headers)
        assert limited.json()["error"]["code"] == "rate_limit_exceeded"
        assert 1 <= int(limited.headers["Retry-After"]) <= 60
        other = {"Authorization": f"Bearer {KEY}"}  # the limit is per key: another key still passes
        assert http.get("/v1/models", headers=other).status_code == 200
        # two slow completions in flight fill the server's cap of 2: a third request is refused at once
        body = {"model": model_id, "prompt": [1, 2, 3], "max_tokens": 24, "temperature": 0}
        with ThreadPoolExecutor(2) as pool:
            slow = [pool.submit(http.post, "/v1/completions", json=body, headers=other) for _ in range(2)]
            refused = None
            while refused is None and not all(f.done() for f in slow):
                reply = http.get("/v1/models", headers={"Authorization": f"Bearer {third}"})
                refused = reply if reply.status_code == 429 else None
            assert all(f.result().status_code == 200 for f in slow)
    assert refused is not None and refused.headers["Retry-After"] == "1"


def test_a_join_key_cannot_use_the_api_and_every_use_is_audited(api):
    client, *_, run_keys, _ = api
    joiner = run_keys.create_key("volunteer", actor="test")  # scope join only
    user = run_keys.create_key("inference", actor="test", scopes=("api",))
    with pytest.raises(openai.AuthenticationError, match="lacks scope api"):
        openai.OpenAI(base_url=str(client.base_url), api_key=joiner.secret, max_retries=0).models.list()
    openai.OpenAI(base_url=str(client.base_url), api_key=user.secret, max_retries=0).models.list()
    audit = [(e.actor, e.action, e.detail) for e in run_keys.audit_log()]
    assert (f"api:{user.key.id}", "api.use", f"key {user.key.id} (inference)") in audit
    assert any(actor == f"api:{joiner.key.id}" and action == "api.refused" and "cannot use the inference API" in detail
               for actor, action, detail in audit)
