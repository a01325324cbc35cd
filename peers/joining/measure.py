"""How fast this peer is, measured on join: compute for one stage of the run's model, the link to a few
peers, and the memory it can give to stages. Placement (``shards.placement``) decides from these.

* Compute: forward + backward tokens/s through one stage built from the model's config (random
  weights: speed does not depend on their values) on the real device (CUDA when present, else CPU).
  Cached per model (config hash), stage size, dtype, device and thread count in the peer's state dir.
* Network: round trips of ``swarm.probe.echo`` (``peers.training.protocol``) to at most three peers: a small
  call for latency, a 1 MiB call each way for bandwidth. Bounded: 2 s per call.
* Memory: free CUDA memory, else available RAM, times ``MEMORY_HEADROOM``; a setting may cap it.
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
    "available_memory",
    "compute_device",
    "serve_echo",
    "measure_links",
    "network_tokens_per_second",
]

logger = logging.getLogger(__name__)

MEMORY_HEADROOM = 0.85  # of free memory, for activations, caches and the rest of the process
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


def measure_stage(config: Any, layers: LayerRange, *, dtype: torch.dtype, device: str,
                  delay: float = 0.0) -> float:
    """Throughput of a stage of ``len(layers)`` blocks built from ``config`` (random weights) on ``device``.
    One warm-up pass, then the best of three."""
    family = family_of(config)
    with torch.device(device):
        blocks = [family.build_block(config, index) for index in layers]
        module = StageModule(config, family, layers, blocks).to(dtype)
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


def stage_bytes(config: Any, layers: LayerRange, dtype: torch.dtype) -> int:
    """Bytes a stage needs for training: parameters, their gradients and AdamW's two moments (all in
    ``dtype``), counted from the config on the meta device (nothing is allocated or loaded)."""
    family = family_of(config)
    with torch.device("meta"):
        params = sum(p.numel() for index in layers for p in family.build_block(config, index).parameters())
    return params * torch.finfo(dtype).bits // 8 * 4


def compute_device() -> str:
    """Where this peer computes: the first CUDA device when there is one, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def available_memory(device: str, cap_bytes: int | None = None) -> int:
    """Bytes this peer can give to stages: free CUDA memory or available RAM, with headroom."""
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info()
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

