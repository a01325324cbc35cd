"""Flood: issue 22's probe, point 2. A keyed run on loopback (a bootstrap and 2 peers, one stage each,
every one a process of its own) trained by one trainer with a valid key; a stranger with a libp2p
identity and a DHT node of its own but no key sends rounds of ``--calls`` (40) concurrent stage calls of
``--mib`` (25) MiB each to peer1 for ``--flood-seconds``. Before the gate (issue 22) peer RSS went from
465 to 2,023 MiB and stayed there, and trainer steps slowed 3.6x; the target is both within noise.

    .venv/bin/python benchmarks/flood.py                                  # 30 steps a phase, 60 s of flood
    .venv/bin/python benchmarks/flood.py --steps 5 --min-seconds 5 --flood-seconds 15   # does it run

Three phases, side by side in one run: *before* (``--steps`` trainer steps and ``--min-seconds`` at
least), *during* (the flood, steps that finish while it runs), *after* (as long as before). For each:
the median step time and the flooded peer's RSS (the process with its children: DHT process, p2pd,
averager; sampled every 0.5 s): the median before, the peak during, the last sample after. Printed with
the ratios to *before* and a verdict line: PASS when the peak RSS during is within 1.2x of before and
the RSS after within 1.1x, and the median step during within 1.5x and after within 1.2x. The flooder's
own CPU (it tries to push a gigabyte a round through its p2pd) shares the machine with the trainer and the
peers, so on a small machine some of a slowdown during the flood is the flooder's, not the peer's: read
the *after* figures and the RSS first. Every loop is bounded by a deadline; everything started is
stopped on the way out.
"""

from __future__ import annotations

import harness  # before any project module: this checkout first on sys.path

import argparse
import os
import asyncio
import json
import statistics
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import psutil
import torch

from swarm.procs import ProcessGroup

RUN = "flood"
_POLL = 0.5


def trainer(args: argparse.Namespace) -> None:
    """Trains until ``args.stop`` exists or the deadline passes; one JSON line per step (when it ended,
    how long it took), flushed at once so the main process can split the steps by phase."""
    from trainer.model import SwarmModelForCausalLM

    torch.set_num_threads(1)
    deadline = time.monotonic() + args.seconds
    with open(args.out, "w") as out, SwarmModelForCausalLM.from_pretrained(
            initial_peers=[args.address], run_id=RUN, timeout=60.0, key=args.key) as model:
        optimizer = model.create_optimizer()
        batches = harness.random_ids(64, args.batch, args.seq)
        for step in harness.timed_steps(model, optimizer, batches,
                                        lambda: time.monotonic() < deadline and not Path(args.stop).exists()):
            out.write(json.dumps(step) + "\n")
            out.flush()


def flooder(args: argparse.Namespace) -> None:
    """A stranger (no key): rounds of ``args.calls`` concurrent ``args.mib`` MiB forward calls to
    ``args.target`` until the deadline; prints how many rounds and how each call ended."""
    import hivemind
    from hivemind.p2p import P2P, PeerID
    from hivemind.proto import runtime_pb2

    from peers.training.protocol import FORWARD
    from net.transport import _frames

    frames = _frames({"stage": 0}, [torch.zeros((args.mib << 20) // 4)], runtime_pb2.ExpertRequest)
    request = b"".join(P2P.MESSAGE_MARKER + len(data).to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER) + data
                       for data in (frame.SerializeToString() for frame in frames))
    dht = hivemind.DHT(initial_peers=[args.address], host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)

    async def one(p2p: P2P) -> str:
        try:
            _, reader, writer = await p2p.call_binary_stream_handler(PeerID.from_base58(args.target), FORWARD)
            with closing(writer):
                for start in range(0, len(request), 1 << 20):
                    writer.write(request[start:start + (1 << 20)])
                    await writer.drain()
                reply = await asyncio.wait_for(reader.read(4096), 10.0)
            return "answered" if reply else "closed"
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            return "reset"  # the peer stopped reading after refusing: the gate's answer
        except asyncio.TimeoutError:
            return "no reply in 10 s"
        except Exception as e:
            return type(e).__name__

    async def flood() -> None:
        p2p = await dht.replicate_p2p()
        deadline = time.monotonic() + args.seconds
        rounds, outcomes = 0, {}
        try:
            if args.continuous:  # no rounds: a new call starts the moment one ends
                rounds = await _continuous(lambda: one(p2p), args.calls, deadline, outcomes)
            while not args.continuous and time.monotonic() < deadline:
                for outcome in await asyncio.wait_for(asyncio.gather(*(one(p2p) for _ in range(args.calls))),
                                                      timeout=max(5.0, deadline - time.monotonic() + 30)):
                    outcomes[outcome] = outcomes.get(outcome, 0) + 1
                rounds += 1
        finally:
            await p2p.shutdown()
        print(json.dumps({"rounds" if not args.continuous else "calls ended": rounds, "outcomes": outcomes}), flush=True)

    try:
        asyncio.run(flood())
    finally:
        dht.shutdown()


async def _continuous(call, width: int, deadline: float, outcomes: dict[str, int]) -> int:
    """``width`` calls in flight until the deadline, each replaced as it ends; returns how many ended."""
    running: set[asyncio.Task] = set()
    ended = 0
    try:
        while time.monotonic() < deadline:
            while len(running) < width:
                running.add(asyncio.ensure_future(call()))
            done, running = await asyncio.wait(running, timeout=max(0.1, deadline - time.monotonic()),
                                                return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                outcomes[task.result()] = outcomes.get(task.result(), 0) + 1
            ended += len(done)
    finally:
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
    return ended


def _steps(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def _start_keyed_swarm(procs: ProcessGroup, root: Path, model_dir: Path, args: argparse.Namespace) -> tuple[str, str]:
    """A keyed bootstrap, a key made in its state dir, and 2 peers joining with it; (address, key)."""
    from bootstrap.state import StateDB

    state = root / "state"
    address = procs.start_bootstrap(["--model", str(model_dir), "--num-stages", "2", "--host", "127.0.0.1",
                                     "--port", "0", "--state-dir", str(state), "--run", RUN, "--dashboard-port", "0",
                                     "--target-batch-size", str(args.batch), "--lr", "1e-4"])
    db = StateDB(state / RUN / "state.db")
    try:
        key = db.create_key("flood benchmark", actor="benchmark").secret
    finally:
        db.close()
    for name in ("peer1", "peer2"):
        procs.start_peer(name, address, state, env={"SWARM_KEY": key, "SWARM_RUN_ID": RUN})
    procs.wait_serving(2)
    return address, key


def _wait(until, deadline: float, samples: list[tuple[float, int]], pid: int) -> None:
    """Sample ``pid``'s RSS every ``_POLL`` s until ``until()`` or the deadline."""
    while not until() and time.monotonic() < deadline:
        samples.append((time.monotonic(), harness.tree_rss(pid)))
        time.sleep(_POLL)


def main() -> None:
    parser = harness.parser(__doc__)
    parser.add_argument("--steps", type=int, default=30, help="trainer steps before and after the flood")
    parser.add_argument("--min-seconds", type=float, default=20.0, help="and at least this long before and after")
    parser.add_argument("--warmup", type=int, default=3, help="trainer steps left out before the first phase")
    parser.add_argument("--flood-seconds", type=float, default=60.0)
    parser.add_argument("--calls", type=int, default=40, help="concurrent unauthenticated calls a round")
    parser.add_argument("--mib", type=int, default=25, help="size of each call")
    parser.add_argument("--continuous", action="store_true",
                        help="no rounds: --calls calls always in flight, each replaced the moment it ends "
                             "(an attacker that does not wait for its slowest call)")
    harness.add_batch_flags(parser, batch=4, seq=32)
    parser.add_argument("--isolate", action="store_true",
                        help="the flooder (and its DHT process and p2pd) on the last core, the swarm on the others: "
                             "on one small machine the attacker's own CPU would otherwise slow the swarm")
    for hidden in ("--trainer", "--flooder"):
        parser.add_argument(hidden, action="store_true", help=argparse.SUPPRESS)
    for hidden in ("--address", "--key", "--target", "--out", "--stop"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trainer:
        return trainer(args)
    if args.flooder:
        if args.isolate:  # the attacker's machine: its own core, and its DHT process and p2pd with it
            os.sched_setaffinity(0, {os.cpu_count() - 1})
        return flooder(args)
    if args.isolate:  # the swarm keeps the other cores, so the flood's own CPU is not the swarm's
        os.sched_setaffinity(0, set(range(os.cpu_count() - 1)))

    root, model_dir = harness.workspace("swarm-flood-", "gpt2", num_layers=2, hidden_size=64, num_heads=2)
    print(f"keyed run, 2 peers x 1 stage (GPT-2 2 layers x 64), batch {args.batch}x{args.seq}; flood: rounds of "
          f"{args.calls} x {args.mib} MiB unauthenticated calls to peer1 for {args.flood_seconds:g} s; logs in {root}",
          flush=True)
    children: list[subprocess.Popen] = []
    steps_file, stop = root / "steps.jsonl", root / "stop"
    samples: list[tuple[float, int]] = []
    marks: dict[str, float] = {}
    peer_cpu: dict[str, float] = {}
    flood_cpu: list[float] = []
    flood_result = ""
    with harness.processes(root) as procs:
        try:
            address, key = _start_keyed_swarm(procs, root, model_dir, args)
            target, pid = procs.peer_id("peer1"), dict(procs.procs)["peer1"].pid
            budget = 600 + 60 * args.steps + args.flood_seconds  # the trainer's own bound
            children.append(subprocess.Popen(
                [sys.executable, __file__, "--trainer", "--address", address, "--key", key, "--seconds", str(budget),
                 "--out", str(steps_file), "--stop", str(stop), "--batch", str(args.batch), "--seq", str(args.seq)],
                stdout=open(root / "trainer.log", "w"), stderr=subprocess.STDOUT, start_new_session=True))
            deadline = time.monotonic() + budget

            def done(count: int, seconds: float = 0.0):
                until = time.monotonic() + seconds
                return lambda: (len(_steps(steps_file)) >= count and time.monotonic() >= until
                                or children[0].poll() is not None)

            _wait(done(args.warmup), deadline, [], pid)
            marks["before"] = time.monotonic()
            peer_cpu["before"] = harness.tree_cpu(pid)
            _wait(done(len(_steps(steps_file)) + args.steps, args.min_seconds), deadline, samples, pid)
            marks["during"] = time.monotonic()
            flood = subprocess.Popen(
                [sys.executable, __file__, "--flooder", "--address", address, "--target", target, "--seconds",
                 str(args.flood_seconds), "--calls", str(args.calls), "--mib", str(args.mib)]
                + (["--isolate"] if args.isolate else []) + (["--continuous"] if args.continuous else []),
                stdout=subprocess.PIPE, stderr=open(root / "flooder.log", "w"), text=True, start_new_session=True)
            children.append(flood)
            flood_deadline = min(deadline, time.monotonic() + args.flood_seconds + 180)
            flood_cpu = [harness.tree_cpu(flood.pid)]
            peer_cpu["during"] = harness.tree_cpu(pid)
            _wait(lambda: flood.poll() is not None or time.monotonic() >= marks["during"] + args.flood_seconds,
                  flood_deadline, samples, pid)
            flood_cpu.append(harness.tree_cpu(flood.pid))  # just before the flooder ends: its children still count
            peer_cpu["flooded"], marks["flooded"] = harness.tree_cpu(pid), time.monotonic()
            _wait(lambda: flood.poll() is not None, flood_deadline, samples, pid)
            flood_result = flood.stdout.read().strip() if flood.poll() is not None else "(killed: past its bound)"
            marks["after"] = time.monotonic()
            _wait(done(len(_steps(steps_file)) + args.steps, args.min_seconds), deadline, samples, pid)
            marks["end"] = time.monotonic()
        finally:
            stop.touch()
            for child in children:
                harness.wait_or_kill(child, 60)
    _report(_steps(steps_file), samples, marks, flood_result)
    if len(flood_cpu) == 2 and "flooded" in marks:
        cores = lambda cpu, a, b: cpu / max(marks[b] - marks[a], 1e-9)  # noqa: E731
        print(f"CPU (cores busy): peer1 and its children {cores(peer_cpu['during'] - peer_cpu['before'], 'before', 'during'):.2f} "
              f"before, {cores(peer_cpu['flooded'] - peer_cpu['during'], 'during', 'flooded'):.2f} during the flood; "
              f"the flooder and its DHT/p2pd {cores(flood_cpu[1] - flood_cpu[0], 'during', 'flooded'):.2f} "
              f"(of {psutil.cpu_count()} cores: what the flood itself takes from the trainer and peers)")


def _report(steps: list[dict], samples: list[tuple[float, int]], marks: dict[str, float], flood: str) -> None:
    phases = [("before", "during"), ("during", "after"), ("after", "end")]
    if len(marks) < 4:
        print(f"incomplete run (phases reached: {', '.join(marks)}); see the logs")
        return
    print(f"flooder: {flood}")
    errors = [s["error"] for s in steps if "error" in s]
    print(f"trainer steps: {len(steps)}, failed: {len(errors)}" + (f" (first: {errors[0]})" if errors else ""))
    took, rss = {}, {}
    for name, end in phases:
        inside = [s["took"] for s in steps if "took" in s and marks[name] <= s["end"] < marks[end]]
        took[name] = statistics.median(inside) if inside else float("nan")
        mem = [r for t, r in samples if marks[name] <= t < marks[end] and r]
        pick, how = {"before": (statistics.median, "median"), "during": (max, "peak"),
                     "after": (lambda m: m[-1], "last")}[name]
        rss[name] = pick(mem) / 2**20 if mem else float("nan")
        print(f"{name:>6}: {len(inside):3d} steps, median step {took[name] * 1000:8,.0f} ms "
              f"({took[name] / took['before']:.2f}x);  peer1 RSS {rss[name]:7,.0f} MiB "
              f"({rss[name] / rss['before']:.2f}x, {how})")
    ok = (rss["during"] <= 1.2 * rss["before"] and rss["after"] <= 1.1 * rss["before"]
          and took["during"] <= 1.5 * took["before"] and took["after"] <= 1.2 * took["before"])
    print(f"VERDICT: {'PASS' if ok else 'FAIL'} (RSS during {rss['during'] / rss['before']:.2f}x <= 1.2, after "
          f"{rss['after'] / rss['before']:.2f}x <= 1.1; step during {took['during'] / took['before']:.2f}x <= 1.5, "
          f"after {took['after'] / took['before']:.2f}x <= 1.2)")


if __name__ == "__main__":
    main()
