"""How often the tail of a hivemind/p2pd reply stream is lost on loopback, depending on which side
closes the stream first (issue 21: the cause of all-reduce rounds that came back partial).

A handler streams ``--replies`` messages of 512 KiB (as an all-reduce reducer sends its parts back).

- ``handler-closes``: hivemind's way. The handler returns after its last reply, which closes its end;
  the caller reads until the stream ends.
- ``caller-closes``: ours (``peers.averaging``). The caller closes as soon as it has the replies it
  expects; the handler keeps its end open (bounded) until then.

    .venv/bin/python benchmarks/stream_tail.py [--calls 300] [--replies 3]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hivemind.compression import serialize_torch_tensor  # noqa: E402
from hivemind.p2p import P2P  # noqa: E402
from hivemind.proto import averaging_pb2  # noqa: E402


async def _serve(p2p: P2P, replies: int, linger: bool) -> None:
    part = serialize_torch_tensor(torch.randn(2**17))

    async def handler(requests, _context):
        async for _ in requests:
            pass
        for _ in range(replies):
            yield averaging_pb2.AveragingData(code=averaging_pb2.AVERAGED_PART, tensor_part=part)
        if linger:
            await asyncio.sleep(5.0)  # the caller's close cancels this

    name = f"tail_{'linger' if linger else 'plain'}"
    await p2p.add_protobuf_handler(name, handler, averaging_pb2.AveragingData, stream_input=True, stream_output=True)


async def _call(p2p: P2P, server, replies: int, linger: bool, delay: float) -> int:
    name = f"tail_{'linger' if linger else 'plain'}"

    async def requests():
        yield averaging_pb2.AveragingData(code=averaging_pb2.PART_FOR_AVERAGING)

    stream = await p2p.iterate_protobuf_handler(server, name, requests(), averaging_pb2.AveragingData)
    got = 0
    try:
        while got < replies or not linger:
            await asyncio.sleep(delay)  # a caller busy with other work (as an all-reduce member is) reads late
            message = await asyncio.wait_for(anext(stream, None), 10)
            if message is None:
                break
            got += 1
    finally:
        await stream.aclose()
    return got


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--replies", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--delay", type=float, default=0.05, help="seconds the caller waits before each read")
    args = parser.parse_args()
    server = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    client = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=await server.get_visible_maddrs())
    try:
        for linger in (False, True):
            await _serve(server, args.replies, linger)
            started, short = time.perf_counter(), 0
            for _ in range(args.calls // args.concurrency):
                got = await asyncio.gather(*(_call(client, server.peer_id, args.replies, linger, args.delay)
                                             for _ in range(args.concurrency)))
                short += sum(1 for g in got if g != args.replies)
            way = "caller-closes " if linger else "handler-closes"
            calls = args.calls // args.concurrency * args.concurrency
            print(f"{way}: {short} of {calls} calls lost the tail of their {args.replies} replies "
                  f"({time.perf_counter() - started:.1f} s)")
    finally:
        await client.shutdown()
        await server.shutdown()


if __name__ == "__main__":
    asyncio.run(main())
