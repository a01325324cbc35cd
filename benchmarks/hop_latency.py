"""Hop latency: one stage RPC round trip of a 2 MiB activation vs a raw asyncio TCP echo of the same
bytes, side by side in one run (interleaved rounds, medians).

    .venv/bin/python benchmarks/hop_latency.py
    .venv/bin/python benchmarks/hop_latency.py --calls 50 --wire int8
    .venv/bin/python benchmarks/hop_latency.py --hidden 128   # a narrow stage: the hop's own 1-token cost
    python3 benchmarks/hop_latency.py --device cuda --dtype bfloat16   # the stage on a GPU (gpu_check.sh)

A server process (like a peer on another machine) runs a hivemind P2P node (its own p2pd) serving a
real ``StageService`` (a 1-layer GPT-2 stage of width 1024) plus the echo probe, and a raw asyncio TCP
echo server. This process calls them in turn over loopback:

* ``tcp echo``: 2 MiB out, the same 2 MiB back, length-prefixed, on one kept-open connection;
* ``stage forward``: ``swarm.stage.forward`` of a [4, 128, 1024] float32 activation (2 MiB each way),
  minus the compute time the stage reports (the RPC's own cost: serialization, p2pd, streams, the
  event loop and the hop to the compute thread);
* ``echo rpc``: ``swarm.probe.echo`` of the same tensor (the same transport, no stage at all);
* ``p2pd stream``: the same bytes as the TCP echo through a bare libp2p stream of the same two p2pd
  daemons (hivemind's ``call_binary_stream_handler``, no framing, no protobuf, no tensors): what any
  call through p2pd costs before swarm's code runs;
* ``tls echo``: the TCP echo inside TLS 1.3 (what encryption alone costs for these bytes);
* ``channel forward`` / ``channel echo rpc``: the same stage forward and echo RPC over the direct data
  channel (``net.channel``, TLS 1.3 unless ``--no-tls``) instead of a libp2p stream (``stage forward``);
* ``1-token channel`` / ``1-token tcp echo``: a 1-token step's tensor ([1, 1, 1024] float32, 4 KiB)
  through a stage forward on the channel minus compute, and its raw TCP echo. Each round makes
  ``TOKEN_STEPS`` such steps back to back, as a generation's decode steps come; ``1-token cold`` is
  the first of the round, right after the 2 MiB calls, which leave both processes' caches cold
  (about 0.5 ms more here: the figure for a step that follows other work, not a decode loop).
  A stage's own compute cools them too: the 1-layer width-1024 stage streams 48 MB of weights through
  the CPU's caches in each 1-token forward, and both processes' Python then runs cold, about 0.4 ms
  more a step on this 2-core VM than beside a narrow stage (``--hidden 128``, 0.4 ms of compute),
  whose figure is the hop's own cost (a GPU stage leaves the CPU's caches alone);
* ``aes-gcm alone``: the cipher the TLS echo negotiated, run in this process on the same 2 MiB as TLS
  runs it for one echo (encrypted and decrypted each way, in 16 KiB records): the floor under TLS,
  printed as the ratio to the plain echo that TLS cannot beat on this CPU.

With ``--device cuda`` the stage lives on the GPU and computes in ``--dtype``: its activations cross
host and device once each way inside the measured RPC, as a GPU peer's do.

Targets (issue 27): stage forward on the channel (minus compute) <= 1.5x the TCP echo; a 1-token
step's overhead <= 1 ms.
"""

from __future__ import annotations

import harness  # before any project module: this checkout first on sys.path

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from typing import Awaitable, Callable, TypeVar

import ssl

import torch
import uvloop
from hivemind.p2p import P2P, PeerID
from hivemind.utils.crypto import RSAPrivateKey

from peers.training.client import StageClient
from peers.joining.measure import serve_echo
from peers.training.protocol import ECHO, EchoRequest
from net.channel import ChannelServer, Identity, client_context, self_signed, server_context
from net.transport import P2PTransport
from net.wire import WIRE_FORMATS
from core.errors import PeerUnavailable

BATCH, SEQ, HIDDEN = 4, 128, 1024  # 2 MiB of float32
TOKEN_STEPS = 4  # 1-token steps per round after the first
T = TypeVar("T")


RAW_ECHO = "bench.raw_echo"


async def _echo_one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Read one length-prefixed message and send it back."""
    size = int.from_bytes(await reader.readexactly(8), "little")
    writer.write(size.to_bytes(8, "little") + await reader.readexactly(size))
    await writer.drain()


async def _roundtrip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, payload: bytes) -> None:
    """Send ``payload`` length-prefixed and read its echo."""
    writer.write(len(payload).to_bytes(8, "little") + payload)
    await writer.drain()
    await reader.readexactly(int.from_bytes(await reader.readexactly(8), "little"))


async def _serve_tcp_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            await _echo_one(reader, writer)
    except asyncio.IncompleteReadError:
        writer.close()


async def _serve_raw_echo(info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """The same echo on a libp2p stream (one message per stream, as swarm's calls open one each)."""
    try:
        await _echo_one(reader, writer)
    finally:
        writer.close()


def _tls_contexts() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """TLS 1.3 for the raw echo, with the channel's own kind of certificate."""
    return server_context(*self_signed()), client_context()


async def _server(model_dir: str, device: str, dtype: str, tls: bool) -> None:
    from dht.schemas import OptimizerSettings
    from peers.training.executor import StageExecutor
    from peers.training.service import StageService
    from shards import LayerRange, load_stage, resolve_model
    from shards.devices import compute_dtype, resolve_device

    torch.set_num_threads(1)
    p2p = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    transport = P2PTransport(p2p)
    layers = LayerRange(start=0, end=1)
    stage = load_stage(resolve_model(model_dir), layers, device=resolve_device(device))
    executor = StageExecutor(stage, 0, layers, OptimizerSettings(), precision=compute_dtype(dtype))
    service = StageService(executor, p2p.peer_id.to_base58())
    await service.register(transport)
    await serve_echo(transport)
    await transport.open_channel(ChannelServer(Identity(p2p.peer_id.to_base58(), RSAPrivateKey()), "127.0.0.1",
                                               tls=tls))
    await p2p.add_binary_stream_handler(RAW_ECHO, _serve_raw_echo)
    tcp = await asyncio.start_server(_serve_tcp_echo, "127.0.0.1", 0)
    tls_echo = await asyncio.start_server(_serve_tcp_echo, "127.0.0.1", 0, ssl=_tls_contexts()[0])
    maddrs = [str(m) for m in await p2p.get_visible_maddrs()]
    print(json.dumps({"maddrs": maddrs, "peer_id": p2p.peer_id.to_base58(),
                      "tcp_port": tcp.sockets[0].getsockname()[1],
                      "tls_port": tls_echo.sockets[0].getsockname()[1]}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the parent closes stdin
    tcp.close()
    tls_echo.close()
    service.shutdown()
    await transport.close()


async def _client(info: dict, args) -> dict[str, list[float]]:
    p2p = await P2P.create(initial_peers=info["maddrs"], host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    transport, direct = P2PTransport(p2p), P2PTransport(p2p)
    direct.use_channel(Identity(p2p.peer_id.to_base58(), RSAPrivateKey()))
    client = StageClient(transport, timeout=60, attempts=1, wire=args.wire)
    channel = StageClient(direct, timeout=60, attempts=1, wire=args.wire)
    reader, writer = await asyncio.open_connection("127.0.0.1", info["tcp_port"])
    tls_reader, tls_writer = await asyncio.open_connection("127.0.0.1", info["tls_port"], ssl=_tls_contexts()[1])
    hidden = torch.randn(_batch(args.hidden), SEQ, args.hidden)
    token = torch.randn(1, 1, args.hidden)
    payload, token_payload = hidden.numpy().tobytes(), token.numpy().tobytes()
    from shards import LayerRange
    layers = LayerRange(start=0, end=1)
    times: dict[str, list[float]] = {"tcp echo": [], "tls echo": [], "stage forward": [], "compute": [],
                                     "channel forward": [], "echo rpc": [], "channel echo rpc": [], "p2pd stream": [],
                                     "1-token tcp echo": [], "1-token cold": [], "1-token channel": []}
    server_id = PeerID.from_base58(info["peer_id"])

    async def tcp_round() -> float:
        started = time.perf_counter()
        await _roundtrip(reader, writer, payload)
        return time.perf_counter() - started

    async def tls_round(data: bytes = payload) -> float:
        started = time.perf_counter()
        await _roundtrip(tls_reader, tls_writer, data)
        return time.perf_counter() - started

    async def stage_round(stub: StageClient = client, tensor: torch.Tensor = hidden) -> tuple[float, float]:
        started = time.perf_counter()
        _, reply = await stub.forward(info["peer_id"], 0, layers, uuid.uuid4().hex, (tensor, None, None), train=False)
        return time.perf_counter() - started, reply.compute_ms / 1000

    async def echo_round(over: P2PTransport = transport) -> float:
        started = time.perf_counter()
        await over.call(info["peer_id"], ECHO, EchoRequest(), [hidden], timeout=60)
        return time.perf_counter() - started

    async def raw_round() -> float:
        started = time.perf_counter()
        _, raw_reader, raw_writer = await p2p.call_binary_stream_handler(server_id, RAW_ECHO)
        try:
            await _roundtrip(raw_reader, raw_writer, payload)
        finally:
            raw_writer.close()
        return time.perf_counter() - started

    lost: list[str] = []

    async def timed(round_: Callable[[], Awaitable[T]], name: str) -> T:
        """One round; a stream that libp2p loses on loopback now and then (about one call in a few
        hundred here: "the stream closed before its first frame") is counted and the round re-run."""
        for _ in range(3):
            try:
                return await round_()
            except (PeerUnavailable, ConnectionError, asyncio.IncompleteReadError) as e:
                lost.append(f"{name}: {type(e).__name__}")
        return await round_()

    async def token_tcp_round() -> float:
        started = time.perf_counter()
        await _roundtrip(reader, writer, token_payload)
        return time.perf_counter() - started

    def beyond_compute(timed_call: tuple[float, float]) -> float:
        return timed_call[0] - timed_call[1]

    for _ in range(3):  # warm-up: connections, the stage's first forward
        await tcp_round(), await tls_round(), await timed(stage_round, "stage"), await timed(echo_round, "echo"), \
            await timed(raw_round, "p2pd"), await stage_round(channel), await echo_round(direct), \
            await stage_round(channel, token)
    for _ in range(args.calls):  # interleaved, so a noisy moment hits all of them
        times["tcp echo"].append(await tcp_round())
        times["tls echo"].append(await tls_round())
        total, compute = await timed(stage_round, "stage")
        times["stage forward"].append(total - compute)
        times["compute"].append(compute)
        times["channel forward"].append(beyond_compute(await stage_round(channel)))
        times["echo rpc"].append(await timed(echo_round, "echo"))
        times["channel echo rpc"].append(await echo_round(direct))
        times["p2pd stream"].append(await timed(raw_round, "p2pd"))
        times["1-token tcp echo"].append(await token_tcp_round())
        times["1-token cold"].append(beyond_compute(await stage_round(channel, token)))
        for _ in range(TOKEN_STEPS):  # a generation's next steps, back to back
            times["1-token channel"].append(beyond_compute(await stage_round(channel, token)))
    assert direct.channel.sent and not direct.channel.fallbacks, "the channel calls fell back to libp2p"
    times["aes-gcm alone"] = _aes_gcm_round(payload, tls_writer.get_extra_info("cipher")[0], args.calls)
    if lost:
        print(f"streams lost and re-run: {len(lost)} ({', '.join(lost)})")
    writer.close()
    tls_writer.close()
    await direct.close()
    return times


def _batch(hidden: int) -> int:
    """The batch that keeps the activation at 2 MiB for a stage of width ``hidden``."""
    return max(1, BATCH * HIDDEN // hidden)


def _aes_gcm_round(payload: bytes, cipher: str, rounds: int) -> list[float]:
    """What the cipher alone costs for one TLS echo of ``payload``: each way one side encrypts it
    and the other decrypts it, in records of 16 KiB as TLS cuts them (``cryptography``'s AES-GCM,
    OpenSSL's code, with the key size of the ``cipher`` the TLS connection negotiated). The floor
    under ``tls echo``: TLS can be no faster than the plain echo plus this."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    aead = AESGCM(AESGCM.generate_key(bit_length=256 if "256" in cipher else 128))
    nonce, record = os.urandom(12), 16 << 10
    chunks = [payload[i:i + record] for i in range(0, len(payload), record)]
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(2):  # there and back
            for chunk in chunks:
                aead.decrypt(nonce, aead.encrypt(nonce, chunk, None), None)
        times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = harness.parser(__doc__)
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument("--wire", default="float32", choices=WIRE_FORMATS)
    parser.add_argument("--hidden", type=int, default=HIDDEN,
                        help="the stage's width (the batch grows to keep 2 MiB): a narrow stage's small compute "
                             "leaves the caches warm, so its 1-token figure is the hop's own cost")
    parser.add_argument("--no-tls", action="store_true", help="the data channel in clear (network.channel_tls false)")
    parser.add_argument("--serve", help=argparse.SUPPRESS)  # the server process: its model dir
    harness.add_device_flags(parser)
    args = parser.parse_args()
    if args.serve:
        uvloop.run(_server(args.serve, args.device, args.dtype, not args.no_tls))
        return
    torch.set_num_threads(1)
    _, model_dir = harness.workspace("swarm-bench-", "gpt2", num_layers=1, hidden_size=args.hidden,
                                     num_heads=max(1, args.hidden // 64),
                                     max_positions=SEQ)
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(model_dir), "--device", args.device,
                               "--dtype", args.dtype, *(["--no-tls"] if args.no_tls else [])], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        info = json.loads(server.stdout.readline())
        times = uvloop.run(_client(info, args))
    finally:
        server.stdin.close()
        harness.wait_or_kill(server, 20)
    tcp = statistics.median(times["tcp echo"])
    batch = _batch(args.hidden)
    print(f"activation [{batch}, {SEQ}, {args.hidden}] float32 = {batch * SEQ * args.hidden * 4 / 2**20:.1f} MiB each way, "
          f"stage wire {args.wire}, on {args.device} in {args.dtype}; {args.calls} interleaved calls each; load average {os.getloadavg()[0]:.1f}")
    for name, values in times.items():
        median = statistics.median(values)
        base = statistics.median(times["1-token tcp echo"]) if name.startswith("1-token") else tcp
        ratio = "" if name in ("tcp echo", "compute", "1-token tcp echo") else f"   {median / base:5.2f}x tcp echo"
        print(f"{name:>14}: median {median * 1000:7.2f} ms  (p10 {sorted(values)[len(values) // 10] * 1000:7.2f}, "
              f"p90 {sorted(values)[len(values) * 9 // 10] * 1000:7.2f}){ratio}")
    channel, token = statistics.median(times["channel forward"]), statistics.median(times["1-token channel"])
    print(f"data channel ({'plain TCP' if args.no_tls else 'TLS 1.3'}): stage forward minus compute / raw TCP echo: "
          f"{channel / tcp:.2f}x (target <= 1.5x); libp2p / channel: "
          f"{statistics.median(times['stage forward']) / channel:.2f}x; TLS echo / TCP echo: "
          f"{statistics.median(times['tls echo']) / tcp:.2f}x; a 1-token step's overhead on the channel: "
          f"{token * 1000:.2f} ms back to back (target <= 1 ms), {statistics.median(times['1-token cold']) * 1000:.2f} ms "
          "right after a 2 MiB call")
    aes = statistics.median(times["aes-gcm alone"])
    print(f"TLS floor: AES-GCM alone for a round trip of 2 MiB is {aes * 1000:.2f} ms = {aes / tcp:.2f}x the TCP echo, "
          f"so TLS can be no faster than {1 + aes / tcp:.2f}x the plain echo on this CPU (the target is 1.5x); "
          f"the TLS echo is {statistics.median(times['tls echo']) / (tcp + aes):.2f}x that floor")
    print(f"libp2p stage RPC (forward minus compute) / raw TCP echo: {statistics.median(times['stage forward']) / tcp:.2f}x "
          f"; a bare p2pd stream alone: {statistics.median(times['p2pd stream']) / tcp:.2f}x, so "
          f"swarm's own code adds {(statistics.median(times['stage forward']) - statistics.median(times['p2pd stream'])) * 1000:.1f} ms "
          f"to what p2pd costs")


if __name__ == "__main__":
    main()
