"""Training throughput: the same tiny model trained (a) locally in one process and (b) through a
2-peer swarm on loopback, side by side in one run. Prints tokens/s of both and their ratio. The
swarm runs its rounds twice, interleaved: with activations pushed peer to peer (the default) and
relayed through the trainer (the same trainer with ``pipeline.push`` off), and prints that ratio too.

    .venv/bin/python benchmarks/train_throughput.py            # batch 32 x 128, GPT-2 8 layers x 256
    .venv/bin/python benchmarks/train_throughput.py --batch 8 --microbatch 0   # one microbatch: no pipelining
    .venv/bin/python benchmarks/train_throughput.py --free     # peers joined at once, no pins: placement decides
    .venv/bin/python benchmarks/train_throughput.py --free --layers 6 --hidden 96 --batch 8   # the tiny model
    .venv/bin/python benchmarks/train_throughput.py --free --uncached   # also rounds that wait for every DHT read
    .venv/bin/python benchmarks/train_throughput.py --device cuda --dtype bfloat16 --family llama --layers 16 \
        --hidden 1024 --batch 8 --seq 512   # 2 peers sharing one GPU vs the model trained on it locally

``--free`` starts the peers as volunteers do (``swarm join`` at the same moment, no ``--max-stages``)
and trains with the README's plain loop (``loss.backward(); optimizer.step()``) instead of
``train_step``. Every run prints what a swarm step costs beyond the local one, split into DHT reads,
averaging (the step calls: the replicas' all-reduce and AdamW), commit (the rest of closing a step)
and hops (the remainder: transport and waiting along the pipeline). ``--uncached`` adds, to every
round, the same swarm steps with the trainer waiting for each read of the DHT's records (as before
issue 27: ``cached_routes=False``) and prints the two side by side; ``--read-delay 100`` makes every
read 100 ms longer, as a DHT over a WAN is.

Thread budget: the local run uses ``--threads`` torch threads (default: the cores). In the swarm the
two peers get half of them each, and compute at the same time (microbatch pipelining); the trainer
(embeddings, head, loss) gets ``--threads`` too, since it computes while the peers wait for it (all
forwards, then the loss, then all backwards; pushed, the swarm trains with ``train_step`` as ``swarm
train`` does, each microbatch's loss between its forward and backward). ``--microbatch`` rows per
microbatch (default: the
model's, twice as many microbatches as stages; 0: the whole batch at once).

``--device`` puts the peers, the swarm's trainer (its embeddings and head) and the local baseline on
that device (default cpu); ``--dtype`` is the run's precision, and the local baseline computes under
the same autocast (float32 masters and AdamW on both sides). On CUDA each timed round ends with a
``torch.cuda.synchronize()``.
"""

from __future__ import annotations

import harness  # before any project module: this checkout first on sys.path

from collections import Counter
import os
import sys
import time

import torch
from transformers import AutoModelForCausalLM

from shards.devices import compute_context, resolve_device
from swarm.data import random_batches, stdlib_corpus
from trainer.model import SwarmModelForCausalLM
from peers.telemetry.hardware import compute_threads
from net.wire import WIRE_FORMATS


class _Trainer:
    """One model with its AdamW and its data, timed a round of steps at a time."""

    def __init__(self, model: torch.nn.Module, batches, *, plain: bool = False, device: str = "cpu",
                 dtype: torch.dtype = torch.float32):
        """``device`` and ``dtype``: where the batches go and the autocast a local model computes under
        (the swarm's model moves its batches and autocasts by itself)."""
        self.model, self.batches = model, batches
        # the swarm's train_step is what swarm train calls; plain: the README's loop
        self.overlapped = hasattr(model, "train_step") and not plain
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        self.device, self.dtype = resolve_device(device), dtype

    def steps(self, count: int) -> float:
        started = time.perf_counter()
        for _ in range(count):
            ids = next(self.batches).to(self.device)
            with compute_context(self.device, self.dtype):
                harness.train_step(self.model, self.optimizer, ids, overlapped=self.overlapped)
        harness.synchronize(str(self.device))
        return time.perf_counter() - started


def main() -> None:
    parser = harness.parser(__doc__)
    harness.add_batch_flags(parser, batch=32, seq=128)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10, help="steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=compute_threads(None))
    parser.add_argument("--microbatch", type=int, default=None)
    parser.add_argument("--wire", default="float32", choices=WIRE_FORMATS)
    parser.add_argument("--peers", type=int, default=2)
    parser.add_argument("--free", action="store_true", help="peers join at once with no pins; the plain loop")
    parser.add_argument("--family", default="gpt2", choices=["gpt2", "llama"], help="the model's architecture")
    parser.add_argument("--uncached", action="store_true",
                        help="also time rounds whose steps wait for every read of the DHT's records")
    parser.add_argument("--read-delay", type=float, default=0.0,
                        help="ms added to every read of the records, as a DHT over a WAN takes (emulated)")
    harness.add_device_flags(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    root, model_dir = harness.workspace("swarm-bench-", args.family, num_layers=args.layers, hidden_size=args.hidden,
                                        num_heads=max(1, args.hidden // 64), max_positions=max(args.seq, 128))
    corpus = stdlib_corpus()
    print(f"model: {args.family}, {args.layers} layers, width {args.hidden}; batch {args.batch}x{args.seq}; "
          f"device {args.device}, dtype {args.dtype}; "
          f"{args.rounds} rounds of {args.steps} steps each side, after {args.warmup} warm-up; "
          f"torch threads: local {args.threads}, each peer {max(1, args.threads // 2)}, trainer {args.threads}; "
          f"wire {args.wire}; load average {os.getloadavg()[0]:.1f}")

    local_times, swarm_times, relay_times, uncached_times = [], [], [], []
    with harness.local_swarm(root, model_dir, num_stages=2, num_peers=args.peers, target_batch_size=args.batch,
                             threads=max(1, args.threads // args.peers), wire=args.wire,
                             free=args.free, bootstrap_args=["--dtype", args.dtype],
                             peer_env=harness.peer_env(args.device)) as (_, address):
        placed = _placement(address)
        print(f"placement: {placed}")
        microbatch = args.batch if args.microbatch == 0 else args.microbatch
        with SwarmModelForCausalLM.from_pretrained(initial_peers=[address], microbatch_size=microbatch,
                                                   device=args.device) as remote:
            if args.read_delay:
                remote.pipeline.replicas.source = _delayed(remote.pipeline.replicas.source, args.read_delay / 1000)
            local = _Trainer(AutoModelForCausalLM.from_pretrained(model_dir).to(resolve_device(args.device)),
                             random_batches(corpus, args.batch, args.seq, seed=1), device=args.device, dtype=dtype)
            swarm = _Trainer(remote, random_batches(corpus, args.batch, args.seq, seed=1), plain=args.free,
                             device=args.device)
            local.steps(args.warmup), swarm.steps(args.warmup)
            costs: Counter[str] = Counter()
            uncached_costs: Counter[str] = Counter()
            # interleaved rounds, so that a noisy minute on a shared machine hits both sides alike
            for i in range(args.rounds):
                local_times.append(local.steps(args.steps))
                remote.pipeline.push = True
                # uncached first in every other round, so that neither kind always runs after the other
                for cached in ([True, False] if i % 2 == 0 else [False, True]) if args.uncached else [True]:
                    remote.pipeline.replicas.cached = cached
                    before = Counter(remote.pipeline.timings)
                    (swarm_times if cached else uncached_times).append(swarm.steps(args.steps))
                    (costs if cached else uncached_costs).update(Counter(remote.pipeline.timings) - before)
                remote.pipeline.replicas.cached = True
                remote.pipeline.push = False
                relay_times.append(swarm.steps(args.steps))
            fallbacks = remote.pipeline.push_fallbacks

    tokens = args.steps * args.batch * args.seq
    ratios = sorted(lt / st for lt, st in zip(local_times, swarm_times))
    for i, (lt, st, rt) in enumerate(zip(local_times, swarm_times, relay_times)):
        print(f"round {i + 1}: local {tokens / lt:8,.0f} tok/s   swarm {tokens / st:8,.0f} tok/s   ratio {lt / st:.2f}"
              f"   (relayed {tokens / rt:8,.0f} tok/s)")
    local_s, swarm_s = sorted(local_times)[len(local_times) // 2], sorted(swarm_times)[len(swarm_times) // 2]
    relay_s = sorted(relay_times)[len(relay_times) // 2]
    print(f"local:  {tokens / local_s:10,.0f} tokens/s  ({local_s / args.steps * 1000:.0f} ms/step, median round)")
    print(f"swarm:  {tokens / swarm_s:10,.0f} tokens/s  ({swarm_s / args.steps * 1000:.0f} ms/step, 2 peers on loopback)")
    print(f"relayed: {tokens / relay_s:9,.0f} tokens/s  (the same swarm, the trainer relaying every hop)")
    print(f"pushed/relayed: {relay_s / swarm_s:.2f}; pushes that broke and went through the trainer: {fallbacks}")
    steps = args.steps * args.rounds
    _print_beyond("a swarm step beyond a local one", swarm_times, local_times, costs, steps)
    if uncached_times:
        _print_beyond("waiting for every DHT read", uncached_times, local_times, uncached_costs, steps)
        ratios_uncached = sorted(ut / st for ut, st in zip(uncached_times, swarm_times))
        print(f"cached routes / waiting for every read: {ratios_uncached[len(ratios_uncached) // 2]:.2f}x the "
              f"tokens/s (median of {len(ratios_uncached)} rounds: "
              f"{', '.join(f'{r:.2f}' for r in ratios_uncached)})")
    target = "0.85 at the default model, 0.6 at 6 x 96" if args.free else "0.90"
    print(f"ratio swarm/local: {ratios[len(ratios) // 2]:.2f} (median of {len(ratios)} rounds; target >= {target}); "
          f"load average {os.getloadavg()[0]:.1f}")


def _delayed(source, seconds: float):
    """``source`` (the records' read) taking ``seconds`` longer."""
    import asyncio

    async def read():
        await asyncio.sleep(seconds)
        return await source()
    return read


def _print_beyond(what: str, swarm_times: list[float], local_times: list[float], costs: Counter[str],
                  steps: int) -> None:
    """What a swarm step costs beyond a local one, split by ``RemotePipeline.timings`` (DHT reads: only
    the reads the trainer waited for)."""
    beyond = (sum(swarm_times) - sum(local_times)) / steps * 1000
    named = {name: costs[name] / steps * 1000 for name in ("dht", "averaging", "commit")}
    print(f"{what}: {beyond:.0f} ms = DHT reads waited for {named['dht']:.0f} + averaging "
          f"{named['averaging']:.0f} + commit {named['commit']:.0f} + hops {beyond - sum(named.values()):.0f} "
          "(ms per step, pushed rounds)")


def _placement(address: str) -> str:
    """Who serves which stage, from the live status."""
    import json
    import subprocess

    result = subprocess.run([sys.executable, "-m", "swarm.cli", "status", "--bootstrap", address, "--json"],
                            capture_output=True, text=True, timeout=120)
    stages = json.loads(result.stdout)["stages"]
    return ", ".join(f"stage {s['index']}: {len(s['online_peers'])} replica(s)" for s in stages)


if __name__ == "__main__":
    main()
