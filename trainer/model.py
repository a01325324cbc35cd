"""``SwarmModelForCausalLM``: a torch ``nn.Module`` whose transformer layers live on the swarm.

Embeddings, the final norm and the LM head are local parameters (so any loss and any local optimizer
work as usual); the layers in between are computed by the peers of the route, forward and backward,
through a custom autograd function. Each backward pass commits its sequences to the run's
collaborative step; when the trainers' commits reach ``target_batch_size`` the step closes and the
stages apply it (their replicas averaging gradients) before ``backward`` returns. A lone trainer whose
batch has that many rows therefore steps in lockstep with the stages: ``loss.backward();
optimizer.step()``. Several trainers (data parallel) use ``model.create_optimizer()``, which also sums
their local gradients with hivemind averaging, so their embeddings and head stay equal.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Coroutine, Iterator, Sequence, TypeVar

import torch
from torch import nn
from transformers import GenerationConfig, PretrainedConfig

from hivemind.utils import get_dht_time

from dht.schemas import BanReport
from dht.bans import banned_peers, report_ban
from dht.clock import check_clock
from dht.schemas import MetricsReport, RunState
from dht.records import SwarmDHT
from dht.schemas import Manifest, PeerRecord
from net.auth import AuthedTransport, RunAuth
from peers.training.averaging import HivemindGradientSync
from peers.training.client import StageClient
from peers.state.snapshot import StateIdentity, StateMeta, apply_state, capture_state, check_state, parameters_of
from peers.state.store_client import StoreClient
from peers.inference.client import InferenceClient
from peers.telemetry.runcontrol import RunWatcher
from net.transport import P2PTransport
from shards.local import (LocalParts, causal_lm_loss, causal_lm_loss_part, default_position_ids, labelled_tokens,
                          load_local_parts)
from shards.schedule import microbatch_rows
from shards.source import ModelSource, resolve_model
from core.loop import LoopThread
from core.config import TrainerSettings, trainer_settings
from core.errors import ConfigError, RunStopped, StateMismatch, SwarmError
from trainer.faults import POLICY_SETTINGS
from trainer.pipeline import FaultPolicy, RemotePipeline, Trace
from trainer.spotcheck import BanList, SpotChecker, without_banned
from trainer.steps import DHTCoordinator
from trainer.generation import RemoteSession, generate_tokens, max_positions, resolve_params

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


class _RemoteStages(torch.autograd.Function):
    """Autograd bridge: forward runs the remote stages, backward sends gradients back through them."""

    @staticmethod
    def forward(ctx, hidden, model, mask, positions):  # type: ignore[override]
        outputs, traces = model._run_remote(hidden, mask, positions, train=True)
        ctx.model, ctx.traces = model, traces
        return outputs

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        return ctx.model._backward_remote(ctx.traces, grad_output), None, None, None


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
    ):
        super().__init__()
        self.local = local
        self.pipeline = pipeline
        self.manifest: Manifest = pipeline.manifest
        self.microbatch_size = microbatch_size
        self.source: ModelSource | None = None
        self._runner = runner
        self._resources = list(resources)
        self._trainer_sync = trainer_sync
        self._watcher: RunWatcher | None = None
        self._progress: dict = {"step": 0, "loss": None, "tokens_per_second": 0.0}
        self._samples = 0
        self._auth: RunAuth | None = None
        self._optimizer: SwarmOptimizer | None = None
        self._local_lock = threading.Lock()  # a copy of the local parts is never taken mid-update
        self._adopted: tuple[StateMeta, dict[str, torch.Tensor]] | None = None  # local parts taken at join
        self.inference_client = InferenceClient(pipeline.client.transport, timeout=pipeline.client.timeout)
        self.generation_config = generation_defaults(None, local.config)
        self.last_session: RemoteSession | None = None
        self._head_thread: concurrent.futures.ThreadPoolExecutor | None = None  # train_step's local loss

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
        defaulted there: ``timeout`` bounds one stage call (a peer that hangs longer is routed around),
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
        with contextlib.ExitStack() as started:
            runner = LoopThread("swarm-trainer")
            started.callback(runner.stop)
            dht = SwarmDHT.create_client(run_id, initial_peers, host=host, client_mode=False)
            started.callback(dht.shutdown)
            manifest = runner.run(dht.wait_manifest(trainer.timeout))
            runner.run(check_clock(dht))
            auth = runner.run(RunAuth.join(dht, key or os.environ.get("SWARM_KEY")))
            if auth is not None:
                started.callback(_stop_quietly, runner, auth.stop, 10, "auth stop")
            source = resolve_model(model or manifest.model)
            if source.config_hash != manifest.config_hash:
                raise ConfigError(
                    f"model {source.name!r} does not match run {run_id!r}: config hash "
                    f"{source.config_hash[:12]} != {manifest.config_hash[:12]} in the manifest"
                )
            local = load_local_parts(source, dtype=getattr(torch, manifest.dtype))
            transport = runner.run(_p2p_transport(dht))
            started.callback(_stop_quietly, runner, transport.p2p.shutdown, 10, "p2p shutdown")
            calls = AuthedTransport(transport, auth.token_text) if auth is not None else transport
            coordinator = DHTCoordinator(dht, manifest.target_batch_size, me=dht.peer_id)
            runner.run(coordinator.start(0))
            started.callback(_stop_quietly, runner, coordinator.leave, 5, "trainer record withdrawal")
            # the pipeline retries and fails over
            client = StageClient(calls, timeout=trainer.timeout, attempts=1, max_abs=policy.max_abs,
                                 wire=manifest.wire)
            bans = BanList(lambda: banned_peers(dht))
            pipeline = RemotePipeline(
                manifest,
                client,
                lambda: _unbanned_records(dht, manifest.num_stages, bans),
                coordinator=coordinator,
                policy=policy,
                route_wait=trainer.route_wait,
                push=trainer.push,
                spot_check=SpotChecker(client, rate=policy.spot_check_rate, tolerance=policy.spot_check_tolerance,
                                       report=lambda report: report_ban(dht, _with_token(report, auth)),
                                       reporter_id=dht.peer_id),
            )
            # started before any stream is open (see peers.server): sums local parts with other trainers
            trainer_sync = HivemindGradientSync(dht.dht, f"{manifest.run_id}_trainers".replace(".", "_"),
                                                [p for p in local.parameters() if p.requires_grad],
                                                window=policy.averaging_window)
            started.callback(trainer_sync.shutdown)
            model = cls(local, pipeline, runner, microbatch_size=trainer.microbatch_size,
                        resources=[transport, dht], trainer_sync=trainer_sync)
            started.pop_all()  # from here the model owns all of it: its close() stops it
            started.callback(model.close)
            model._auth = auth
            model.source = source
            model.generation_config = generation_defaults(source.root, local.config)
            runner.run(model._watch(dht))
            model._catch_up(dht)
            started.pop_all()
        return model

    def _catch_up(self, dht: SwarmDHT, attempts: int = 3) -> None:
        """A trainer joining a run that other trainers already train takes their current local parts
        (embeddings, final norm, head, and AdamW's state of them) before its first batch: from then on
        it sums the same gradients into the same weights. Then it shares its own with later joiners."""
        others = [r for r in self._runner.run(dht.trainer_records()) if r.online and r.trainer_id != self.trainer_id]
        for _ in range(attempts if others else 0):
            got = self._trainer_sync.load_state(timeout=60.0)
            if got is None:
                logger.warning("no other trainer handed over the local parts: starting from the model files "
                               "(this trainer's embeddings and head will differ from theirs)")
                break
            meta = self._take_local_parts(*got)
            run_step = max((r.step for r in self._runner.run(dht.trainer_records()) if r.online), default=0)
            logger.info("took the local parts of step %d from another trainer (the run is at step %d)",
                        meta.step, run_step)
            if meta.step >= run_step:
                break
        if self._adopted is not None:  # the others wait for this trainer's batches from this step on
            self._runner.run(self.pipeline.coordinator.start(self.pipeline.step))
        self._trainer_sync.share_state(self._shared_local_parts)

    def _take_local_parts(self, metadata: Any, tensors: list[torch.Tensor]) -> StateMeta:
        if not isinstance(metadata, dict) or not isinstance(metadata.get("names"), list):
            raise StateMismatch(f"another trainer's local parts came with unreadable metadata: {metadata!r:.200}")
        meta = StateMeta.model_validate(metadata.get("meta"))
        named = dict(zip(metadata["names"], tensors))
        identity = StateIdentity(run_id=self.manifest.run_id, config_hash=self.manifest.config_hash)
        check_state(meta, named, self.local, identity=identity, stage=None, layers=None, need_optimizer=False)
        with torch.no_grad(), self._local_lock:
            for name, param in parameters_of(self.local).items():
                param.copy_(named[f"param/{name}"])
        self._adopted = (meta, named)
        self.pipeline.step = max(self.pipeline.step or 0, meta.step)
        return meta

    def _shared_local_parts(self) -> tuple[dict, list[torch.Tensor]]:
        """What a trainer joining later downloads (through hivemind's state sharing): the local parts
        and their AdamW state, as of the step this trainer is at."""
        identity = StateIdentity(run_id=self.manifest.run_id, config_hash=self.manifest.config_hash)
        optimizer = self._optimizer.optimizer if self._optimizer is not None else None
        with self._local_lock:
            meta, tensors = capture_state(self.local, optimizer, identity=identity, step=self.pipeline.step or 0)
        names = list(tensors)
        return {"meta": meta.model_dump(mode="json"), "names": names}, [tensors[n] for n in names]

    async def _watch(self, dht: SwarmDHT) -> None:
        """Follow the run state (pause/stop) and publish this trainer's progress; the first read is
        done now so that a trainer joining a paused run waits from its first step."""
        self._watcher = RunWatcher(dht, self._metrics_report,
                                   on_control=self._auth.follow if self._auth is not None else None)
        if self._auth is not None:
            self._auth.start()
        try:
            await self._watcher.poll_once()
        except Exception as e:  # no control record reachable yet: the run counts as running
            logger.debug("first run-state read failed: %s", e)
        self._watcher.start()

    @property
    def run_auth(self) -> RunAuth | None:
        """This client's membership of a keyed run (its token, the run's revocations); None if open."""
        return self._auth

    @property
    def loop(self) -> LoopThread:
        """The event-loop thread this client's network calls run on."""
        return self._runner

    @property
    def run_state(self) -> RunState:
        return self._watcher.state if self._watcher is not None else RunState.RUNNING

    def wait_while_paused(self, on_pause: Callable[[], None] | None = None, poll: float = 0.5) -> None:
        """Block while the run owner has the run paused (say so once); ``RunStopped`` if stopped."""
        said = False
        while self.run_state == RunState.PAUSED:
            if not said:
                logger.warning("the run is paused by its owner: waiting for `swarm run resume`")
                if on_pause is not None:
                    on_pause()
                said = True
            time.sleep(poll)
        if self.run_state == RunState.STOPPED:
            raise RunStopped("the run owner stopped the run")
        if said:
            logger.warning("the run was resumed")

    def report_progress(self, step: int, loss: float | None = None, tokens_per_second: float = 0.0) -> None:
        """Tell the bootstrap (through the DHT, within a few seconds) how far this trainer is."""
        self._progress = {"step": step, "loss": loss, "tokens_per_second": tokens_per_second}

    def _metrics_report(self) -> MetricsReport | None:
        if self._watcher is None:
            return None
        token = self._auth.token if self._auth is not None else None
        return MetricsReport(peer_id=self._watcher.dht.peer_id, role="trainer", samples=self._samples,
                             access_token=token, **self._progress)

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
        if self._adopted is not None and self._adopted[0].with_optimizer:
            meta, named = self._adopted
            identity = StateIdentity(run_id=self.manifest.run_id, config_hash=self.manifest.config_hash)
            with self._local_lock:
                apply_state(self.local, optimizer.optimizer, meta, named, identity=identity)
        self._optimizer = optimizer
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
            self.wait_while_paused()
            self._samples += input_ids.shape[0]
        if position_ids is None:
            position_ids = default_position_ids(input_ids)
        hidden = self.local.embed(input_ids, position_ids)
        if torch.is_grad_enabled() and hidden.requires_grad:
            hidden = _RemoteStages.apply(hidden, self, attention_mask, position_ids)
        else:
            hidden, _ = self._run_remote(hidden, attention_mask, position_ids, train=False)
        logits = self.local.head(hidden)
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        return CausalLMOutput(logits=logits, loss=loss)

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
        self.wait_while_paused()
        self._samples += input_ids.shape[0]
        if position_ids is None:
            position_ids = default_position_ids(input_ids)
        hidden = self.local.embed(input_ids, position_ids)
        rows = self._microbatches(input_ids.shape[0])
        count = labelled_tokens(labels)
        parts = [(hidden[r].detach(), attention_mask[r] if attention_mask is not None else None, position_ids[r])
                 for r in rows]
        losses: list[torch.Tensor] = [torch.zeros(())] * len(rows)

        def head(m: int, output: torch.Tensor) -> torch.Tensor:
            output = output.detach().requires_grad_()
            part = causal_lm_loss_part(self.local.head(output), labels[rows[m]], count)
            part.backward()
            losses[m] = part.detach()
            return output.grad

        if self._head_thread is None:  # one thread: the head's gradients accumulate one part at a time
            self._head_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="swarm-head")
        thread = self._head_thread

        async def loss(m: int, output: torch.Tensor) -> torch.Tensor:
            return await asyncio.get_running_loop().run_in_executor(thread, head, m, output)

        grads = self._runner.run(self.pipeline.train_microbatches(parts, loss))
        grad_hidden = torch.empty_like(hidden)
        for r, grad in zip(rows, grads):
            grad_hidden[r] = grad
        if hidden.requires_grad:
            hidden.backward(grad_hidden)
        self._runner.run(self.pipeline.commit(input_ids.shape[0]))
        return torch.stack(losses).sum()

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
        return torch.cat([input_ids, torch.stack(new, dim=1)], dim=1)

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
        if input_ids.ndim != 2 or input_ids.shape[1] == 0:
            raise ConfigError(f"input_ids must have shape [batch, seq] with seq >= 1, got {list(input_ids.shape)}")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ConfigError(f"attention_mask has shape {list(attention_mask.shape)}, input_ids {list(input_ids.shape)}")
        length = input_ids.shape[1] + params.max_new_tokens
        if length > max_positions(self.local.config):
            raise ConfigError(f"{input_ids.shape[1]} prompt tokens + {params.max_new_tokens} new tokens exceed the "
                              f"model's {max_positions(self.local.config)} positions")
        session = RemoteSession(self.manifest, self.inference_client, self.pipeline.records,
                                batch_size=input_ids.shape[0], max_length=length)
        self.last_session = session
        try:
            self._runner.run(session.open())
            with torch.no_grad():
                yield from generate_tokens(self.local, self._runner.run, session, input_ids, attention_mask, params,
                                           generator=generator)
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
        hidden, _ = self._run_remote(self.local.embed(input_ids, positions), attention_mask, positions, train=False)
        return self.local.norm(hidden)

    def _microbatches(self, batch: int) -> list[slice]:
        return microbatch_rows(batch, self.manifest.num_stages, self.microbatch_size)

    def _run_remote(self, hidden, mask, positions, *, train: bool) -> tuple[torch.Tensor, list[Trace]]:
        batches = self._microbatches(hidden.shape[0])

        def forward(indices: list[int]) -> list[tuple[torch.Tensor, Trace]]:
            parts = [(hidden[batches[i]].detach(), mask[batches[i]] if mask is not None else None,
                      positions[batches[i]]) for i in indices]
            return self._runner.run(self.pipeline.forward_microbatches(parts, train=train))

        done = forward(list(range(len(batches))))
        for _ in range(3):  # bounded: a recompute may meet (and catch) another liar
            tainted = self.pipeline.tainted([trace for _, trace in done])  # through a peer caught later on
            if not tainted:
                break
            for i, redone in zip(tainted, forward(tainted)):
                done[i] = redone
        return torch.cat([out for out, _ in done], dim=0), [trace for _, trace in done]

    def _backward_remote(self, traces: list[Trace], grad_output: torch.Tensor) -> torch.Tensor:
        grads = [grad_output[rows].contiguous() for rows in self._microbatches(grad_output.shape[0])]
        grad_inputs = self._runner.run(self.pipeline.backward_microbatches(traces, grads))
        self._runner.run(self.pipeline.commit(grad_output.shape[0]))
        return torch.cat(grad_inputs, dim=0)

    def _sum_with_trainers(self, grads: list[torch.Tensor], step: int, trainers: Sequence[str]) -> list[torch.Tensor]:
        if self._trainer_sync is None:
            raise SwarmError("this trainer has no averager (it was not made by from_pretrained)")
        # trainers learn that a step closed at different moments (each polls the step counter), so
        # they get a wider window to meet in than the replicas a trainer calls together; the round
        # starts as soon as all of them are in (peers.training.averaging), so the window costs nothing then
        window = max(self.pipeline.policy.averaging_window, _TRAINERS_WINDOW)
        return self._trainer_sync.sum(grads, step=step, members=trainers, me=self.trainer_id,
                                      scheduled_time=get_dht_time() + window, timeout=window + 30.0)

    def local_state(self, step: int) -> tuple[StateMeta, dict[str, torch.Tensor]]:
        """A copy of the local parts' weights (embeddings, final norm, head) as a state of ``step``."""
        identity = StateIdentity(run_id=self.manifest.run_id, config_hash=self.manifest.config_hash)
        return capture_state(self.local, None, identity=identity, step=step)

    def upload_local_state(self, step: int) -> int:
        """Send the local parts' weights to the run's checkpoint stores (the bootstrap), where
        ``swarm export`` finds them: only trainers hold these parameters. Returns how many stores
        took the upload (0 when they already held this step)."""
        meta, tensors = self.local_state(step)
        return self._runner.run(self._store().put(meta, tensors))

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the whole model as a standard HF checkpoint (config.json + model.safetensors):
        every stage's current weights from an online replica, the local parts from this trainer."""
        from trainer.export import gather_stage, weights_of, write_checkpoint

        dht, store = self._resource(SwarmDHT), self._store()
        stages = []
        for stage in range(self.manifest.num_stages):
            records = self._runner.run(dht.stage_records(stage))
            weights, where = self._runner.run(gather_stage(self.manifest, stage, records, self.pipeline.client, store))
            logger.info("stage %d weights from %s", stage, where)
            stages.append(weights)
        source = resolve_model(self.manifest.model)
        return write_checkpoint(self.manifest, source, stages, weights_of(*self.local_state(0)), Path(directory))

    def _store(self) -> StoreClient:
        # the pipeline's transport: on a keyed run it presents this trainer's token (the store is gated)
        return StoreClient(self.pipeline.client.transport, self._resource(SwarmDHT).stores)

    def _resource(self, kind: type):
        for resource in self._resources:
            if isinstance(resource, kind):
                return resource
        raise RuntimeError("the model has been closed")

    def close(self) -> None:
        """Leave the swarm: stop the P2P client, the DHT process and the event loop. Idempotent."""
        if self._watcher is not None:
            try:
                self._runner.run(self._watcher.stop(), timeout=10)
            except Exception as e:  # the loop is already gone
                logger.debug("run watcher stop: %s", e)
            self._watcher = None
        if self._auth is not None:
            try:
                self._runner.run(self._auth.stop(), timeout=10)
            except Exception as e:  # the loop is already gone
                logger.debug("auth stop: %s", e)
            self._auth = None
        if self._trainer_sync is not None:
            self._trainer_sync.shutdown()
            self._trainer_sync = None
        coordinator = self.pipeline.coordinator
        if self._resources and isinstance(coordinator, DHTCoordinator):
            try:
                self._runner.run(self.pipeline.settle(timeout=10), timeout=15)  # the last commit lands before the leave
            except Exception as e:  # the loop is already gone
                logger.debug("last commit: %s", e)
            try:
                self._runner.run(coordinator.leave(), timeout=5)
            except Exception as e:  # leaving early is fine: the record expires anyway
                logger.debug("trainer record withdrawal: %s", e)
        for resource in reversed(self._resources):
            if isinstance(resource, P2PTransport):
                try:
                    self._runner.run(resource.p2p.shutdown(), timeout=10)
                except Exception as e:  # already gone; nothing left to release
                    logger.debug("p2p shutdown: %s", e)
            elif isinstance(resource, SwarmDHT):
                resource.shutdown()
        self._resources.clear()
        self._runner.stop()
        if self._head_thread is not None:
            self._head_thread.shutdown(wait=True)
            self._head_thread = None

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
                summed = self.model._sum_with_trainers(grads, status.step, status.trainers)
            except SwarmError as e:  # the other trainer left mid-step: our own gradients still count
                logger.warning("step %d: could not sum local gradients with %d other trainer(s): %s",
                               status.step, len(others), e)
            else:
                for param, grad in zip(params, summed):
                    param.grad = grad
        with self.model._local_lock:
            self.optimizer.step()
        return True

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self._stepped:
            self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)


def generation_defaults(root: Path | None, config: PretrainedConfig) -> GenerationConfig:
    """The model's ``generation_config.json`` when it has one, else what transformers derives from its
    config: where ``generate`` takes the end-of-sequence and padding tokens from, as transformers does."""
    if root is not None and (root / "generation_config.json").is_file():
        return GenerationConfig.from_pretrained(root)
    return GenerationConfig.from_model_config(config)


async def _p2p_transport(dht: SwarmDHT) -> P2PTransport:
    return P2PTransport(await dht.dht.replicate_p2p())


async def _unbanned_records(dht: SwarmDHT, num_stages: int, bans: BanList) -> dict[int, list[PeerRecord]]:
    """The stage records a trainer routes over: every peer but those reported (``dht.bans``)."""
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
