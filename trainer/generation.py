"""Generation through the swarm with a KV cache on the peers, token for token as transformers does it.

``RemoteSession`` holds one inference session per stage of a route. Each step sends only the new
positions' hidden states through the pipeline; every peer extends the attention cache of its own
layers. The client keeps what it sent to each stage, so when a peer dies mid-generation the session
is re-opened on another replica of that stage and the positions so far are replayed there; the
other stages keep their caches, and the output is the same.

``generate_tokens`` is transformers' decoding loop (``GenerationMixin._sample``) over such a
session: the same positions from the attention mask (left padding), the all-ones mask dropped as
transformers drops it, the LM head on the last position only, the same logits warpers in the same
order, ``torch.multinomial`` on the global RNG (or a given generator), finished rows padded with
``pad_token_id``. Greedy output therefore equals ``AutoModelForCausalLM.generate`` exactly, and so
does sampling under the same seed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator

import torch
from transformers import GenerationConfig, PretrainedConfig
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from dht.schemas import Manifest
from peers.inference.client import InferenceClient
from peers.training.routing import Hop, plan_route
from shards.devices import to_device, to_host
from shards.local import LocalParts, default_position_ids
from core.errors import CacheMiss, CapacityExceeded, ConfigError, NoRoute, PeerUnavailable, SwarmError
from trainer.pipeline import RecordSource

__all__ = ["GenerationParams", "RemoteSession", "generate_tokens", "generation_defaults", "generation_length",
           "max_positions", "resolve_params"]

logger = logging.getLogger(__name__)

# what makes a stage's session move to another replica (the peer is gone, full, or lost the session)
_FAILOVER = (PeerUnavailable, CacheMiss, CapacityExceeded)


@dataclass(frozen=True)
class GenerationParams:
    """What to generate: transformers' names and meanings (``GenerationConfig``), the subset swarm runs."""

    max_new_tokens: int = 20
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = 50
    top_p: float = 1.0
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None

    def warpers(self) -> LogitsProcessorList:
        """The sampling warpers transformers applies, in its order; none for greedy decoding."""
        warpers = LogitsProcessorList()
        if not self.do_sample:
            return warpers
        if self.temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(self.temperature))
        if self.top_k:
            warpers.append(TopKLogitsWarper(top_k=self.top_k, min_tokens_to_keep=1))
        if self.top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p=self.top_p, min_tokens_to_keep=1))
        return warpers


_SUPPORTED = {"max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "eos_token_id", "pad_token_id"}


def resolve_params(defaults: GenerationConfig, **kwargs: Any) -> GenerationParams:
    """User arguments over the model's ``generation_config`` over transformers' global defaults.

    Anything transformers would do that swarm does not (beams, penalties, ...) is refused with a
    ``ConfigError`` naming it, rather than silently ignored.
    """
    unknown = sorted(k for k, v in kwargs.items() if k not in _SUPPORTED and v is not None)
    if unknown:
        raise ConfigError(f"generate() does not support {', '.join(unknown)}; supported: {', '.join(sorted(_SUPPORTED))}")
    merged = {k: (kwargs[k] if kwargs.get(k) is not None else getattr(defaults, k, None)) for k in _SUPPORTED}
    base = GenerationParams()
    eos = merged["eos_token_id"]
    eos = () if eos is None else tuple(int(e) for e in ([eos] if isinstance(eos, int) else eos))
    pad = merged["pad_token_id"]
    params = GenerationParams(
        max_new_tokens=int(merged["max_new_tokens"] if merged["max_new_tokens"] is not None else base.max_new_tokens),
        do_sample=bool(merged["do_sample"]),
        temperature=float(merged["temperature"] if merged["temperature"] is not None else base.temperature),
        top_k=merged["top_k"] if merged["top_k"] is not None else base.top_k,
        top_p=float(merged["top_p"] if merged["top_p"] is not None else base.top_p),
        eos_token_id=eos,
        pad_token_id=int(pad) if pad is not None else (eos[0] if eos else None),
    )
    _check(params)
    return params


def _check(params: GenerationParams) -> None:
    if params.max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be at least 1, got {params.max_new_tokens}")
    if params.do_sample and params.temperature <= 0:
        raise ConfigError(f"temperature must be > 0 when sampling, got {params.temperature}")
    if not 0 < params.top_p <= 1:
        raise ConfigError(f"top_p must be in (0, 1], got {params.top_p}")
    if params.top_k is not None and params.top_k < 0:
        raise ConfigError(f"top_k must be >= 0, got {params.top_k}")


def max_positions(config: PretrainedConfig) -> int:
    """The longest sequence the model takes (GPT-2's ``n_positions``, else ``max_position_embeddings``)."""
    return int(getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None) or 1 << 20)


def generation_defaults(root: Path | None, config: PretrainedConfig) -> GenerationConfig:
    """The model's ``generation_config.json`` when it has one, else what transformers derives from its
    config: where ``generate`` takes the end-of-sequence and padding tokens from, as transformers does."""
    if root is not None and (root / "generation_config.json").is_file():
        return GenerationConfig.from_pretrained(root)
    return GenerationConfig.from_model_config(config)


def generation_length(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, params: GenerationParams,
                      config: PretrainedConfig) -> int:
    """The positions a generation from ``input_ids`` takes (prompt + new tokens), after checking the
    prompt's shapes and that those positions fit the model (``ConfigError`` naming what is wrong)."""
    if input_ids.ndim != 2 or input_ids.shape[1] == 0:
        raise ConfigError(f"input_ids must have shape [batch, seq] with seq >= 1, got {list(input_ids.shape)}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ConfigError(f"attention_mask has shape {list(attention_mask.shape)}, input_ids {list(input_ids.shape)}")
    length = input_ids.shape[1] + params.max_new_tokens
    if length > max_positions(config):
        raise ConfigError(f"{input_ids.shape[1]} prompt tokens + {params.max_new_tokens} new tokens exceed the "
                          f"model's {max_positions(config)} positions")
    return length


@dataclass
class _Stage:
    hop: Hop
    session_id: str
    inputs: list[torch.Tensor] = field(default_factory=list)  # what this stage was sent, step by step
    fresh: bool = False  # re-opened after a failure: its next step replays ``inputs`` first


class RemoteSession:
    """Inference sessions on one peer per stage, with failover to another replica of a stage.

    ``open`` picks a route and opens a session on every hop; ``step`` sends new positions through
    them; ``close`` releases them (best effort: peers drop idle sessions anyway).
    """

    def __init__(
        self,
        manifest: Manifest,
        client: InferenceClient,
        records: RecordSource,
        *,
        batch_size: int,
        max_length: int,
        max_failovers: int = 3,
        route_wait: float = 30.0,
        rng: random.Random | None = None,
        fresh_records: RecordSource | None = None,
    ):
        """``records``: the view the first route is planned from (a trainer's cached view: no DHT read
        before the first token); ``fresh_records``: a read now, for a replacement after a failure and
        for a stage missing from the view (default ``records``)."""
        self.manifest, self.client, self._records = manifest, client, records
        self._fresh_records = fresh_records or records
        self.batch_size, self.max_length = batch_size, max_length
        self.max_failovers, self.route_wait = max_failovers, route_wait
        self.banned: set[str] = set()
        self.failovers = 0
        self.stages: list[_Stage] = []
        self.open_seconds: float | None = None  # how long ``open`` took (planning the route included)
        self._positions: list[torch.Tensor] = []
        self._rng = rng or random.Random()

    @property
    def length(self) -> int:
        return sum(p.shape[1] for p in self._positions)

    @property
    def route(self) -> tuple[Hop, ...]:
        return tuple(stage.hop for stage in self.stages)

    async def open(self) -> None:
        started = time.perf_counter()
        route = await self._plan()
        self.stages = [_Stage(hop, uuid.uuid4().hex) for hop in route]
        opened = await asyncio.gather(*(self._open(s) for s in self.stages), return_exceptions=True)
        for index, result in enumerate(opened):
            if isinstance(result, _FAILOVER):
                await self._move(index, result)
            elif isinstance(result, BaseException):
                raise result
        self.open_seconds = time.perf_counter() - started

    async def step(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None,
                   position_ids: torch.Tensor) -> torch.Tensor:
        """The last stage's hidden states for the new positions; ``attention_mask`` covers all positions."""
        start = self.length
        for index, stage in enumerate(self.stages):
            sent = hidden
            hidden = await self._step(index, start, sent, attention_mask, position_ids)
            stage.inputs.append(sent)
        self._positions.append(position_ids)
        return hidden

    async def close(self) -> None:
        results = await asyncio.gather(*(self.client.close(s.hop.peer_id, s.session_id) for s in self.stages),
                                       return_exceptions=True)
        for stage, result in zip(self.stages, results):
            if isinstance(result, BaseException):
                logger.debug("closing session on %s: %s", stage.hop.peer_id[-8:], result)

    async def _step(self, index: int, start: int, hidden: torch.Tensor, mask: torch.Tensor | None,
                    positions: torch.Tensor) -> torch.Tensor:
        for failover in range(self.max_failovers + 1):
            stage = self.stages[index]
            try:
                return await self._send(stage, start, hidden, mask, positions)
            except _FAILOVER as e:
                if failover == self.max_failovers:
                    raise
                await self._move(index, e)
        raise AssertionError("unreachable: the last failover returns or raises")

    async def _send(self, stage: _Stage, start: int, hidden: torch.Tensor, mask: torch.Tensor | None,
                    positions: torch.Tensor) -> torch.Tensor:
        """One step on ``stage``; a freshly (re-)opened session first gets every earlier position."""
        if stage.fresh and start > 0:
            everything = torch.cat([*stage.inputs, hidden], dim=1)
            all_positions = torch.cat([*self._positions, positions], dim=1)
            out = await self.client.step(stage.hop.peer_id, stage.session_id, 0, everything, mask, all_positions)
            stage.fresh = False
            return out[:, -hidden.shape[1]:]
        stage.fresh = False
        return await self.client.step(stage.hop.peer_id, stage.session_id, start, hidden, mask, positions)

    async def _move(self, index: int, error: SwarmError) -> None:
        """Re-open stage ``index``'s session: on the same peer when it only lost the session, else on
        another replica (the failing peer is banned for the rest of this session)."""
        stage = self.stages[index]
        if not isinstance(error, CacheMiss):
            self.banned.add(stage.hop.peer_id)
        self.failovers += 1
        logger.warning("stage %d on %s failed (%s: %s); re-opening the session elsewhere and replaying %d position(s)",
                       stage.hop.stage, stage.hop.peer_id[-8:], type(error).__name__, error, self.length)
        for attempt in range(1, self.max_failovers + 1):
            hop = (await self._replacement(error))[index]
            moved = _Stage(hop, uuid.uuid4().hex, stage.inputs, fresh=True)
            try:
                await self._open(moved)
            except _FAILOVER as e:
                logger.warning("re-opening stage %d on %s, attempt %d/%d: %s", hop.stage, hop.peer_id[-8:],
                               attempt, self.max_failovers, e)
                if not isinstance(e, CacheMiss):
                    self.banned.add(hop.peer_id)
                error = e
                continue
            self.stages[index] = moved
            return
        raise PeerUnavailable(f"no replica of stage {stage.hop.stage} would take the session after "
                              f"{self.max_failovers} attempts")

    async def _replacement(self, error: SwarmError) -> tuple[Hop, ...]:
        """A route without the banned peers. A dead peer may come back or be replaced, so that waits
        (bounded); a full one is answered at once, since waiting would only hold the caller."""
        if not isinstance(error, CapacityExceeded):
            return await self._plan(fresh=True)
        try:
            return await self._plan(wait=0.0, fresh=True)
        except NoRoute:
            raise CapacityExceeded(f"{error} (and no other replica of that stage is free)") from None

    async def _open(self, stage: _Stage) -> None:
        hop = stage.hop
        await self.client.open(hop.peer_id, hop.stage, hop.layers, stage.session_id,
                               batch_size=self.batch_size, max_length=self.max_length)

    async def _plan(self, wait: float | None = None, *, fresh: bool = False) -> tuple[Hop, ...]:
        """A route over the records in view (``fresh``: read now), waiting up to ``wait`` s for a stage
        nobody serves; every attempt after the first reads afresh (a view does not change by waiting)."""
        wait = self.route_wait if wait is None else wait
        deadline = time.monotonic() + wait
        attempt = 0
        while True:
            attempt += 1
            source = self._fresh_records if fresh or attempt > 1 else self._records
            try:
                return plan_route(self.manifest.stages, await source(), banned=self.banned, rng=self._rng)
            except NoRoute as e:
                if time.monotonic() >= deadline:
                    raise NoRoute(f"{e} (waited {wait:.0f} s)") from None
                if attempt == 1 or attempt % 10 == 0:
                    logger.warning("waiting for peers: %s (attempt %d)", e, attempt)
                await asyncio.sleep(min(0.25 * attempt, 2.0))


def generate_tokens(
    local: LocalParts,
    run: Callable[[Any], Any],
    session: RemoteSession,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    params: GenerationParams,
    *,
    generator: torch.Generator | None = None,
    compute: Callable[[], ContextManager] = contextlib.nullcontext,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row (``[batch]``, in host memory), step by step, as transformers'
    sampling loop.

    ``run`` runs a coroutine to completion (the model's event-loop thread). The session must be open;
    the caller closes it. The local parts compute on their device in ``compute()`` (the run's
    autocast); tokens, sampling and the hidden states sent to the peers stay in host memory.
    """
    device = next(local.parameters()).device
    input_ids = input_ids.cpu()
    attention_mask = None if attention_mask is None else attention_mask.cpu()

    def embed(ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return to_host(local.embed(to_device(ids, device), to_device(positions, device)))

    def head(hidden: torch.Tensor) -> torch.Tensor:
        with compute():
            return local.head(to_device(hidden, device))[:, -1].to("cpu", torch.float32, copy=True)

    mask = attention_mask if attention_mask is not None and not bool((attention_mask == 1).all()) else None
    if attention_mask is not None:
        positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    else:
        positions = default_position_ids(input_ids)
    tokens = input_ids
    warpers = params.warpers()
    eos = torch.tensor(params.eos_token_id, dtype=torch.long)
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.long)
    hidden = run(session.step(embed(input_ids, positions), mask, positions))
    for index in range(params.max_new_tokens):
        logits = head(hidden[:, -1:, :])
        scores = warpers(tokens, logits)
        if params.do_sample:
            nxt = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1, generator=generator).squeeze(1)
        else:
            nxt = torch.argmax(scores, dim=-1)
        if eos.numel():
            nxt = nxt * unfinished + params.pad_token_id * (1 - unfinished)
            unfinished = unfinished & ~torch.isin(nxt, eos)
        tokens = torch.cat([tokens, nxt[:, None]], dim=-1)
        yield nxt
        if index + 1 == params.max_new_tokens or not unfinished.any():
            return
        positions = positions[:, -1:] + 1
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
        hidden = run(session.step(embed(nxt[:, None], positions), mask, positions))
