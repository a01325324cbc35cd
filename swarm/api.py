"""An OpenAI-compatible HTTP API in front of a swarm: ``swarm serve-api --bootstrap <addr>``.

Endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with
``stream: true`` as server-sent events) and ``POST /v1/embeddings`` (mean of the final hidden states
over the input's tokens). Errors are OpenAI's shape, ``{"error": {"message", "type", "param",
"code"}}``, with 400 for bad parameters and too many tokens, 401 for a missing or wrong API key, 404
for an unknown model, 503 when the swarm cannot serve.

Generation runs through ``SwarmModelForCausalLM.iter_generate`` (KV-cache sessions on the peers) in
a worker thread, so one slow request does not hold the others; several requests generate at once.

Facing the internet: per key, at most ``requests_per_minute`` requests and ``tokens_per_minute``
tokens (prompt and completion) in any minute, and at most ``max_concurrent`` requests in flight on
the whole server; past either, 429 with ``Retry-After`` (``RateLimits``). ``/health`` and ``/ready``
(``peers.telemetry.health``) need no key.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import json
import logging
import math
import secrets
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable, Iterator, Literal, Protocol, Sequence

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool

from core.errors import AuthRejected, BadRequest, ConfigError, NoRoute, NoTokenizer, PeerUnavailable, SwarmError
from bootstrap.keys import key_id_of
from peers.telemetry.health import Checks, health_body, readiness
from trainer.generation import max_positions
from swarm.text import StopScanner, StreamDecoder, TextCodec

if TYPE_CHECKING:
    from bootstrap.state import StateDB
    from net.auth import RunAuth
    from core.loop import LoopThread

__all__ = ["KeyCheck", "StaticKeys", "RunKeys", "SwarmKeys", "AnyOf", "ApiError", "RateLimits", "create_app",
           "Backend", "client_id"]

logger = logging.getLogger(__name__)


# -- auth -------------------------------------------------------------------------------------------


class KeyCheck(Protocol):
    """Where API keys are checked. ``StaticKeys`` is the simple source (``--api-key`` / settings);
    the bootstrap's key store plugs in behind the same two methods."""

    def enforced(self) -> bool: ...

    def allows(self, key: str) -> bool: ...


class StaticKeys:
    """A fixed set of keys; an empty set means the API is open (no ``Authorization`` needed)."""

    def __init__(self, keys: Sequence[str] = ()):
        self._keys = frozenset(k for k in keys if k)

    def enforced(self) -> bool:
        return bool(self._keys)

    def allows(self, key: str) -> bool:
        return any(secrets.compare_digest(key, k) for k in self._keys)


class RunKeys:
    """The run's API keys (``swarm keys create --scope api``), checked in the bootstrap's state
    database on this machine at every request: a key revoked or expired there, or one without scope
    ``api``, is refused from the next request on. Every use and every refusal is audited there."""

    def __init__(self, db: StateDB):
        self._db = db

    def enforced(self) -> bool:
        return True

    def allows(self, key: str) -> bool:
        try:
            used = self._db.verify_key(key, scope="api")
        except AuthRejected as e:
            self._db.audit(f"api:{client_id(key)}", "api.refused", str(e))
            return False
        self._db.audit(f"api:{used.id}", "api.use", f"key {used.id} ({used.name})")
        return True


class SwarmKeys:
    """The run's API keys, for an API server anywhere in a run that enforces keys (open run: not
    enforced). A key is checked once with a bootstrap (``RunAuth.exchange`` with scope ``api``: the
    bootstrap audits the check and gives no token), then trusted for ``recheck`` s; a key the run owner revokes is refused as
    soon as the run-control record says so (seconds). While no bootstrap answers, a key that passed
    before still passes and a new one gets 503."""

    def __init__(self, auth: RunAuth | None, runner: LoopThread, *, recheck: float = 600.0):
        self._auth, self._runner, self._recheck = auth, runner, recheck
        self._passed: dict[str, float] = {}
        self._lock = threading.Lock()

    def enforced(self) -> bool:
        return self._auth is not None

    def allows(self, key: str) -> bool:
        try:
            key_id = key_id_of(key)
        except AuthRejected:
            return False
        if key_id in self._auth.gate.revoked:
            return False
        with self._lock:
            passed = self._passed.get(key)
        if passed is not None and time.monotonic() - passed < self._recheck:
            return True
        try:
            self._runner.run(self._auth.exchange(key, "api"), timeout=65)
        except AuthRejected:
            with self._lock:
                self._passed.pop(key, None)
            return False
        except (SwarmError, TimeoutError) as e:
            if passed is not None:
                return True
            raise ApiError(503, f"no bootstrap of the run is reachable to check the API key: {e}",
                           type="server_error", code="key_check_unavailable") from None
        with self._lock:
            self._passed[key] = time.monotonic()
        return True


class AnyOf:
    """Several key sources at once: a key any enforced source allows passes; open when none enforces."""

    def __init__(self, *checks: KeyCheck):
        self._checks = checks

    def enforced(self) -> bool:
        return any(check.enforced() for check in self._checks)

    def allows(self, key: str) -> bool:
        return any(check.enforced() and check.allows(key) for check in self._checks)


def client_id(key: str) -> str:
    """Who a key is in limits and logs: a run key's public id, else a short hash (never the key)."""
    try:
        return key_id_of(key)
    except AuthRejected:
        return "h" + hashlib.sha256(key.encode()).hexdigest()[:8]


class RateLimits:
    """Per client (a key's ``client_id``; ``"-"`` on an open server) requests and tokens in the last
    ``WINDOW`` seconds, and requests in flight on the whole server. ``None``: no limit. ``admit``
    answers the seconds to wait (0: go ahead); ``spent`` counts a finished request's tokens."""

    WINDOW = 60.0

    def __init__(self, requests_per_minute: int | None = None, tokens_per_minute: int | None = None,
                 max_concurrent: int | None = None, *, clock=time.monotonic):
        self.requests_per_minute, self.tokens_per_minute = requests_per_minute, tokens_per_minute
        self.max_concurrent, self.clock = max_concurrent, clock
        self.in_flight = 0
        self._requests: dict[str, collections.deque[float]] = {}
        self._tokens: dict[str, collections.deque[tuple[float, int]]] = {}
        self._lock = threading.Lock()

    def admit(self, client: str) -> float:
        """Take a slot for one request of ``client`` now, or say how many seconds until it may retry."""
        with self._lock:
            now = self.clock()
            if self.max_concurrent is not None and self.in_flight >= self.max_concurrent:
                return 1.0
            requests = _trim(self._requests.setdefault(client, collections.deque()), now - self.WINDOW, lambda t: t)
            tokens = _trim(self._tokens.setdefault(client, collections.deque()), now - self.WINDOW, lambda e: e[0])
            waits = []
            if self.requests_per_minute is not None and len(requests) >= self.requests_per_minute:
                waits.append(requests[0] + self.WINDOW - now)
            if self.tokens_per_minute is not None and sum(n for _, n in tokens) >= self.tokens_per_minute:
                waits.append(tokens[0][0] + self.WINDOW - now)
            if waits:
                return max(1.0, math.ceil(max(waits)))
            requests.append(now)
            self.in_flight += 1
            return 0.0

    def done(self, client: str, tokens: int) -> None:
        """The request admitted for ``client`` ended, having used ``tokens``."""
        with self._lock:
            self.in_flight = max(0, self.in_flight - 1)
            if tokens > 0:
                self._tokens.setdefault(client, collections.deque()).append((self.clock(), tokens))


def _trim(entries: collections.deque, before: float, at) -> collections.deque:
    while entries and at(entries[0]) <= before:
        entries.popleft()
    return entries


# -- errors -----------------------------------------------------------------------------------------


class ApiError(Exception):
    """An error reply in OpenAI's shape."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.retry_after = retry_after

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        headers = {"Retry-After": str(int(self.retry_after))} if self.retry_after is not None else None
        return JSONResponse(body, status_code=self.status, headers=headers)


def _from_swarm(error: SwarmError) -> ApiError:
    if isinstance(error, NoTokenizer):
        return ApiError(400, str(error), code="no_tokenizer")
    if isinstance(error, (ConfigError, BadRequest)):
        return ApiError(400, str(error))
    if isinstance(error, (NoRoute, PeerUnavailable)):
        return ApiError(503, f"the swarm cannot serve this request now: {error}", type="server_error",
                        code="swarm_unavailable")
    return ApiError(500, f"{type(error).__name__}: {error}", type="server_error")


# -- requests ---------------------------------------------------------------------------------------


class _Request(BaseModel):
    """Fields OpenAI clients send; the ones swarm cannot honour are refused when set, not ignored."""

    model_config = ConfigDict(extra="forbid")

    model: str
    user: str | None = None


class _Sampling(_Request):
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    n: int = Field(1, ge=1, le=1, description="one choice per prompt")
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = Field(0.0, ge=0, le=0, description="not supported: only 0")
    frequency_penalty: float = Field(0.0, ge=0, le=0, description="not supported: only 0")
    logprobs: Literal[False] | None = None

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(str(part.get("text", "")) for part in self.content if part.get("type") == "text")
        return self.content or ""


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None


class EmbeddingRequest(_Request):
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None


# -- the model behind the API -----------------------------------------------------------------------


class Backend(Protocol):
    """What the API needs of a model: ``SwarmModelForCausalLM`` is one."""

    local: Any

    def iter_generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any
                      ) -> Iterator[torch.Tensor]: ...

    def final_hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                            ) -> torch.Tensor: ...


@dataclass
class _Row:
    prompt: list[int]
    decoder: StreamDecoder
    scanner: StopScanner
    shown: int = 0
    tokens: int = 0
    finish: str | None = None
    text: str = ""


@dataclass
class _Generation:
    """Runs one batch of prompts and turns the token stream into text pieces per row, cut at the
    stop strings. ``events()`` yields ``(row, piece)``; ``rows`` holds the results afterwards."""

    backend: Backend
    rows: list[_Row]
    kwargs: dict[str, Any]
    eos: frozenset[int]
    generator: torch.Generator | None = None

    def events(self) -> Iterator[tuple[int, str]]:
        ids, mask = _left_pad([r.prompt for r in self.rows], pad=min(self.eos) if self.eos else 0)
        tokens = self.backend.iter_generate(ids, mask, generator=self.generator, **self.kwargs)
        try:
            for step in tokens:
                for index, row in enumerate(self.rows):
                    if row.finish is None:
                        yield from ((index, p) for p in self._advance(row, int(step[index])))
                if all(r.finish is not None for r in self.rows):
                    break
        finally:
            tokens.close()
        for index, row in enumerate(self.rows):
            if row.finish is None:
                row.finish = "length"
                text = row.decoder.text
                cut = row.scanner.find(text)
                yield from ((index, p) for p in self._reveal(row, text if cut is None else text[:cut]))

    def _advance(self, row: _Row, token: int) -> Iterator[str]:
        row.tokens += 1
        if token in self.eos:
            row.finish = "stop"
            yield from self._reveal(row, row.decoder.text)
            return
        row.decoder.push(token)
        text = row.decoder.text
        cut = row.scanner.find(text)
        if cut is not None:
            row.finish = "stop"
            yield from self._reveal(row, text[:cut])
            return
        visible = text[:row.decoder.emitted]
        yield from self._reveal(row, visible[:row.scanner.safe(visible)], final=False)

    @staticmethod
    def _reveal(row: _Row, text: str, final: bool = True) -> Iterator[str]:
        if final:
            row.text = text
        if len(text) > row.shown:
            piece, row.shown = text[row.shown:], len(text)
            yield piece


def _left_pad(prompts: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt):] = 1
    return ids, (None if bool(mask.all()) else mask)


# -- the app ----------------------------------------------------------------------------------------


class _Api:
    def __init__(self, backend: Backend, codec: TextCodec | None, model_id: str, keys: KeyCheck,
                 *, aliases: Sequence[str] = (), max_batch: int = 32, limits: RateLimits | None = None):
        self.backend, self.codec, self.model_id, self.keys = backend, codec, model_id, keys
        self.limits = limits or RateLimits()
        self.names = {model_id, *aliases}
        self.context = max_positions(backend.local.config)
        self.max_batch = max_batch
        self.created = int(time.time())

    async def check_key(self, request: Request) -> str:
        """The caller's ``client_id`` (``"-"`` on an open server), or 401 unless the request carries a
        key the key source allows (checked off the event loop: a source may ask the run's bootstrap)."""
        if not self.keys.enforced():
            return "-"
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise ApiError(401, "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.",
                           code="invalid_api_key")
        if not await run_in_threadpool(self.keys.allows, key.strip()):
            raise ApiError(401, "Incorrect API key provided (or it lacks scope api).", code="invalid_api_key")
        return client_id(key.strip())

    async def serve(self, request: Request, work: Callable[[Callable[[int], None]], Awaitable[Any]]) -> Any:
        """Check the key and the limits, then ``await work(finish)``; ``finish(tokens)`` ends the
        request's slot (a stream calls it when the stream ends; otherwise it is called here)."""
        client = await self.check_key(request)
        wait = self.limits.admit(client)
        if wait:
            logger.info("rate limit: %s waits %.0f s", client, wait)
            raise ApiError(429, f"Rate limit reached for {client}: retry in {wait:.0f} s.", type="rate_limit_error",
                           code="rate_limit_exceeded", retry_after=wait)
        ended = threading.Event()

        def finish(tokens: int) -> None:
            if not ended.is_set():
                ended.set()
                self.limits.done(client, tokens)

        try:
            result = await work(finish)
        except BaseException:
            finish(0)
            raise
        if not isinstance(result, StreamingResponse):
            finish(0)
        return result

    def check_model(self, name: str) -> None:
        if name not in self.names:
            raise ApiError(404, f"The model '{name}' does not exist; this server serves '{self.model_id}'.",
                           param="model", code="model_not_found")

    def text_codec(self) -> TextCodec:
        if self.codec is None:
            raise ApiError(400, f"model '{self.model_id}' has no tokenizer and is not byte-level: send token ids "
                                "(a list of integers) instead of text", code="no_tokenizer")
        return self.codec

    def prompts(self, prompt: Any, field_name: str) -> list[list[int]]:
        if isinstance(prompt, str):
            batch = [self.text_codec().encode(prompt)]
        elif prompt and all(isinstance(p, int) for p in prompt):
            batch = [list(prompt)]
        elif prompt and all(isinstance(p, str) for p in prompt):
            batch = [self.text_codec().encode(p) for p in prompt]
        else:
            batch = [list(p) for p in prompt]
        vocab = int(self.backend.local.config.vocab_size)
        if not batch or any(not p for p in batch):
            raise ApiError(400, f"'{field_name}' is empty", param=field_name)
        if len(batch) > self.max_batch:
            raise ApiError(400, f"at most {self.max_batch} inputs per request, got {len(batch)}", param=field_name)
        if any(not 0 <= t < vocab for p in batch for t in p):
            raise ApiError(400, f"token ids in '{field_name}' must be in [0, {vocab})", param=field_name)
        return batch

    def check_length(self, prompts: list[list[int]], max_tokens: int) -> None:
        longest = max(len(p) for p in prompts)
        if longest + max_tokens > self.context:
            raise ApiError(400, f"This model's maximum context length is {self.context} tokens. However, you "
                                f"requested {longest + max_tokens} tokens ({longest} in the prompt, {max_tokens} in "
                                "the completion). Please reduce the prompt or the completion length.",
                           param="max_tokens", code="context_length_exceeded")

    def generation(self, body: _Sampling, prompts: list[list[int]], max_tokens: int,
                   extra_stops: Sequence[str] = ()) -> _Generation:
        self.check_length(prompts, max_tokens)
        stops = [*body.stops(), *extra_stops]
        codec = self.text_codec()
        kwargs: dict[str, Any] = dict(max_new_tokens=max_tokens, do_sample=body.temperature > 0,
                                      top_p=body.top_p, top_k=body.top_k or 0)
        if body.temperature > 0:
            kwargs["temperature"] = body.temperature
        eos = frozenset(self._eos())
        rows = [_Row(p, StreamDecoder(codec), StopScanner(stops)) for p in prompts]
        generator = torch.Generator().manual_seed(body.seed) if body.seed is not None else None
        return _Generation(self.backend, rows, kwargs, eos, generator)

    def _eos(self) -> list[int]:
        config = getattr(self.backend, "generation_config", None)
        eos = getattr(config, "eos_token_id", None)
        found = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        if self.codec is not None and self.codec.eos_token_id is not None:
            found.append(self.codec.eos_token_id)
        return found


def create_app(backend: Backend, codec: TextCodec | None, *, model_id: str, keys: KeyCheck | None = None,
               aliases: Sequence[str] = (), limits: RateLimits | None = None, checks: Checks | None = None) -> FastAPI:
    """The FastAPI app serving ``backend`` under the name ``model_id`` (and ``aliases``); ``checks``:
    what ``/ready`` asks (none: ready while it answers)."""
    api = _Api(backend, codec, model_id, keys or StaticKeys(), aliases=aliases, limits=limits)
    app = FastAPI(title="swarm OpenAI-compatible API")
    app.state.api = api

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, error: ApiError) -> JSONResponse:
        return error.response()

    @app.exception_handler(SwarmError)
    async def _swarm_error(request: Request, error: SwarmError) -> JSONResponse:
        return _from_swarm(error).response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        where = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = where[0] if where else None
        message = f"{'.'.join(where) or 'body'}: {first.get('msg')}"
        return ApiError(400, message, param=param).response()

    @app.get("/health")
    async def health() -> dict:
        return health_body()

    @app.get("/ready")
    async def ready() -> JSONResponse:
        code, body = await run_in_threadpool(readiness, checks)
        return JSONResponse(body, status_code=code)

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        async def work(finish: Callable[[int], None]) -> dict:
            return {"object": "list", "data": [{"id": api.model_id, "object": "model", "created": api.created,
                                                "owned_by": "swarm"}]}
        return await api.serve(request, work)

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        async def work(finish: Callable[[int], None]) -> Any:
            api.check_model(body.model)
            if body.echo:
                raise ApiError(400, "echo is not supported", param="echo")
            prompts = api.prompts(body.prompt, "prompt")
            gen = api.generation(body, prompts, body.max_tokens or 16)
            return await _respond(gen, body.stream, _CompletionShape(api.model_id), finish)
        return await api.serve(request, work)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(body: ChatRequest, request: Request) -> Any:
        async def work(finish: Callable[[int], None]) -> Any:
            api.check_model(body.model)
            if body.logprobs:
                raise ApiError(400, "logprobs are not supported", param="logprobs")
            codec = api.text_codec()
            prompt = codec.chat_prompt([{"role": m.role, "content": m.text()} for m in body.messages])
            api.check_length([prompt], 1)
            max_tokens = body.max_completion_tokens or body.max_tokens or min(512, api.context - len(prompt))
            gen = api.generation(body, [prompt], max_tokens, codec.chat_stop)
            return await _respond(gen, body.stream, _ChatShape(api.model_id), finish)
        return await api.serve(request, work)

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest, request: Request) -> dict:
        async def work(finish: Callable[[int], None]) -> dict:
            api.check_model(body.model)
            if body.dimensions is not None:
                raise ApiError(400, "dimensions is not supported: embeddings have the model's hidden size",
                               param="dimensions")
            prompts = api.prompts(body.input, "input")
            api.check_length(prompts, 0)
            pooled = await run_in_threadpool(_mean_pooled, backend, prompts)
            data = [{"object": "embedding", "index": i, "embedding": _encode(v, body.encoding_format)}
                    for i, v in enumerate(pooled)]
            used = sum(len(p) for p in prompts)
            finish(used)
            return {"object": "list", "data": data, "model": api.model_id,
                    "usage": {"prompt_tokens": used, "total_tokens": used}}
        return await api.serve(request, work)

    return app


def _mean_pooled(backend: Backend, prompts: list[list[int]]) -> torch.Tensor:
    ids, mask = _left_pad(prompts, pad=0)
    hidden = backend.final_hidden_states(ids, mask).float().cpu()  # a model on a GPU answers there
    weights = (mask if mask is not None else torch.ones_like(ids)).unsqueeze(-1).float()
    return (hidden * weights).sum(1) / weights.sum(1)


def _encode(vector: torch.Tensor, encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(vector.to(torch.float32).numpy().astype("<f4").tobytes()).decode("ascii")
    return [float(x) for x in vector.tolist()]


# -- response shapes --------------------------------------------------------------------------------


class _Shape(Protocol):
    def chunk(self, rid: str, created: int, index: int, piece: str | None, finish: str | None) -> dict: ...

    def final(self, rid: str, created: int, rows: list[_Row]) -> dict: ...

    prefix: str


@dataclass
class _CompletionShape:
    model: str
    prefix: str = "cmpl"

    def chunk(self, rid: str, created: int, index: int, piece: str | None, finish: str | None) -> dict:
        return {"id": rid, "object": "text_completion", "created": created, "model": self.model,
                "choices": [{"index": index, "text": piece or "", "logprobs": None, "finish_reason": finish}]}

    def final(self, rid: str, created: int, rows: list[_Row]) -> dict:
        return {"id": rid, "object": "text_completion", "created": created, "model": self.model,
                "choices": [{"index": i, "text": r.text, "logprobs": None, "finish_reason": r.finish}
                            for i, r in enumerate(rows)],
                "usage": _usage(rows)}


@dataclass
class _ChatShape:
    model: str
    prefix: str = "chatcmpl"

    def chunk(self, rid: str, created: int, index: int, piece: str | None, finish: str | None) -> dict:
        delta = {} if piece is None and finish else {"content": piece} if piece is not None else {
            "role": "assistant", "content": ""}
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.model,
                "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}]}

    def final(self, rid: str, created: int, rows: list[_Row]) -> dict:
        return {"id": rid, "object": "chat.completion", "created": created, "model": self.model,
                "choices": [{"index": i, "message": {"role": "assistant", "content": r.text},
                             "logprobs": None, "finish_reason": r.finish} for i, r in enumerate(rows)],
                "usage": _usage(rows)}


def _usage(rows: list[_Row]) -> dict:
    prompt = sum(len(r.prompt) for r in rows)
    completion = sum(r.tokens for r in rows)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _respond(gen: _Generation, stream: bool, shape: _Shape, finish: Callable[[int], None]) -> Any:
    """The reply: one JSON body, or a stream; ``finish`` hears the tokens used once it is all done."""
    rid, created = f"{shape.prefix}-{secrets.token_hex(12)}", int(time.time())
    if not stream:
        try:
            await run_in_threadpool(lambda: [None for _ in gen.events()])
        finally:
            finish(_usage(gen.rows)["total_tokens"])
        return shape.final(rid, created, gen.rows)
    return StreamingResponse(_finished(_sse(gen, shape, rid, created), gen, finish), media_type="text/event-stream")


async def _finished(events: AsyncIterator[str], gen: _Generation, finish: Callable[[int], None]) -> AsyncIterator[str]:
    try:
        async for event in events:
            yield event
    finally:
        finish(_usage(gen.rows)["total_tokens"])


async def _sse(gen: _Generation, shape: _Shape, rid: str, created: int) -> AsyncIterator[str]:
    if isinstance(shape, _ChatShape):
        for index in range(len(gen.rows)):
            yield f"data: {json.dumps(shape.chunk(rid, created, index, None, None))}\n\n"
    events = gen.events()
    try:
        async for index, piece in iterate_in_threadpool(events):
            yield f"data: {json.dumps(shape.chunk(rid, created, index, piece, None))}\n\n"
    except SwarmError as e:  # the status line is already sent: report in the stream, as OpenAI does
        error = _from_swarm(e)
        yield f"data: {json.dumps({'error': {'message': error.message, 'type': error.type, 'code': error.code}})}\n\n"
        return
    finally:
        await run_in_threadpool(events.close)
    for index, row in enumerate(gen.rows):
        yield f"data: {json.dumps(shape.chunk(rid, created, index, None, row.finish))}\n\n"
    yield "data: [DONE]\n\n"
