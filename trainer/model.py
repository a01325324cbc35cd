"""``SwarmModelForCausalLM``: a torch ``nn.Module`` whose transformer layers live on the swarm.

Embeddings, the final norm and the LM head are local parameters (so any loss and any local optimizer
work as usual); the layers in between are computed by the peers of the route, forward and backward,
through a custom autograd function. Each backward pass commits its sequences to the run's
collaborative step; when the trainers' commits reach ``target_batch_size`` the step closes and the
stages apply it (their replicas averaging gradients) before ``backward`` returns. A lone trainer whose
batch has that many rows therefore steps in lockstep with the stages: ``loss.backward();
optimizer.step()``. Several trainers (data parallel) use ``model.create_optimizer()``, which also sums
their local gradients with hivemind averaging, so their embeddings and head stay equal.

``SwarmModelForCausalLM`` is a facade over its parts, one module each:

* ``trainer.remote_layers``: the layers on the swarm as torch sees them (forward, backward and
  commit, and ``train_step``'s pipelined loss);
* ``trainer.local_parts``: the local parts' state as it leaves and enters this trainer (taken from
  the other trainers at join, shared with later ones, uploaded to the stores, exported);
* ``trainer.run_link``: the run's control plane (pause and stop, a keyed run's membership, the
  progress this trainer reports);
* ``trainer.generation``: generation through the peers' KV caches.

This module keeps the public ``nn.Module``, its optimizer and ``from_pretrained``'s start-up, one
named step per part it starts.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Coroutine, Iterator, Sequence, TypeVar

import torch
from torch import nn

from hivemind.utils import get_dht_time

from dht.bans import excluded_peers, report_ban
from dht.clock import check_clock
from dht.records import SwarmDHT
from dht.schemas import BanReport, Manifest, PeerRecord, RunState
from net.auth import AuthedTransport, RunAuth
from net.channel import Identity
from net.transport import P2PTransport, Transport
from peers.inference.client import InferenceClient
from peers.state.snapshot import StateMeta
from peers.training.averaging import HivemindGradientSync
from peers.training.client import StageClient
from shards.devices import compute_context, local_precision, resolve_device, to_device
from shards.local import LocalParts, causal_lm_loss, default_position_ids, load_local_parts
from shards.source import ModelSource, resolve_model
from core.loop import LoopThread
from core.config import TrainerSettings, trainer_settings
from core.errors import ConfigError, SwarmError
from trainer.faults import POLICY_SETTINGS
from trainer.generation import RemoteSession, generate_tokens, generation_defaults, generation_length, resolve_params
from trainer.local_parts import SharedLocalParts
from trainer.pipeline import FaultPolicy, RemotePipeline
from trainer.remote_layers import RemoteLayers
from trainer.run_link import RunLink
from trainer.spotcheck import BanList, SpotChecker, run_tolerance, without_banned
from trainer.steps import DHTCoordinator

__all__ = ["SwarmModelForCausalLM", "CausalLMOutput", "SwarmOptimizer"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

_TRAINERS_WINDOW = 2.0
"""Seconds the trainers of a step have to join its round of summing their local gradients."""


@dataclass
class CausalLMOutput:
    """What ``forward`` returns, with the fields of transformers' ``CausalLMOutput`` that apply."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None


class SwarmModelForCausalLM(nn.Module):
    """A causal LM whose layers are served by a swarm; use it like a transformers model."""

    def __init__(
        self,
        local: LocalParts,
        pipeline: RemotePipeline,
        runner: LoopThread,
        *,
        microbatch_size: int | None = None,
        resources: Sequence = (),
        trainer_sync: HivemindGradientSync | None = None,
        auth: RunAuth | None = None,
    ):
        """``resources`` (the p2p transport, the DHT), ``trainer_sync`` and ``auth`` (a keyed run's
        membership) are owned from here on: ``close()`` stops them."""
        super().__init__()
        self.local = local
        self.pipeline = pipeline
        self.manifest: Manifest = pipeline.manifest
        self.source: ModelSource | None = None
        self._runner = runner
        self._resources = list(resources)
        self._trainer_sync = trainer_sync
        self._run = RunLink(auth)
        self._shared = SharedLocalParts(local, pipeline, runner)
        self._precision = local_precision(self.manifest.dtype)
        self._layers = RemoteLayers(local, pipeline, runner, microbatch_size, compute=self._compute)
        self.inference_client = InferenceClient(pipeline.client.transport, timeout=pipeline.client.timeout)
        self.generation_config = generation_defaults(None, local.config)
        self.last_session: RemoteSession | None = None

    @classmethod
    def from_pretrained(
        cls,
        model: str | None = None,
        *,
        initial_peers: Sequence[str],
        run_id: str = "swarm",
        host: str | None = None,
        policy: FaultPolicy | None = None,
        key: str | None = None,
        **settings: Any,
    ) -> "SwarmModelForCausalLM":
        """Join the run's DHT, check ``model`` against the run's manifest, and load only the local
        parts. ``model`` defaults to the manifest's model (a hub id or a shared path). ``host`` is
        where this trainer's p2p daemon listens: by default loopback when every initial peer is on
        loopback (a local swarm, tests), else all interfaces. ``key`` (default: the ``SWARM_KEY``
        environment variable) is the API key a keyed run needs.

        ``settings`` are fields of ``TrainerSettings`` (``[trainer]`` in swarm.toml), validated and
        defaulted there: ``device`` is where the local parts compute (``cpu``, as any ``nn.Module``, until
        ``device="cuda"`` or ``.to("cuda")``), ``timeout`` bounds one stage call (a peer that hangs longer
        is routed around),
        ``route_wait`` the wait for a peer to take over a stage nobody serves, ``microbatch_size`` the
        rows of a microbatch, ``push`` sends training activations peer to peer (false: this trainer
        relays every hop), and ``ban_time``, ``averaging_window``, ``step_wait``, ``max_abs_value``,
        ``spot_check_rate`` and ``spot_check_tolerance`` are the fault-tolerance bounds. ``policy``
        sets every bound of ``FaultPolicy`` at once instead (then not also as a keyword). A bad or
        unknown setting raises ``ConfigError`` naming it.

        Whatever fails on the way stops everything started before it, in reverse order."""
        if not initial_peers:
            raise ConfigError("initial_peers is empty: pass the bootstrap's multiaddr")
        trainer, policy = _trainer_config(settings, policy)
        device = resolve_device(trainer.device)  # a GPU this machine lacks fails before anything starts
        with contextlib.ExitStack() as started:
            runner = LoopThread("swarm-trainer")
            started.callback(runner.stop)
            dht, manifest, auth = _join_run(started, runner, run_id, initial_peers, host, key, trainer.timeout)
            source = _checked_source(model, manifest, run_id)
            local = load_local_parts(source)
            transport, calls = _open_transport(started, runner, dht, auth, channel=trainer.channel)
            coordinator = _start_coordinator(started, runner, dht, manifest)
            pipeline = _pipeline(manifest, calls, coordinator, dht, auth, trainer, policy)
            trainer_sync = _trainer_averager(started, dht, manifest, local, policy)
            model = cls(local, pipeline, runner, microbatch_size=trainer.microbatch_size,
                        resources=[transport, dht], trainer_sync=trainer_sync, auth=auth)
            model.to(device)
            started.pop_all()  # from here the model owns all of it: its close() stops it
            started.callback(model.close)
            model._join(dht, source)
            started.pop_all()
        return model

    def _join(self, dht: SwarmDHT, source: ModelSource) -> None:
        """The last steps of ``from_pretrained``, on a model that owns its parts: take the model
        files' generation defaults, follow the run state, take the other trainers' local parts."""
        self.source = source
        self.generation_config = generation_defaults(source.root, self.local.config)
        self._runner.run(self._run.start(dht))
        self._shared.catch_up(dht, self._trainer_sync)

    @property
    def run_auth(self) -> RunAuth | None:
        """This client's membership of a keyed run (its token, the run's revocations); None if open."""
        return self._run.auth

    @property
    def loop(self) -> LoopThread:
        """The event-loop thread this client's network calls run on."""
        return self._runner

    @property
    def run_state(self) -> RunState:
        return self._run.state

    def wait_while_paused(self, on_pause: Callable[[], None] | None = None, poll: float = 0.5) -> None:
        """Block while the run owner has the run paused (say so once); ``RunStopped`` if stopped."""
        self._run.wait_while_paused(on_pause, poll)

    def report_progress(self, step: int, loss: float | None = None, tokens_per_second: float = 0.0) -> None:
        """Tell the bootstrap (through the DHT, within a few seconds) how far this trainer is."""
        self._run.report_progress(step, loss, tokens_per_second)

    @property
    def microbatch_size(self) -> int | None:
        """Rows per microbatch (None: as many microbatches as stages); set it to change it."""
        return self._layers.microbatch_size

    @microbatch_size.setter
    def microbatch_size(self, rows: int | None) -> None:
        self._layers.microbatch_size = rows

    @property
    def target_batch_size(self) -> int:
        return self.manifest.target_batch_size

    @property
    def step(self) -> int:
        """The run's collaborative step as this trainer knows it (steps applied so far)."""
        return self.pipeline.step or 0

    @property
    def trainer_id(self) -> str:
        return self.pipeline.coordinator.me

    def create_optimizer(self, **overrides) -> "SwarmOptimizer":
        """AdamW over the local parameters with the run's settings, stepping with the swarm: it steps
        when a backward closed a collaborative step, summing local gradients with the other trainers
        of that step first (and keeps accumulating otherwise)."""
        optimizer = SwarmOptimizer(self, **overrides)
        self._shared.adopt_into(optimizer.optimizer)
        return optimizer

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> CausalLMOutput:
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must have shape [batch, seq], got {list(input_ids.shape)}")
        if torch.is_grad_enabled():
            self._run.admit(input_ids.shape[0])
        input_ids, attention_mask, labels, position_ids = self._on_device(input_ids, attention_mask, labels,
                                                                          position_ids)
        if position_ids is None:
            position_ids = default_position_ids(input_ids)
        hidden = self.local.embed(input_ids, position_ids)
        if torch.is_grad_enabled() and hidden.requires_grad:
            hidden = self._layers.apply(hidden, attention_mask, position_ids)
        else:
            hidden, _ = self._layers.forward(hidden, attention_mask, position_ids, train=False)
        with self._compute():
            logits = self.local.head(hidden)
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        return CausalLMOutput(logits=logits, loss=loss)

    @property
    def device(self) -> torch.device:
        """Where the local parts are (``.to(...)`` moves them, as any module)."""
        return next(self.local.parameters()).device

    def _compute(self) -> ContextManager:
        """The context the local parts compute in: the run's autocast (float16 runs keep the local
        head in float32: its backward is the caller's own, with no gradient scale of swarm's)."""
        return compute_context(self.device, self._precision)

    def _on_device(self, *tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
        """Inputs on the local parts' device (a host batch for a GPU model is moved once, here)."""
        device = self.device
        return [None if t is None else to_device(t, device) for t in tensors]

    def train_step(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``loss = model(input_ids, ...).loss; loss.backward()`` in one call: the same gradients (to
        float rounding) in the local parameters and on the stages, the same commit of the batch to the
        run's step; returns the loss, detached. ``labels`` default to ``input_ids``.

        Faster when activations go peer to peer (the default): each microbatch's loss is computed as
        soon as its output arrives and its backward starts at once, while later microbatches are still
        going forward (``RemotePipeline.train_microbatches``), where ``loss.backward()`` can only start
        once the whole batch's loss exists. ``swarm train`` trains with it."""
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must have shape [batch, seq], got {list(input_ids.shape)}")
        labels = input_ids if labels is None else labels
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels have shape {list(labels.shape)}, input_ids {list(input_ids.shape)}")
        if not torch.is_grad_enabled():
            raise RuntimeError("train_step needs gradients: it was called under torch.no_grad()")
        if not self.pipeline.push:
            loss = self(input_ids, attention_mask=attention_mask, labels=labels, position_ids=position_ids).loss
            loss.backward()
            return loss.detach()
        self._run.admit(input_ids.shape[0])
        input_ids, labels, attention_mask, position_ids = self._on_device(input_ids, labels, attention_mask,
                                                                          position_ids)
        if position_ids is None:
            position_ids = default_position_ids(input_ids)
        hidden = self.local.embed(input_ids, position_ids)
        return self._layers.train(hidden, labels, attention_mask, position_ids)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
        streamer: Any = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """transformers' ``generate`` through the swarm with a KV cache on the peers: the prompt and the
        new tokens, ``[batch, prompt + new]``. Takes ``max_new_tokens``, ``do_sample``, ``temperature``,
        ``top_k``, ``top_p``, ``eos_token_id`` and ``pad_token_id`` (defaults from the model's
        ``generation_config.json``, as transformers), a left-padded ``attention_mask`` for batches, a
        ``generator`` for sampling, and a transformers streamer (``put`` / ``end``)."""
        if streamer is not None:
            streamer.put(input_ids.cpu())
        new = []
        for tokens in self.iter_generate(input_ids, attention_mask, generator=generator, **kwargs):
            new.append(tokens)
            if streamer is not None:
                streamer.put(tokens.cpu())
        if streamer is not None:
            streamer.end()
        return torch.cat([input_ids, torch.stack(new, dim=1).to(input_ids.device)], dim=1)

    def iter_generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
        **kwargs: Any,
    ) -> Iterator[torch.Tensor]:
        """Yield the next token of every row (``[batch]``) as soon as it is chosen; arguments as
        ``generate``. The peers' sessions are closed when the iterator ends or is closed."""
        params = resolve_params(self.generation_config, **kwargs)
        length = generation_length(input_ids, attention_mask, params, self.local.config)
        session = RemoteSession(self.manifest, self.inference_client, self.pipeline.view,
                                batch_size=input_ids.shape[0], max_length=length,
                                fresh_records=functools.partial(self.pipeline.view, fresh=True))
        self.last_session = session
        try:
            self._runner.run(session.open())
            with torch.no_grad():
                yield from generate_tokens(self.local, self._runner.run, session, input_ids, attention_mask, params,
                                           generator=generator, compute=self._compute)
        finally:
            self._runner.run(session.close(), timeout=30)

    @torch.no_grad()
    def final_hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The last layer's hidden states after the final norm (transformers' ``hidden_states[-1]``),
        ``[batch, seq, hidden]``: what embeddings are pooled from. Padding (``attention_mask`` 0) is
        left padding, as for ``generate``."""
        if attention_mask is None:
            positions = default_position_ids(input_ids)
        else:  # a left-padded row gets the positions it would have alone, as in generation
            positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
        input_ids, attention_mask, positions = self._on_device(input_ids, attention_mask, positions)
        hidden, _ = self._layers.forward(self.local.embed(input_ids, positions), attention_mask, positions,
                                         train=False)
        return self.local.norm(hidden)

    def local_state(self, step: int) -> tuple[StateMeta, dict[str, torch.Tensor]]:
        """A copy of the local parts' weights (embeddings, final norm, head) as a state of ``step``."""
        return self._shared.state(step)

    def upload_local_state(self, step: int) -> int:
        """Send the local parts' weights to the run's checkpoint stores (the bootstrap), where
        ``swarm export`` finds them: only trainers hold these parameters. Returns how many stores
        took the upload (0 when they already held this step)."""
        return self._shared.upload(step, self._resource(SwarmDHT))

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the whole model as a standard HF checkpoint (config.json + model.safetensors):
        every stage's current weights from an online replica, the local parts from this trainer."""
        return self._shared.save_pretrained(directory, self._resource(SwarmDHT))

    def _resource(self, kind: type):
        for resource in self._resources:
            if isinstance(resource, kind):
                return resource
        raise RuntimeError("the model has been closed")

    def close(self) -> None:
        """Leave the swarm: stop the P2P client, the DHT process and the event loop. Idempotent."""
        self._run.stop(self._runner)
        if self._trainer_sync is not None:
            self._trainer_sync.shutdown()
            self._trainer_sync = None
        if self._resources:
            _leave_the_steps(self._runner, self.pipeline)
        _stop_resources(self._runner, self._resources)
        self._resources.clear()
        self._runner.stop()
        self._layers.close()

    def __enter__(self) -> "SwarmModelForCausalLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def dht(self) -> SwarmDHT | None:
        """The client DHT node routes are read from (trainers also publish their metrics with it)."""
        return next((r for r in self._resources if isinstance(r, SwarmDHT)), None)

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Run ``coro`` on this model's event loop without waiting for it."""
        return asyncio.run_coroutine_threadsafe(coro, self._runner.loop)


class SwarmOptimizer:
    """The trainer's optimizer for its local parameters (embeddings, final norm, head), in step with
    the swarm. ``step()`` after ``loss.backward()``: if that backward closed a collaborative step, the
    local gradients are summed with those of the step's other trainers (hivemind averaging), AdamW
    steps and ``zero_grad()`` clears them; otherwise the step is still open and both keep the
    gradients accumulating, exactly as the stages do."""

    def __init__(self, model: SwarmModelForCausalLM, **overrides):
        settings = model.manifest.optimizer
        kwargs = dict(lr=settings.lr, betas=settings.betas, eps=settings.eps, weight_decay=settings.weight_decay)
        self.model = model
        self.optimizer = torch.optim.AdamW(model.parameters(), **(kwargs | overrides))
        self._stepped = False

    def step(self) -> bool:
        """Returns whether it stepped (a collaborative step had closed)."""
        status = self.model.pipeline.last_closed
        self._stepped = status is not None
        if status is None:
            return False
        others = [t for t in status.trainers if t != self.model.trainer_id]
        if others:
            params = [p for p in self.model.parameters() if p.requires_grad]
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            try:
                summed = self._sum_with_trainers(grads, status.step, status.trainers)
            except SwarmError as e:  # the other trainer left mid-step: our own gradients still count
                logger.warning("step %d: could not sum local gradients with %d other trainer(s): %s",
                               status.step, len(others), e)
            else:
                for param, grad in zip(params, summed):
                    param.grad = grad.to(param.device)
        with self.model._shared.lock:
            self.optimizer.step()
        return True

    def _sum_with_trainers(self, grads: list[torch.Tensor], step: int, trainers: Sequence[str]) -> list[torch.Tensor]:
        model = self.model
        if model._trainer_sync is None:
            raise SwarmError("this trainer has no averager (it was not made by from_pretrained)")
        # trainers learn that a step closed at different moments (each polls the step counter), so
        # they get a wider window to meet in than the replicas a trainer calls together; the round
        # starts as soon as all of them are in (peers.training.averaging), so the window costs nothing then
        window = max(model.pipeline.policy.averaging_window, _TRAINERS_WINDOW)
        return model._trainer_sync.sum(grads, step=step, members=trainers, me=model.trainer_id,
                                       scheduled_time=get_dht_time() + window, timeout=window + 30.0)

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self._stepped:
            self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)


def _leave_the_steps(runner: LoopThread, pipeline: RemotePipeline) -> None:
    """Withdraw this trainer from the run's steps once its last commit has landed (a trainer made by
    ``from_pretrained``; nothing to withdraw otherwise)."""
    coordinator = pipeline.coordinator
    if not isinstance(coordinator, DHTCoordinator):
        return
    try:
        runner.run(pipeline.settle(timeout=10), timeout=15)  # the last commit lands before the leave
    except Exception as e:  # the loop is already gone
        logger.debug("last commit: %s", e)
    try:
        runner.run(coordinator.leave(), timeout=5)
    except Exception as e:  # leaving early is fine: the record expires anyway
        logger.debug("trainer record withdrawal: %s", e)


def _stop_resources(runner: LoopThread, resources: Sequence[Any]) -> None:
    """Stop the p2p transport and the DHT of ``resources``, last started first."""
    for resource in reversed(resources):
        if isinstance(resource, P2PTransport):
            try:
                runner.run(resource.close(), timeout=10)
            except Exception as e:  # already gone; nothing left to release
                logger.debug("p2p shutdown: %s", e)
        elif isinstance(resource, SwarmDHT):
            resource.shutdown()


def _join_run(started: contextlib.ExitStack, runner: LoopThread, run_id: str, initial_peers: Sequence[str],
              host: str | None, key: str | None, timeout: float) -> tuple[SwarmDHT, Manifest, RunAuth | None]:
    """Join the run's DHT, read its manifest, check this machine's clock against the swarm's and, on a
    keyed run, join with ``key`` (default: ``SWARM_KEY``); what it starts, ``started`` stops."""
    dht = SwarmDHT.create_client(run_id, initial_peers, host=host, client_mode=False)
    started.callback(dht.shutdown)
    manifest = runner.run(dht.wait_manifest(timeout))
    runner.run(check_clock(dht))
    auth = runner.run(RunAuth.join(dht, key or os.environ.get("SWARM_KEY")))
    if auth is not None:
        started.callback(_stop_quietly, runner, auth.stop, 10, "auth stop")
    return dht, manifest, auth


def _checked_source(model: str | None, manifest: Manifest, run_id: str) -> ModelSource:
    """``model`` (default: the manifest's), refused unless its config is the one the run trains."""
    source = resolve_model(model or manifest.model)
    if source.config_hash != manifest.config_hash:
        raise ConfigError(
            f"model {source.name!r} does not match run {run_id!r}: config hash "
            f"{source.config_hash[:12]} != {manifest.config_hash[:12]} in the manifest"
        )
    return source


def _open_transport(started: contextlib.ExitStack, runner: LoopThread, dht: SwarmDHT,
                    auth: RunAuth | None, *, channel: bool) -> tuple[P2PTransport, Transport]:
    """The p2p transport this trainer owns (``started`` shuts it down), and what it calls peers with:
    on a keyed run, the same transport presenting this trainer's token. With ``channel`` it calls
    peers over their data channels where it can dial them (``net.channel``)."""
    transport = runner.run(_p2p_transport(dht, channel))
    started.callback(_stop_quietly, runner, transport.close, 10, "p2p shutdown")
    calls = AuthedTransport(transport, auth.token_text) if auth is not None else transport
    return transport, calls


def _start_coordinator(started: contextlib.ExitStack, runner: LoopThread, dht: SwarmDHT,
                       manifest: Manifest) -> DHTCoordinator:
    """This trainer's record among the run's trainers, from step 0; ``started`` withdraws it."""
    coordinator = DHTCoordinator(dht, manifest.target_batch_size, me=dht.peer_id)
    runner.run(coordinator.start(0))
    started.callback(_stop_quietly, runner, coordinator.leave, 5, "trainer record withdrawal")
    return coordinator


def _pipeline(manifest: Manifest, calls: Transport, coordinator: DHTCoordinator, dht: SwarmDHT,
              auth: RunAuth | None, trainer: TrainerSettings, policy: FaultPolicy) -> RemotePipeline:
    """The pipeline over the run's stages, routing around banned peers and reporting the liars its
    spot checks catch."""
    # the pipeline retries and fails over
    client = StageClient(calls, timeout=trainer.timeout, attempts=1, max_abs=policy.max_abs, wire=manifest.wire)
    bans = BanList(lambda: excluded_peers(dht))
    return RemotePipeline(
        manifest,
        client,
        lambda: _unbanned_records(dht, manifest.num_stages, bans),
        coordinator=coordinator,
        policy=policy,
        route_wait=trainer.route_wait,
        push=trainer.push,
        spot_check=SpotChecker(client, rate=policy.spot_check_rate,
                               tolerance=run_tolerance(manifest.dtype, policy.spot_check_tolerance),
                               report=lambda report: report_ban(dht, _with_token(report, auth)),
                               reporter_id=dht.peer_id),
    )


def _trainer_averager(started: contextlib.ExitStack, dht: SwarmDHT, manifest: Manifest, local: LocalParts,
                      policy: FaultPolicy) -> HivemindGradientSync:
    """What sums the local parts' gradients with the other trainers' (and hands the local parts to
    trainers joining later); ``started`` shuts it down."""
    # started before any stream is open (see peers.server): sums local parts with other trainers
    trainer_sync = HivemindGradientSync(dht.dht, f"{manifest.run_id}_trainers".replace(".", "_"),
                                        [p for p in local.parameters() if p.requires_grad],
                                        window=policy.averaging_window)
    started.callback(trainer_sync.shutdown)
    return trainer_sync


async def _p2p_transport(dht: SwarmDHT, channel: bool) -> P2PTransport:
    transport = P2PTransport(await dht.dht.replicate_p2p(), addresses=dht.relayed)
    if channel:
        transport.use_channel(Identity(dht.peer_id, dht.signing_key))
    return transport


async def _unbanned_records(dht: SwarmDHT, num_stages: int, bans: BanList) -> dict[int, list[PeerRecord]]:
    """The stage records a trainer routes over: every peer but those banned (``dht.bans.excluded_peers``)."""
    return await without_banned(await dht.all_records(num_stages), bans)


def _with_token(report: BanReport, auth: RunAuth | None) -> BanReport:
    """Keyed runs accept a ban report only with its reporter's access token (``dht.auth``)."""
    return report if auth is None else report.model_copy(update={"access_token": auth.token_text()})


_NOT_THE_MODELS = {"checkpoint_every": "the training loop's (swarm.train)"}
"""``TrainerSettings`` fields that a model does not use, and whose they are."""


def _trainer_config(overrides: dict[str, Any], policy: FaultPolicy | None) -> tuple[TrainerSettings, FaultPolicy]:
    """``from_pretrained``'s keyword settings validated by ``TrainerSettings``, and the fault policy:
    ``policy`` as given, else the one those settings configure."""
    for name, whose in _NOT_THE_MODELS.items():
        if name in overrides:
            raise ConfigError(f"setting trainer.{name} is {whose}, not the model's: from_pretrained does not take it")
    trainer = trainer_settings(**overrides)
    if policy is None:
        return trainer, FaultPolicy.from_settings(trainer)
    both = sorted(set(POLICY_SETTINGS.values()) & set(overrides))
    if both:
        raise ConfigError(f"setting trainer.{both[0]} is given both as a keyword and by policy=; give it once")
    return trainer, policy


def _stop_quietly(runner: LoopThread, stop: Callable[[], Coroutine[Any, Any, Any]], timeout: float,
                  what: str) -> None:
    """Run ``stop()`` on ``runner`` while unwinding a failed ``from_pretrained``: a part that cannot
    be stopped (the loop or the daemon is gone already) must not hide why the start failed."""
    try:
        runner.run(stop(), timeout=timeout)
    except Exception as e:  # nothing left to release there
        logger.debug("%s: %s", what, e)
