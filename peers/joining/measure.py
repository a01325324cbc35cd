"""How fast this peer is, measured on join: compute for one stage of the run's model, the link to a few
peers, and the memory it can give to stages. Placement (``shards.placement``) decides from these.

* Compute: forward + backward tokens/s through one stage built from the model's config (random
  weights: speed does not depend on their values) on the real device (CUDA when present, else CPU).
  Cached per model (config hash), stage size, dtype, device and thread count in the peer's state dir.
* Network: round trips of ``swarm.probe.echo`` (``peers.training.protocol``) to at most three peers: a small
  call for latency, a 1 MiB call each way for bandwidth. Bounded: 2 s per call.
* Memory: free memory of the peer's GPU, else available RAM, times ``MEMORY_HEADROOM``; a setting
  may cap it. A stage needs its float32 weights, gradients and AdamW state (``stage_bytes``; AdamW's
  state in host memory with ``peer.offload_optimizer``) and the activations of a full queue.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import psutil
import torch

from peers.training.protocol import ECHO, EchoRequest, EchoResponse
from net.rpc import ok_reply, parse_reply, parse_request
from net.transport import Transport
from shards.devices import compute_context
from shards.families import family_of
from shards.placement import contribution
from shards.stage import StageModule
from core.types import LayerRange, PeerId
from core.errors import BadRequest, SwarmError

__all__ = [
    "MEMORY_HEADROOM",
    "Measurement",
    "Progress",
    "measure_throughput",
    "measure_stage",
    "cached_stage_throughput",
    "stage_bytes",
    "stage_parameters",
    "activation_bytes",
    "queue_tokens",
    "ACTIVATION_WIDTH",
    "available_memory",
    "serve_echo",
    "measure_links",
    "network_tokens_per_second",
]

logger = logging.getLogger(__name__)

MEMORY_HEADROOM = 0.85  # of free memory, for caches, allocator slack and the rest of the process
MICROBATCH_TOKENS = 8 * 128
"""A microbatch's tokens at most, for the memory plan: a trainer splits its batch into microbatches (the
README's 8 x 128 batches into 2 per stage); a run with a huge target batch still sends small requests."""
ACTIVATION_WIDTH = 17  # hidden-sized vectors kept per token and block for backward (see activation_bytes)
_ECHO_LIMIT = 4 << 20  # bytes an echo may carry: enough to time a link, too little to abuse
_PROBE_BYTES = 1 << 20

Progress = Callable[[str, float], None]
"""``progress(what, fraction_done)``: how ``swarm join`` draws its progress bar."""


@dataclass(frozen=True)
class Measurement:
    """What a peer publishes about itself (tokens/s for one stage; ms; megabits/s; GiB), and what
    placement reads: ``compute`` (tokens/s for one stage) and ``network`` (tokens/s its link carries)."""

    throughput: float
    latency_ms: float | None
    bandwidth_mbps: float | None
    memory_gib: float
    compute: float = 0.0
    network: float = math.inf

    def per_stage(self, count: int) -> float:
        """Tokens/s this peer gives each of ``count`` stages it serves: what it announces per stage,
        the same share placement counts (``shards.placement.contribution``)."""
        return round(contribution(self.compute or self.throughput, count, self.network), 1)


def measure_throughput(module: torch.nn.Module, hidden_size: int, *, batch: int = 4, seq: int = 64,
                       repeats: int = 2, delay: float = 0.0) -> float:
    """Tokens per second of forward + backward through ``module`` on a random batch (best of runs).
    ``delay`` (seconds per pass, the artificial slowdown of tests) counts as compute time."""
    param = next(module.parameters())
    hidden = torch.randn(batch, seq, hidden_size, dtype=param.dtype, device=param.device, requires_grad=True)
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        module(hidden).sum().backward()
        if param.device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    module.zero_grad(set_to_none=True)
    return round(batch * seq / (best + 2 * delay), 1)


def measure_stage(config: Any, layers: LayerRange, *, dtype: torch.dtype, device: str | torch.device,
                  delay: float = 0.0) -> float:
    """Throughput of a stage of ``len(layers)`` blocks built from ``config`` (random weights) on
    ``device``, as it serves: float32 weights computing in ``dtype`` (``compute_context``). One
    warm-up pass, then the best of three."""
    family = family_of(config)
    device = torch.device(device)
    with torch.device(device):
        blocks = [family.build_block(config, index) for index in layers]
        module = StageModule(config, family, layers, blocks)
    with compute_context(device, dtype):
        measure_throughput(module, config.hidden_size, repeats=1)  # warm-up: kernels, allocator
        return measure_throughput(module, config.hidden_size, repeats=3, delay=delay)


def cached_stage_throughput(cache_dir: Path, key: dict[str, Any], measure: Callable[[], float]) -> float:
    """``measure()``, remembered in ``cache_dir/measurements.json`` under ``key`` (model, device,
    threads, ...), so a peer that rejoins does not measure again."""
    path = cache_dir / "measurements.json"
    name = json.dumps(key, sort_keys=True)
    try:
        cache = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError) as e:  # a broken cache costs one measurement, not the join
        logger.warning("ignoring unreadable %s: %s", path, e)
        cache = {}
    if isinstance(cache.get(name), (int, float)) and cache[name] > 0:
        logger.info("throughput from cache %s: %.0f tokens/s", path, cache[name])
        return float(cache[name])
    value = measure()
    cache[name] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cache, indent=1))
    return value


def stage_bytes(config: Any, layers: LayerRange, dtype: torch.dtype = torch.float32, *, queue_tokens: int = 0,
                offload_optimizer: bool = False) -> int:
    """Bytes a stage needs on its device for training: float32 master weights and gradients, AdamW's
    two float32 moments (unless offloaded to host memory) and the activations a full queue keeps
    for backward (``queue_tokens`` tokens computed in ``dtype``), counted from the config on the
    meta device (nothing is allocated or loaded)."""
    params = stage_parameters(config, layers)
    optimizer = 0 if offload_optimizer else 2 * params * 4
    return params * 4 * 2 + optimizer + activation_bytes(config, len(layers), queue_tokens, dtype)


def stage_parameters(config: Any, layers: LayerRange) -> int:
    """Parameters of the blocks of ``layers``, counted on the meta device."""
    family = family_of(config)
    with torch.device("meta"):
        return sum(p.numel() for index in layers for p in family.build_block(config, index).parameters())


def activation_bytes(config: Any, num_layers: int, tokens: int, dtype: torch.dtype) -> int:
    """What ``tokens`` tokens through ``num_layers`` blocks keep for backward: about
    ``ACTIVATION_WIDTH`` hidden-sized vectors per token and block in ``dtype`` (Korthikanti et al.,
    2022, with the attention scores left to fused attention kernels, which keep none)."""
    return tokens * num_layers * ACTIVATION_WIDTH * config.hidden_size * (torch.finfo(dtype).bits // 8)


def queue_tokens(queue_size: int, cache_size: int, step_tokens: int, num_stages: int) -> int:
    """Tokens whose graphs a stage with a full queue keeps: as many requests as it caches graphs for
    (at most the queue), each a trainer's microbatch (one step's tokens over the stages, at most
    ``MICROBATCH_TOKENS``), and never more than one step's tokens in all (a backward frees its
    graph, and a step's backwards all come before the next step's forwards)."""
    per_request = max(1, min(step_tokens // max(1, num_stages), MICROBATCH_TOKENS))
    return min(step_tokens, min(queue_size, cache_size) * per_request)


def available_memory(device: str | torch.device, cap_bytes: int | None = None) -> int:
    """Bytes this peer can give to stages: free memory of its GPU or available RAM, with headroom."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        free = psutil.virtual_memory().available
    usable = int(free * MEMORY_HEADROOM)
    return min(usable, cap_bytes) if cap_bytes else usable


def serve_echo(transport: Transport) -> Any:
    """Register ``swarm.probe.echo``: reply with the tensors received (at most ``_ECHO_LIMIT`` bytes)."""

    async def echo(message: Any, tensors: list[torch.Tensor]) -> tuple[dict, list[torch.Tensor]]:
        parse_request(EchoRequest, message)
        size = sum(t.numel() * t.element_size() for t in tensors)
        if size > _ECHO_LIMIT:
            raise BadRequest(f"an echo carries at most {_ECHO_LIMIT} bytes, got {size}")
        return ok_reply(EchoResponse(size=size)), tensors

    return transport.serve(ECHO, echo, max_request_bytes=2 * _ECHO_LIMIT)


async def measure_links(transport: Transport, peer_ids: Sequence[PeerId], *, timeout: float = 2.0,
                        progress: Progress | None = None) -> tuple[float | None, float | None]:
    """Median latency (ms) and bandwidth (megabits/s) to ``peer_ids`` (at most 3 are asked); ``None``
    when no peer answered (the first peer of a run has nobody to ask)."""
    latencies, bandwidths = [], []
    targets = list(peer_ids)[:3]
    payload = torch.zeros(_PROBE_BYTES // 4, dtype=torch.float32)
    for done, peer_id in enumerate(targets):
        try:
            await _timed_echo(transport, peer_id, [], timeout)  # untimed: a keyed run presents a token first
            small = await _timed_echo(transport, peer_id, [], timeout)
            big = await _timed_echo(transport, peer_id, [payload], timeout)
        except (SwarmError, asyncio.TimeoutError) as e:  # a peer that cannot answer is simply not counted
            logger.info("link probe to %s failed: %s", peer_id[-8:], e)
            continue
        latencies.append(small * 1000)
        bandwidths.append(2 * _PROBE_BYTES * 8 / 1e6 / max(big - small, 1e-4))
        if progress is not None:
            progress("network", (done + 1) / len(targets))
    if not latencies:
        return None, None
    return round(statistics.median(latencies), 2), round(statistics.median(bandwidths), 1)


async def _timed_echo(transport: Transport, peer_id: PeerId, tensors: list[torch.Tensor], timeout: float) -> float:
    started = time.perf_counter()
    reply, echoed = await asyncio.wait_for(
        transport.call(peer_id, ECHO, EchoRequest(), tensors, timeout=timeout), timeout)
    parse_reply(EchoResponse, reply)
    if len(echoed) != len(tensors):
        raise BadRequest(f"echo returned {len(echoed)} tensors instead of {len(tensors)}")
    return time.perf_counter() - started


def network_tokens_per_second(bandwidth_mbps: float | None, hidden_size: int, dtype: torch.dtype) -> float:
    """Tokens/s a link carries for a stage: each token's activations come in and its gradients go out
    (and back), ``hidden_size`` values each way per pass. Unknown bandwidth means unlimited."""
    if not bandwidth_mbps:
        return math.inf
    bytes_per_token = 2 * hidden_size * torch.finfo(dtype).bits // 8
    return bandwidth_mbps * 1e6 / 8 / bytes_per_token

