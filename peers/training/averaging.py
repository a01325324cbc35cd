"""Summing gradients across the replicas of a stage (or across trainers) for one collaborative step.

``GradientSync`` is the small interface the executor and the trainer use; ``HivemindGradientSync`` does
it with hivemind's ``DecentralizedAverager`` (matchmaking in the DHT, then butterfly all-reduce over
libp2p: one averaging group per stage, group key prefix ``{run}_stage{i}``), and ``LocalGradientSync``
is the in-process fake for unit tests.

The result is the SUM of the members' gradients, identical on every member (each part of the
all-reduce is reduced by one peer and sent to all), so replicas that held the same parameters and
optimizer state before the step hold the same ones after it. The sum is robust to one poisoning
member: each part is reduced with ``peers.training.sanity.robust_mean`` (a non-finite contribution counts as
zero, each one is clipped to ``clip`` x the lower median norm) instead of hivemind's plain mean. The members are named by the caller:
a round whose group is not exactly those peers at exactly that step is refused (``AveragingFailed``)
and nothing is applied, because a replica that averaged with a different group would drift.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import stat
import threading
import time
from typing import Any, AsyncIterator, Callable, Protocol, Sequence

import hivemind
import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.allreduce import AllReduceRunner, AllreduceException
from hivemind.averaging.control import StepControl
from hivemind.averaging.matchmaking import Matchmaking
from hivemind.averaging.partition import DEFAULT_PART_SIZE_BYTES, TensorPartReducer
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.dht import DHT
from hivemind.p2p import P2P, P2PContext
from hivemind.proto import averaging_pb2
from hivemind.utils import MPFuture, get_dht_time
from hivemind.utils.asyncio import _AsyncContextWrapper, as_aiter, attach_event_on_finished, azip, enter_asynchronously

from dht.calls import Calls, unbind_idle
from peers.training.sanity import AVERAGING_CLIP, robust_mean
from core.errors import AveragingFailed

__all__ = ["GradientSync", "HivemindGradientSync", "LocalGradientSync"]

logger = logging.getLogger(__name__)


class GradientSync(Protocol):
    def sum(self, grads: Sequence[torch.Tensor], *, step: int, members: Sequence[str], me: str,
            scheduled_time: float, timeout: float) -> list[torch.Tensor]:
        """Sum ``grads`` over ``members`` (``me`` among them) for ``step``; blocks until done."""
        ...

    def abort(self, step: int, members: Sequence[str]) -> bool:
        """Give up the round of ``step`` with ``members``: a ``sum`` of it waiting now fails
        (``AveragingFailed``) at once, one that starts later fails when it starts. True if one waited."""
        ...

    def shutdown(self) -> None: ...


# One averager process is forked at a time per process: a child forked while another thread of the
# parent is half-way through starting an averager inherits that thread's locks held, and hangs (seen
# with several replicas in one process, as in tests, all starting their averager for the same step).
_FORK_LOCK = threading.Lock()


class _Averager(DecentralizedAverager):
    """hivemind's averager, served either on a thread of the caller's process (``in_process``, the
    default: one process fewer per peer) or in hivemind's child process, which also dies when its
    parent does (hivemind has no parent-death handling: a SIGKILLed peer would otherwise leave it running).

    In the caller's process, hivemind's control pipe is replaced by ``dht.calls.Calls``, which hands each call's
    arguments to the averager's event loop by reference: a pipe pickles them, and an ``MPFuture``
    unpickled in its own origin process is a copy whose result never reaches the caller's future.

    hivemind's ``run_in_background`` sets SIGINT to "ignore" in the *parent* (and for good: Ctrl+C would
    no longer stop a peer) and only works from the main thread; a replica starts its averager from its
    compute thread, lazily, mid-training. Here only a child ignores SIGINT: its parent stops it."""

    state_provider: Callable[[], tuple[Any, list[torch.Tensor]]] | None = None
    _running_step: Any = None  # the StepControl of the round running now (rounds never overlap)

    def __init__(self, like: Sequence[torch.Tensor], *args: Any, in_process: bool, clip: float,
                 fault: str | None, **kwargs: Any):
        """``like``: tensors of the shapes and dtypes to average (their values are not used)."""
        shapes = [(t.shape, t.dtype) for t in like]
        if in_process:  # hivemind would copy its buffers into shared memory, every page touched: the
            # stage's weights over again for an idle peer. It gets stand-ins of the same schema, views
            # of one shared value (one fd, not one per tensor), and the buffers below are touched only
            # when the first gradients are put in
            one = {dtype: torch.zeros((), dtype=dtype).share_memory_() for _, dtype in shapes}
            averaged_tensors = [one[dtype].expand(shape) for shape, dtype in shapes]
        else:
            averaged_tensors = [torch.zeros(shape, dtype=dtype) for shape, dtype in shapes]
        super().__init__(averaged_tensors, *args, **kwargs)
        if in_process:
            self._averaged_tensors = tuple(torch.empty(shape, dtype=dtype) for shape, dtype in shapes)
        self.clip = clip
        self.fault = fault  # test-only, see _RobustRunner.__init__; the first round's runner takes it
        # the round whose whole result the averaged tensors hold now (``_key``), 0 for none; shared
        # with the parent, which clears it when it puts the next gradients in
        self.held = multiprocessing.RawValue("q", 0)
        self._partial: list[int] = []  # the last rounds that came back partial here (in the averager only)
        self._calls: Calls | None = None
        self._thread: threading.Thread | None = None
        self._stopped: asyncio.Event | None = None
        if in_process:
            self._inner_pipe.send(("_SHUTDOWN", None))  # ends hivemind's state fetcher thread on the pipe
            self._calls = Calls(f"the averager {self.prefix}")
            self._inner_pipe = self._outer_pipe = self._calls
            unbind_idle(self._ready)

    def get_current_state(self) -> tuple[Any, Sequence[torch.Tensor], None]:
        """What another member downloads with ``load_state_from_peers`` (called by hivemind in this,
        the host, process): the provider's (metadata, tensors); nothing without a provider."""
        provider = self.state_provider
        if provider is None:
            return None, [], None
        metadata, tensors = provider()
        return metadata, tensors, None

    async def _get_current_state_from_host_process(self) -> tuple[bytes, tuple[torch.Tensor, ...], None]:
        """What ``rpc_download_state`` sends: in the caller's process, ``get_current_state`` off the
        event loop (a provider may wait for the compute thread), in the form hivemind's fetcher
        thread gives it over the pipe."""
        if self._calls is None:
            return await super()._get_current_state_from_host_process()
        metadata, tensors, infos = await asyncio.get_running_loop().run_in_executor(None, self.get_current_state)
        return self.serializer.dumps(metadata), tuple(t.cpu().detach() for t in tensors), infos

    def start_round(self, gather: Any, *, scheduled_time: float, timeout: float) -> StepControl:
        """Start one round (hivemind's ``step(wait=False)``); its control. In the caller's process the
        averager attaches its trigger and cancel futures to this very control (hivemind's ``step``
        attaches them again, to a copy in a child, and would fail the assertion that they are new)."""
        if self._calls is None:
            return self.step(gather=gather, scheduled_time=scheduled_time, weight=1.0, timeout=timeout,
                             allow_retries=True, wait=False)
        if self._calls.closed:  # before a control exists: hivemind complains of one deleted untriggered
            raise AveragingFailed(f"{self.prefix}: the averager is shut down; no round started")
        data = self.serializer.dumps([self.bandwidth, self.mode.value, self.serializer.dumps(gather)])
        control = StepControl(scheduled_time=scheduled_time, deadline=get_dht_time() + timeout, allow_retries=True,
                              weight=1.0, data_for_gather=data)
        attached = MPFuture()
        try:
            self._calls.send(("_step", [], dict(step=control, future_for_init=attached)))
            attached.result(timeout=timeout)
        except (RuntimeError, concurrent.futures.TimeoutError) as e:  # shut down, or stopping: never started
            raise AveragingFailed(f"{self.prefix}: the averager did not start the round: {e or 'timed out'}") from None
        control.allow_allreduce()
        return control

    async def _step(self, *, step: Any, future_for_init: Any) -> None:
        """In the averager, per round: a round whose members are known (``members`` in its
        gather data) is complete, and starts, as soon as all of them have joined, instead of when the
        matchmaking window ends. So the window costs nothing when everyone is on time, and members
        who learn of the round at different moments (trainers polling the step) still meet in one
        group as long as they arrive within it. Rounds of one averager never overlap."""
        self._matchmaking.target_group_size = _round_size(self.serializer, step.data_for_gather)
        self._running_step = step
        try:
            await super()._step(step=step, future_for_init=future_for_init)
        finally:
            self._running_step = None

    async def _run_allreduce_inplace_(self, tensors: Sequence[torch.Tensor], group_info: Any,
                                      group_id: bytes | None = None, **kwargs: Any) -> None:
        """hivemind's all-reduce (its ``_run_allreduce_inplace_``, for a member that is not auxiliary)
        with ``_RobustRunner``, refused when it ended with part of the result missing.

        hivemind finishes a round in which a stream to or from another member broke (libp2p on
        loopback loses about one stream in a thousand here) with what it has: the parts that did not
        come back are this member's own values, and a part reduced without a member's contribution
        lacks it. Only a warning says so ("Averaging: received 83.5% results"), and a replica that
        applied such a sum drifts from the others for good (the soak benchmark caught two honest
        replicas disagreeing in spot checks). Here such a round fails without hivemind's retry (the
        tensors were partly overwritten): the caller applies nothing, and the trainer sorts out who
        applied the step (``RemotePipeline.apply``)."""
        group_id = group_info.group_id if group_id is None else group_id
        runner = _RobustRunner(p2p=self._p2p, servicer_type=type(self), prefix=self.prefix, tensors=tensors,
                               group_id=group_id, ordered_peer_ids=group_info.peer_ids, clip=self.clip,
                               fault=self.fault, **kwargs)
        self.fault = None
        self._running_groups[group_id].set_result(runner)
        async for tensor, update in azip(as_aiter(*tensors), runner):
            tensor.add_(update, alpha=self._averaging_alpha)
        self.last_updated = get_dht_time()
        self._state_updated.set()
        missing = runner.missing()
        if missing is not None:
            self._partial = [*self._partial, _key(group_id)][-8:]
            others = [p for p in group_info.peer_ids if p != self.peer_id]
            donor = await self._fetch_whole(tensors, group_id, others)
            if donor is not None:
                logger.warning("averaging: this member's result was partial (%s); took the whole one from %s",
                               missing, donor)
                missing = None
        if missing is None:
            self.held.value = _key(group_id)
        else:
            logger.warning("averaging: the all-reduce lost part of this member's result and no member had it "
                           "whole: %s", missing)
            error = AllreduceException(f"the all-reduce lost part of its result: {missing}")
            step = self._running_step
            if step is not None and not step.done():
                step.set_exception(error)  # before raising: hivemind would retry on half-overwritten tensors
            raise error

    async def _fetch_whole(self, tensors: Sequence[torch.Tensor], group_id: bytes, others: Sequence[Any]) -> Any:
        """Overwrite ``tensors`` with the whole result of round ``group_id`` that another member holds;
        that member, or None when none had it whole (bounded: ``_FETCH_WAIT`` per member)."""
        total = sum(t.numel() for t in tensors)
        for peer in others:
            try:
                replies = await self.get_stub(self._p2p, peer, namespace=self.prefix).rpc_fetch_result(
                    averaging_pb2.AveragingData(group_id=group_id))
                try:
                    got = await asyncio.wait_for(_receive_into(replies, tensors, total), _FETCH_WAIT + 10)
                finally:
                    await replies.aclose()
            except Exception as e:  # that member is gone or broke off: the next one may have it
                logger.debug("fetching the result of a round from %s failed: %r", peer, e)
                continue
            if got:
                return peer
        return None

    async def rpc_fetch_result(self, request: averaging_pb2.AveragingData,
                               context: P2PContext) -> AsyncIterator[averaging_pb2.AveragingData]:
        """This member's whole result of round ``request.group_id`` (the averaged tensors, in parts of
        hivemind's part size), for a member of that round whose own result came back partial; a
        ``BAD_GROUP_ID`` when it has none (its own was partial too, or it moved on). Waits (bounded) for
        this member's own round to end first."""
        key = _key(request.group_id)
        deadline = time.monotonic() + _FETCH_WAIT
        while self.held.value != key and key not in self._partial and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        parts = None
        if self.held.value == key:  # (never wait for the tensors otherwise: a partial member holds them
            async with enter_asynchronously(self.get_tensors()) as tensors:  # while it fetches elsewhere)
                if self.held.value == key:  # a copy: the lock is not held while the caller reads
                    parts = [part.clone() for part in _parts(tensors)]
        for part in parts or []:
            yield averaging_pb2.AveragingData(code=averaging_pb2.AVERAGED_PART, tensor_part=serialize_torch_tensor(part))
        if parts is None:
            yield averaging_pb2.AveragingData(code=averaging_pb2.BAD_GROUP_ID)
        await _linger()  # the caller closes first (see _RobustRunner.rpc_aggregate_part)

    def run_in_background(self, await_ready: bool = True, timeout: float | None = None) -> None:
        if self._calls is None:
            self.start()
        else:
            self._thread = threading.Thread(target=self._calls.serve_on_thread, args=(self._serve, self._close),
                                            name=f"averager-{self.prefix}", daemon=True)
            self._thread.start()
        if await_ready:
            self.wait_until_ready(timeout)

    def is_alive(self) -> bool:
        if self._calls is None:
            return super().is_alive()
        return self._thread is not None and self._thread.is_alive()

    def shutdown(self) -> None:
        """Stop serving: hivemind's shutdown for a child; in the caller's process, ``_shutdown`` on the
        averager's loop (its handlers removed, running rounds cancelled, bounded by ``shutdown_timeout``),
        then its tasks cancelled and its libp2p client closed before the thread ends."""
        if self._calls is None:
            return super().shutdown()
        if self.is_alive():
            self._calls.stop(self._thread, self.shutdown_timeout)

    async def _shutdown(self, timeout: float | None) -> None:
        try:
            await super()._shutdown(timeout)
        finally:
            if self._stopped is not None:
                self._stopped.set()

    async def _serve(self) -> None:
        """hivemind's ``_run_internal`` on this thread's loop, on a libp2p client of its own (the DHT's
        replica belongs to the loop that first asked for it: the peer's), until ``_shutdown``."""
        self._stopped = asyncio.Event()
        await self._calls.serve(self._start, self, self._ready, self._stopped)

    async def _start(self) -> None:
        self._state_updated = asyncio.Event()
        self._pending_groups_registered = asyncio.Event()
        self._pending_groups_registered.set()
        self._p2p = await P2P.replicate(self.dht.run_coroutine(DHT._get_p2p_daemon_listen_maddr))
        if not self.client_mode:
            await self.add_p2p_handlers(self._p2p, namespace=self.prefix)
        self._matchmaking = Matchmaking(self._p2p, self.schema_hash, self.dht, client_mode=self.client_mode,
                                        **self.matchmaking_kwargs)
        if not self.client_mode:
            self._calls.keep(asyncio.create_task(self._declare_for_download_periodically()))

    @contextlib.contextmanager
    def tensors_within(self, timeout: float):
        """``get_tensors`` waiting at most ``timeout`` s for the lock (a round or a fetch of a result
        holds it): a compute thread never waits on it forever, nor a stop with it."""
        if not self.lock_averaged_tensors.acquire(timeout=max(timeout, 0.0)):
            raise AveragingFailed(f"{self.prefix}: the averaged tensors stayed locked for {timeout:.0f} s "
                                  "(a round still running?); nothing applied")
        try:
            yield self._averaged_tensors
        finally:
            self.lock_averaged_tensors.release()

    async def _close(self) -> None:
        """After ``Calls`` refused new calls and cancelled every task (``serve_on_thread``)."""
        p2p = getattr(self, "_p2p", None)
        if p2p is not None:
            await p2p.shutdown()  # a replica: closes this client only, the DHT's p2pd stays

    def run(self) -> None:
        """The child process (``in_process=False``)."""
        # forked from a process whose OpenMP pool has run (training): a child that enters an OpenMP
        # parallel region then waits for threads that were not forked with it. One thread never does.
        torch.set_num_threads(1)
        _close_inherited_streams()
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        parent = os.getppid()
        threading.Thread(target=_exit_with_parent, args=(parent,), name="parent-watchdog", daemon=True).start()
        super().run()


async def _enter_or_undo(self: Any) -> Any:
    """hivemind's ``_AsyncContextWrapper.__aenter__`` (``enter_asynchronously``), safe to cancel.

    hivemind enters the context (here: the averaged tensors' lock) on a thread of its executor and
    awaits it; a task cancelled during that wait (a round given up, an averager stopping) leaves the
    thread to take the lock a moment later with nobody to release it, and every later step of the
    stage then waits for it. Here the entry is shielded, and when the awaiting task was cancelled the
    context is exited as soon as it was entered."""
    entering = asyncio.get_running_loop().run_in_executor(self.get_process_wide_executor(), self._context.__enter__)
    try:
        return await asyncio.shield(entering)
    except asyncio.CancelledError:
        entering.add_done_callback(
            lambda f: f.cancelled() or f.exception() is not None or self._context.__exit__(None, None, None))
        raise


_AsyncContextWrapper.__aenter__ = _enter_or_undo



_FETCH_WAIT = 5.0  # s a member waits for its own round to end before it answers a fetch of its result


def _key(group_id: bytes) -> int:
    return int.from_bytes(group_id[:8], "little", signed=True) or 1


def _parts(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    size = DEFAULT_PART_SIZE_BYTES // 4
    return [part for t in tensors for part in t.detach().reshape(-1).split(size)]


async def _receive_into(replies: AsyncIterator[averaging_pb2.AveragingData], tensors: Sequence[torch.Tensor],
                        total: int) -> bool:
    """Copy the parts ``rpc_fetch_result`` sends into ``tensors``; whether they were all there."""
    flat = iter(_parts(tensors))
    received = 0
    while received < total:
        message = await anext(replies, None)
        if message is None or message.code != averaging_pb2.AVERAGED_PART:
            return False
        part = deserialize_torch_tensor(message.tensor_part)
        target = next(flat, None)
        if target is None or target.shape != part.shape:
            return False
        target.copy_(part)
        received += part.numel()
    return True


def _round_size(serializer: Any, data_for_gather: bytes) -> int | None:
    """The ``members`` a round's gather data announces (see ``HivemindGradientSync.sum``), if any."""
    try:
        _, _, user_data = serializer.loads(data_for_gather)
        members = serializer.loads(user_data).get("members")
    except Exception:  # another caller's gather data: matchmaking as hivemind does it by default
        return None
    return members if isinstance(members, int) and members >= 2 else None


_P2P_SOCKETS = "/tmp/hivemind-p2p"  # hivemind's p2pd control socket and its clients' handler sockets


def _close_inherited_streams() -> None:
    """Close, in a freshly forked child, its copies of the parent's libp2p stream sockets.

    Each stream a handler or a call has open is a unix socket to the node's p2pd; a copy held by a
    child keeps it open after the parent closes it, so the other side never sees the stream end
    (seen: replies that never finished once an averager was forked mid-request). The child's own
    P2P opens new sockets after this; its pipes (unnamed socket pairs) are kept."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            sock = socket.socket(fileno=fd)
        except OSError:  # the fd of the listing itself, or one closed meanwhile
            continue
        if sock.family == socket.AF_UNIX and any(str(addr).startswith(_P2P_SOCKETS) for addr in _ends(sock)):
            sock.close()
        else:
            sock.detach()


def _ends(sock: socket.socket) -> list[object]:
    ends = []
    for end in (sock.getsockname, sock.getpeername):
        try:
            ends.append(end())
        except OSError:  # not connected
            continue
    return ends


class _RobustAccumulator:
    """Takes the place of hivemind's accumulator tensor of one part: keeps each sender's part (``add_``)
    and, when hivemind divides by the total weight (``div_``), returns their robust mean."""

    def __init__(self, shape: torch.Size, clip: float):
        self.shape, self.clip = shape, clip
        self.parts: list[torch.Tensor] = []
        self.weights: list[float] = []

    def add_(self, part: torch.Tensor, alpha: float = 1.0) -> "_RobustAccumulator":
        self.parts.append(part)
        self.weights.append(alpha)
        return self

    def div_(self, denominator: float) -> torch.Tensor:
        if not self.parts or denominator <= 0:
            return torch.zeros(self.shape)
        mean, outliers = robust_mean(self.parts, self.weights, self.clip)
        for outlier in outliers:
            logger.warning("averaging: a member's contribution was %s: %s",
                           "dropped" if outlier.scale == 0 else f"scaled by {outlier.scale:.3g}", outlier.why)
        return mean


class _RobustReducer(TensorPartReducer):
    """hivemind's part reducer with a ``_RobustAccumulator`` for each part. It also notes the parts it
    reduced without every sender (one stopped sending mid-round): ``short_parts``."""

    def __init__(self, part_shapes: Sequence[torch.Size], num_senders: int, clip: float):
        self.clip = clip
        self.short_parts: set[int] = set()
        super().__init__(part_shapes, num_senders)

    def reset_accumulators(self) -> None:
        super().reset_accumulators()
        if not self.finished.is_set():
            self.accumulator = _RobustAccumulator(self.part_shapes[self.current_part_index], self.clip)

    def check_current_part_finished(self) -> None:
        if self.current_part_accumulated_from == self.num_current_senders < self.num_senders:
            self.short_parts.add(self.current_part_index)
        super().check_current_part_finished()


# How long the end of a stream that sent its last message stays open for the caller to close it first
# (see _RobustRunner.rpc_aggregate_part); the caller's close ends the wait at once.
_LINGER = 5.0


async def _linger() -> None:
    await asyncio.sleep(_LINGER)


class _RobustRunner(AllReduceRunner):
    """hivemind's all-reduce with ``_RobustReducer`` (``_Averager`` runs its rounds with it).
    It also tells whether the round's result is whole (``missing``), and its streams end so that no
    reply is lost on the way (``rpc_aggregate_part``, ``_communicate_with_peer``)."""

    def __init__(self, *args: Any, clip: float, fault: str | None, **kwargs: Any):
        """``fault`` (tests only): ``"lose-results"`` drops what the first other reducer sends back."""
        super().__init__(*args, **kwargs)
        self.clip, self.fault = clip, fault
        plain = self.tensor_part_reducer
        self.tensor_part_reducer = _RobustReducer(plain.part_shapes, plain.num_senders, self.clip)
        plain.num_senders = 0  # it never reduces: without this its finalize warns, every round, that it
        plain.finalize()  # "received 0.0% of input tensors"

    def missing(self) -> str | None:
        """What of this member's result is not the whole group's sum, or None when it all is."""
        lost = self.tensor_part_container.failed_size
        if lost:
            return (f"{lost} of {self.tensor_part_container.total_size} values did not come back from the member "
                    "that reduced them")
        reducer = self.tensor_part_reducer
        dropped = sum(1 for after in reducer.sender_failed_after if after < reducer.num_parts)
        if dropped:
            return f"{dropped} member(s) stopped sending the parts this member reduced"
        return None

    async def rpc_aggregate_part(self, stream: AsyncIterator[averaging_pb2.AveragingData],
                                 context: P2PContext) -> AsyncIterator[averaging_pb2.AveragingData]:
        """hivemind's reducer side of one sender's stream, with two changes.

        Its end stays open after the last reply until the sender closes the stream (bounded by
        ``_LINGER``). p2pd resets a stream whose handler side closes while the caller's side is open,
        and the reset drops the replies the caller's daemon has not yet read: the last part of a
        reply stream went missing in about one round in a hundred on loopback (more under load),
        with no error anywhere ("sent 2 parts, but we expected 3"). The sender closes as soon as it
        has all its parts (``_communicate_with_peer``), which cancels this wait.

        A part reduced without every sender (one stopped sending mid-round) is not sent back as if it
        were the group's sum: the stream ends with ``INTERNAL_ERROR`` instead, and the sender refuses
        the round (``missing``)."""
        sent = 0
        async with contextlib.aclosing(super().rpc_aggregate_part(stream, context)) as replies:
            async for message in replies:
                if message.code == averaging_pb2.AVERAGED_PART:
                    if sent in self.tensor_part_reducer.short_parts:
                        yield averaging_pb2.AveragingData(code=averaging_pb2.INTERNAL_ERROR)
                        break
                    sent += 1
                yield message
        await _linger()

    async def _communicate_with_peer(self, peer_id: Any) -> None:
        """hivemind's sender side (send this member's parts to the member that reduces them, take the
        results back), except that it closes the stream itself as soon as the last expected part has
        come (see ``rpc_aggregate_part``) instead of reading on until the reducer closes it."""
        if peer_id == self.peer_id:
            return await super()._communicate_with_peer(peer_id)
        index = self.ordered_peer_ids.index(peer_id)
        container = self.tensor_part_container
        expected = container.num_parts_by_peer[index]
        lose = self.fault == "lose-results"  # test fault, once: this reducer's results are lost
        self.fault = None if lose else self.fault
        received = 0
        try:
            done_sending = asyncio.Event()
            inputs = attach_event_on_finished(self._generate_input_for_peer(index), done_sending)
            replies = await self._get_peer_stub(peer_id).rpc_aggregate_part(inputs)
            try:
                if self.should_delay_results(self.peer_id):
                    await done_sending.wait()
                while received < expected:
                    message = await asyncio.wait_for(anext(replies), self.reducer_timeout)
                    if message.code != averaging_pb2.AVERAGED_PART:
                        raise AllreduceException(f"{peer_id} sent {averaging_pb2.MessageCode.Name(message.code)}")
                    if not lose:
                        container.register_processed_part(index, received, deserialize_torch_tensor(message.tensor_part))
                    received += 1
            finally:
                await replies.aclose()
            if lose:
                raise AllreduceException(f"test fault: the results reduced by {peer_id} were lost")
        except BaseException as e:
            container.register_failed_reducer(index)
            if isinstance(e, StopAsyncIteration):
                raise AllreduceException(f"{peer_id} sent {received} parts, but we expected {expected}") from None
            raise


def _exit_with_parent(parent_pid: int, period: float = 1.0) -> None:
    while os.getppid() == parent_pid:
        time.sleep(period)
    os.kill(os.getpid(), signal.SIGKILL)


class HivemindGradientSync:
    """One ``DecentralizedAverager`` (sharing the node's p2pd) for one set of tensors: on a thread of
    this process, or in a child process of its own with ``in_process=False``."""

    def __init__(self, dht: hivemind.DHT, prefix: str, like: Sequence[torch.Tensor], *, window: float = 0.5,
                 round_timeout: float = 15.0, start_timeout: float = 60.0, clip: float = AVERAGING_CLIP,
                 fault: str | None = None, in_process: bool = True):
        """``round_timeout`` bounds the all-reduce once a group has formed: hivemind's default is no
        bound, so a member that dies mid-round (its p2p daemon may outlive it for a while) would keep
        the others waiting forever, their compute thread with them. ``clip``: see ``robust_mean``.
        ``fault`` (tests only): ``"lose-results"`` loses the results of the first round's first other
        reducer, as a broken stream does. ``in_process=False``: hivemind's child process (~160 MiB
        PSS more per averager, see docs/design.md), the fallback."""
        self.prefix = prefix
        self._round: tuple[_Round, Any] | None = None  # the round running now, and its StepControl
        self._given_up = _GivenUp()
        self._lock = threading.Lock()
        self._averager = _Averager(
            like, dht, prefix=prefix, start=False, min_group_size=2, target_group_size=None, min_matchmaking_time=window,
            request_timeout=max(window / 2, 0.1), allow_state_sharing=False, allreduce_timeout=round_timeout,
            in_process=in_process, clip=clip, fault=fault,
        )
        with _FORK_LOCK if not in_process else contextlib.nullcontext():
            self._averager.run_in_background(await_ready=True, timeout=start_timeout)

    def sum(self, grads: Sequence[torch.Tensor], *, step: int, members: Sequence[str], me: str,
            scheduled_time: float, timeout: float) -> list[torch.Tensor]:
        with self._averager.tensors_within(timeout) as tensors:
            for slot, grad in zip(tensors, grads):
                slot.copy_(grad)
            self._averager.held.value = 0  # another member may no longer fetch the last round's result here
        started = time.perf_counter()
        key = _round(step, members)
        with self._lock:  # an abort either finds this round running or is found here
            if key in self._given_up:
                raise AveragingFailed(f"{self.prefix} step {step}: the round was given up before it began; nothing applied")
            control = self._averager.start_round({"peer": me, "step": step, "members": len(members)},
                                                 scheduled_time=scheduled_time, timeout=timeout)
            self._round = (key, control)
        try:  # the whole round (matchmaking and all-reduce) within ``timeout`` of the scheduled start
            gathered = control.result(timeout=max(scheduled_time - get_dht_time(), 0.0) + timeout)
        except (concurrent.futures.CancelledError, asyncio.CancelledError):
            # hivemind may also hand back the asyncio kind, set on the step by its averager: it
            # must not escape as a cancellation of the caller's task (a BaseException)
            raise AveragingFailed(f"{self.prefix} step {step}: the round was given up or cancelled; "
                                  "nothing applied") from None
        except concurrent.futures.TimeoutError:
            control.cancel()
            raise AveragingFailed(f"{self.prefix} step {step}: the averaging round did not end within "
                                  f"{timeout:.0f} s (a member left mid-round?); nothing applied") from None
        except Exception as e:  # hivemind raises several types for a round that broke off
            raise AveragingFailed(f"{self.prefix} step {step}: averaging broke off: {type(e).__name__}: {e}") from None
        finally:
            self._round = None
        if gathered is None:
            raise AveragingFailed(f"{self.prefix} step {step}: no group with {len(members) - 1} other "
                                  f"member(s) formed within {timeout:.0f} s")
        _check_group(gathered.values(), step, members, self.prefix)
        with self._averager.tensors_within(timeout) as tensors:
            summed = [t.clone().mul_(len(members)) for t in tensors]
        logger.debug("%s step %d: averaged with %d members in %.3f s", self.prefix, step, len(members),
                     time.perf_counter() - started)
        return summed

    def share_state(self, provider: Callable[[], tuple[Any, list[torch.Tensor]]]) -> None:
        """From now on, a member that joins later may download ``provider()``'s (metadata, tensors)
        from this one (hivemind's state sharing: ``{prefix}.all_averagers`` in the DHT)."""
        self._averager.state_provider = provider
        self._averager.allow_state_sharing = True

    def load_state(self, timeout: float) -> tuple[Any, list[torch.Tensor]] | None:
        """The state another member shares (the one hivemind ranks first), or None if none handed it
        over within ``timeout`` s."""
        future = self._averager.load_state_from_peers(wait=False)
        try:
            return future.result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            return None

    def abort(self, step: int, members: Sequence[str]) -> bool:
        key = _round(step, members)
        with self._lock:
            self._given_up.add(key)
            current = self._round
            return current is not None and current[0] == key and current[1].cancel()

    def shutdown(self) -> None:
        if self._averager.is_alive():
            self._averager.shutdown()


_Round = tuple[int, tuple[str, ...]]


def _round(step: int, members: Sequence[str]) -> _Round:
    return step, tuple(sorted(members))


class _GivenUp:
    """The last few rounds given up (a retry of a step has other members, so it is another round)."""

    def __init__(self, keep: int = 16):
        self._keys: list[_Round] = []
        self._keep = keep

    def add(self, key: _Round) -> None:
        self._keys = [*self._keys, key][-self._keep:]

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __len__(self) -> int:
        return len(self._keys)


def _check_group(gathered, step: int, members: Sequence[str], where: str) -> None:
    got = sorted((str(g.get("peer")), g.get("step")) for g in gathered)
    expected = sorted((m, step) for m in members)
    if got != expected:
        raise AveragingFailed(f"{where} step {step}: the group was {got}, expected {expected}; nothing applied")


class LocalGradientSync:
    """The fake: members of one process meet in a shared dict (one instance per group, shared)."""

    def __init__(self, clip: float = AVERAGING_CLIP) -> None:
        self.clip = clip
        self._rounds: dict[tuple[int, tuple[str, ...]], dict[str, list[torch.Tensor]]] = {}
        self.aborted = _GivenUp()
        self._cond = threading.Condition()

    def sum(self, grads: Sequence[torch.Tensor], *, step: int, members: Sequence[str], me: str,
            scheduled_time: float, timeout: float) -> list[torch.Tensor]:
        key = _round(step, members)
        deadline = time.monotonic() + timeout
        with self._cond:
            self._rounds.setdefault(key, {})[me] = [g.detach().clone() for g in grads]
            self._cond.notify_all()
            while len(self._rounds[key]) < len(members):
                if key in self.aborted:
                    self._rounds[key].pop(me, None)
                    raise AveragingFailed(f"step {step}: the round was given up (a member is gone)")
                if not self._cond.wait(max(0.0, deadline - time.monotonic())):
                    raise AveragingFailed(f"step {step}: only {sorted(self._rounds[key])} of {list(members)} came")
            contributions = [self._rounds[key][m] for m in sorted(members)]
        return [robust_mean(parts, clip=self.clip)[0] * len(parts) for parts in zip(*contributions)]

    def abort(self, step: int, members: Sequence[str]) -> bool:
        """Gives the round up for every member (the fake is shared by the whole group)."""
        key = _round(step, members)
        with self._cond:
            self.aborted.add(key)
            self._cond.notify_all()
            waiting = self._rounds.get(key, {})
            return 0 < len(waiting) < len(key[1])

    def shutdown(self) -> None:
        pass
