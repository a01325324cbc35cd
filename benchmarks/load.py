"""Load: a 3-peer swarm (3 stages, one peer each) trained by 8 concurrent trainers for ``--minutes``,
all on loopback, every process bounded. Prints throughput, p50/p99 step time, the error count
(target 0) and each peer's RSS growth after warm-up (target < 10%).

    .venv/bin/python benchmarks/load.py                 # 10 minutes, 8 trainers
    .venv/bin/python benchmarks/load.py --minutes 2     # a short run

Each trainer is a process of its own (``--worker``) that trains the run's model with batches of
``--batch`` x ``--seq`` until its deadline and writes its step times and errors as JSON. The run's
target batch is one batch of every trainer, so the 8 close each collaborative step together. RSS is
the peer process with its children (DHT process, p2pd, averager), sampled every 10 s; warm-up is the
first ``--warmup`` fraction of the run. Also counted: steps whose trainers could not sum their local
parts with each other (a logged warning; each then steps its own).
"""

from __future__ import annotations

import harness  # before any project module: this checkout first on sys.path

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch


def worker(args: argparse.Namespace) -> None:
    """One trainer: steps until the deadline, every step timed, every failure counted (and survived)."""
    from trainer.model import SwarmModelForCausalLM

    torch.set_num_threads(1)
    deadline = time.monotonic() + args.seconds
    result: dict = {"steps": [], "errors": [], "losses": []}
    with SwarmModelForCausalLM.from_pretrained(initial_peers=[args.address], timeout=60.0) as model:
        optimizer = model.create_optimizer()  # sums the local parts with the other trainers
        batches = harness.random_ids(64, args.batch, args.seq, seed=args.seed)
        for step in harness.timed_steps(model, optimizer, batches, lambda: time.monotonic() < deadline):
            if "error" in step:  # counted: the benchmark's error figure
                result["errors"].append(step["error"])
                continue
            result["steps"].append([step["end"], step["took"]])
            result["losses"].append(step["loss"])
    Path(args.out).write_text(json.dumps(result))


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def main() -> None:
    parser = harness.parser(__doc__)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--trainers", type=int, default=8)
    harness.add_batch_flags(parser, batch=2, seq=32)
    parser.add_argument("--warmup", type=float, default=0.25, help="fraction of the run before RSS is measured")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--address", help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    root, model_dir = harness.workspace("swarm-load-", "gpt2", num_layers=3, hidden_size=64, num_heads=2)
    seconds = args.minutes * 60
    print(f"3 peers x 1 stage (GPT-2 3 layers x 64), {args.trainers} trainers, batch {args.batch}x{args.seq}, "
          f"{args.minutes:g} min, logs in {root}", flush=True)
    trainers: list[subprocess.Popen] = []
    samples: dict[str, list[tuple[float, int]]] = {}
    with harness.local_swarm(root, model_dir, num_stages=3, num_peers=3, target_batch_size=args.batch * args.trainers,
                             lr=1e-4) as (procs, address):
        peers = {name: proc.pid for name, proc in procs.procs if name.startswith("peer")}
        started = time.monotonic()
        try:
            for i in range(args.trainers):
                trainers.append(subprocess.Popen(
                    [sys.executable, __file__, "--worker", "--address", address, "--seconds", str(seconds),
                     "--seed", str(i), "--out", str(root / f"trainer{i}.json"), "--batch", str(args.batch),
                     "--seq", str(args.seq)],
                    stdout=open(root / f"trainer{i}.log", "w"), stderr=subprocess.STDOUT, start_new_session=True))
            deadline = started + seconds + 240  # start-up of every trainer and its last step: bounded
            while any(t.poll() is None for t in trainers) and time.monotonic() < deadline:
                for name, pid in peers.items():
                    samples.setdefault(name, []).append((time.monotonic() - started, harness.tree_rss(pid)))
                time.sleep(10)
        finally:
            for t in trainers:
                if t.poll() is None:
                    t.kill()
                    t.wait()
    _report(root, args, samples)


def _report(root: Path, args: argparse.Namespace, samples: dict[str, list[tuple[float, int]]]) -> None:
    steps, errors, tokens, missing = [], [], 0, 0
    for i in range(args.trainers):
        path = root / f"trainer{i}.json"
        if not path.is_file():
            missing += 1
            continue
        result = json.loads(path.read_text())
        steps += [duration for _, duration in result["steps"]]
        errors += result["errors"]
        tokens += len(result["steps"]) * args.batch * args.seq
    span = max((t for s in samples.values() for t, _ in s), default=1.0)
    print(f"steps: {len(steps)} ({len(steps) / span * 60:.1f}/min over {span:.0f} s), "
          f"throughput {tokens / span:,.0f} tokens/s")
    if steps:
        print(f"step time: p50 {statistics.median(steps) * 1000:,.0f} ms, p99 {_percentile(steps, 0.99) * 1000:,.0f} ms")
    print(f"errors: {len(errors)} (trainers without a result: {missing})")
    unsynced = sum(log.read_text(errors="replace").count("could not sum local gradients")
                   for log in root.glob("trainer*.log"))
    print(f"steps whose local parts (embeddings, head) were not summed with the other trainers "
          f"(a warning, the step goes on): {unsynced} over all trainers")
    for error in sorted(set(errors))[:5]:
        print(f"  {error}")
    warm = args.warmup * span
    for name, series in sorted(samples.items()):
        after = [rss for t, rss in series if t >= warm and rss]
        if len(after) >= 2:
            growth = (after[-1] - after[0]) / after[0] * 100
            print(f"{name} RSS (with its DHT, p2pd, averager): {after[0] / 2**20:,.0f} MiB after warm-up -> "
                  f"{after[-1] / 2**20:,.0f} MiB at the end: {growth:+.1f}%")


if __name__ == "__main__":
    main()
