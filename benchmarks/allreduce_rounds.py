"""How often a real hivemind all-reduce round of ``HivemindGradientSync`` comes back partial on loopback,
and whether every member ends each round with the same, whole sum (issue 21).

Each member is its own process (its own DHT node and p2pd, its averager on a thread of it, or a child
of it with ``--averager-process``), as peers are.
Every member knows every member's gradients (seeded by member and round), so each one checks its own
result against the exact sum. Per round it reports: whole (== the exact sum within float rounding),
refused (``AveragingFailed``: nothing applied), and the message. Optional CPU load (busy processes),
a member SIGKILLed mid-round (the later rounds run among the survivors), and averagers started while
the member's node is busy with streams (``--fork-while-serving``, as a peer that moves does).

    .venv/bin/python benchmarks/allreduce_rounds.py --members 2 --rounds 40 [--load 2] [--kill 5] [--averager-process]
    .venv/bin/python benchmarks/allreduce_rounds.py --members 3 --rounds 30 --compare   # thread vs child process
"""

from __future__ import annotations

import harness  # before any project module: this checkout first on sys.path

import argparse
import hashlib
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SHAPES = [(256, 512), (512, 256), (52_000,), (21_216,), (131_072,)]  # 466,432 values


def _grads(member: int, step: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 * step + member)
    return [torch.randn(shape, generator=generator) for shape in SHAPES]


def _members_of(step: int, n: int, kill: int | None) -> list[int]:
    """Every member, minus the victim (the last one) in the rounds after the one it is killed in."""
    return list(range(n)) if kill is None or step <= kill else list(range(n - 1))


def _member(index: int) -> None:
    """One member: its DHT, its averager, then the rounds it takes part in; one JSON line per event."""
    import hivemind
    from hivemind.utils import get_dht_time

    from peers.training.averaging import HivemindGradientSync
    from core.errors import AveragingFailed

    setup = json.loads(sys.stdin.readline())
    dht = hivemind.DHT(initial_peers=setup["initial_peers"], host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
    _say(peer=dht.peer_id.to_base58(), maddrs=[str(m) for m in dht.get_visible_maddrs()])
    plan = json.loads(sys.stdin.readline())
    if plan["fork_while_serving"]:
        busy = _keep_streams_open(dht, plan["peers"], index)
    sync = HivemindGradientSync(dht, "allreduce_rounds", [torch.zeros(s) for s in SHAPES], window=0.5,
                                round_timeout=plan["timeout"], in_process=not plan["averager_process"])
    if plan["fork_while_serving"]:
        busy()
    _say(ready=index)
    start = float(sys.stdin.readline())  # go: the first round's start (time.time())
    for step in range(plan["rounds"]):
        members = _members_of(step, plan["n"], plan["kill"])
        if index not in members:
            break
        names = [plan["peers"][m] for m in members]
        scheduled = get_dht_time() + max(0.0, start + step * plan["period"] - time.time()) + 0.3
        began = time.perf_counter()
        try:
            summed = sync.sum(_grads(index, step), step=step, members=names, me=names[members.index(index)],
                              scheduled_time=scheduled, timeout=plan["timeout"])
        except AveragingFailed as e:
            _say(step=step, member=index, refused=str(e), seconds=time.perf_counter() - began)
            continue
        expected = [sum(parts) for parts in zip(*(_grads(m, step) for m in members))]
        error = max((a - b).abs().max().item() for a, b in zip(summed, expected))
        digest = float(sum(float(t.double().sum()) for t in summed))
        _say(step=step, member=index, error=error, digest=digest, seconds=time.perf_counter() - began,
             bits=_digest(summed))
    sync.shutdown()
    dht.shutdown()


def _digest(tensors) -> str:
    """The sums' bytes, hashed the same in every member's process (Python's ``hash`` of bytes is
    salted per process, so members' equal sums never compared equal before)."""
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()[:16]


def _keep_streams_open(dht, peers: list[str], index: int):
    """Open a stream handler that replies slowly and call the next member's one, so the averager forks
    while streams are open; returns what ends that traffic."""
    import asyncio

    import hivemind
    from hivemind.p2p import PeerID

    async def slow(_, request):
        await asyncio.sleep(0.5)
        return request

    async def setup(_, node):
        p2p = await node.replicate_p2p()
        await p2p.add_protobuf_handler("allreduce_rounds_slow", slow, hivemind.proto.test_pb2.TestRequest)
        return p2p

    p2p = dht.run_coroutine(setup)
    other = PeerID.from_base58(peers[(index + 1) % len(peers)])

    async def call(_, node):
        try:
            await p2p.call_protobuf_handler(other, "allreduce_rounds_slow", hivemind.proto.test_pb2.TestRequest(),
                                            hivemind.proto.test_pb2.TestRequest)
        except Exception:
            pass

    futures = [dht.run_coroutine(call, return_future=True) for _ in range(4)]
    time.sleep(0.1)

    def end() -> None:
        for future in futures:
            future.result(10)
    return end


def _say(**fields) -> None:
    print(json.dumps(fields), flush=True)


def _busy() -> None:
    while True:
        pass


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--members", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--period", type=float, default=1.0, help="seconds between rounds' scheduled starts")
    parser.add_argument("--timeout", type=float, default=15.0)
    parser.add_argument("--load", type=int, default=0, help="busy-loop processes beside the members")
    parser.add_argument("--kill", type=int, default=None, help="SIGKILL the last member mid-way through this round")
    parser.add_argument("--kill-delay", type=float, default=0.45, help="seconds after that round's start")
    parser.add_argument("--fork-while-serving", action="store_true")
    parser.add_argument("--averager-process", action="store_true", help="each averager in a child process")
    parser.add_argument("--compare", action="store_true", help="run the rounds with averagers on a thread, then "
                        "in a child process, and print the ratio of their median round times")
    parser.add_argument("--logdir", default=None, help="write each member's stderr there")
    parser.add_argument("--member", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.member is not None:
        return _member(args.member)
    if not args.compare:
        return _report(args, *_run(args))
    medians = {}
    for in_process in (True, False):
        args.averager_process = not in_process
        events, stderr = _run(args)
        medians[in_process] = _report(args, events, stderr)
    if None not in medians.values():
        print(f"median round: thread {medians[True]:.3f} s, child process {medians[False]:.3f} s; "
              f"child / thread = {medians[False] / medians[True]:.2f}x")


def _run(args: argparse.Namespace) -> tuple[list[dict], list[str]]:
    """The members' processes through ``args.rounds`` rounds; their events and stderr."""
    busy = [multiprocessing.Process(target=_busy, daemon=True) for _ in range(args.load)]
    [p.start() for p in busy]
    env = dict(os.environ, PYTHONPATH=str(harness.ROOT))
    logdir = Path(args.logdir or tempfile.mkdtemp(prefix="allreduce_rounds"))
    logdir.mkdir(parents=True, exist_ok=True)
    logs = [open(logdir / f"member{i}.log", "w") for i in range(args.members)]
    procs = [subprocess.Popen([sys.executable, __file__, "--member", str(i)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=log, text=True, env=env)
             for i, log in enumerate(logs)]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # (timeout's signal) still reaps the members
    events: list[dict] = []
    try:
        peers, initial = [], None
        for proc in procs:
            proc.stdin.write(json.dumps({"initial_peers": initial}) + "\n")
            proc.stdin.flush()
            hello = json.loads(proc.stdout.readline())
            peers.append(hello["peer"])
            initial = initial or hello["maddrs"]
        plan = dict(n=args.members, rounds=args.rounds, period=args.period, timeout=args.timeout, kill=args.kill,
                    peers=peers, fork_while_serving=args.fork_while_serving, averager_process=args.averager_process)
        for proc in procs:
            proc.stdin.write(json.dumps(plan) + "\n")
            proc.stdin.flush()
        for proc in procs:
            assert "ready" in json.loads(proc.stdout.readline())
        started = time.time() + 0.5
        for proc in procs:
            proc.stdin.write(f"{started}\n")
            proc.stdin.flush()
        if args.kill is not None:
            time.sleep(max(0.0, started + args.kill * args.period + 0.3 + args.kill_delay - time.time()))
            procs[-1].send_signal(signal.SIGKILL)
        deadline = time.time() + args.rounds * (args.period + args.timeout) + 60
        for proc in procs:
            for line in proc.stdout:
                events.append(json.loads(line))
            proc.wait(max(1.0, deadline - time.time()))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for p in busy:
            p.kill()
            p.join()
    [log.close() for log in logs]
    return events, [(logdir / f"member{i}.log").read_text() for i in range(args.members)]


def _report(args, events: list[dict], stderr: list[str]) -> float | None:
    """Print what the rounds came to; the median seconds of a member's round, None if none ran."""
    rounds = [e for e in events if "step" in e]
    refused = [e for e in rounds if "refused" in e]
    partial = [e for e in refused if "lost part" in e["refused"]]
    wrong = [e for e in rounds if "error" in e and e["error"] > 1e-4]
    by_step: dict[int, list[dict]] = {}
    for e in rounds:
        by_step.setdefault(e["step"], []).append(e)
    split = [s for s, es in by_step.items() if {("refused" in e) for e in es} == {True, False}]
    unequal = [s for s, es in by_step.items() if len({e["bits"] for e in es if "bits" in e}) > 1]
    warnings = sum(text.count("Averaging: received") for text in stderr)
    print(f"members {args.members}, rounds {args.rounds}, load {args.load}, kill {args.kill}, "
          f"fork-while-serving {args.fork_while_serving}, averager process {args.averager_process}")
    print(f"member-rounds: {len(rounds)}; refused {len(refused)} (partial result {len(partial)}); "
          f"applied but not the exact sum {len(wrong)}; 'received N% results' warnings {warnings}")
    print(f"rounds where some members applied and others refused (one left behind): {len(split)} {sorted(split)}")
    print(f"rounds whose applied sums were not bitwise equal on every member: {len(unequal)}")
    seconds = sorted(e["seconds"] for e in rounds)
    if seconds:
        print(f"round seconds: median {seconds[len(seconds) // 2]:.3f}, max {seconds[-1]:.3f}")
    for e in refused:
        print(f"  step {e['step']} member {e['member']}: {e['refused'][:200]}")
    if not rounds:
        print("no round ran; the members' stderr ends:", *(text[-3000:] for text in stderr), sep="\n")
    return seconds[len(seconds) // 2] if seconds else None


if __name__ == "__main__":
    main()
