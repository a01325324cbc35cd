"""Fault tolerance figures, measured side by side in one run (see benchmarks/README.md):

1. a step in which a peer is killed (SIGKILL, the trainer finds it dead on its first call to it)
   and one in which a peer is killed mid-step, each as a multiple of the median normal step with
   the same replicas (2 per stage): target <= 1.1x while a live replica exists;
2. the cost of keeping replicas in sync: the median step with 2 replicas per stage (their gradients
   averaged with hivemind each step) against 1 replica per stage, on the same swarm;
3. a lone replica's step against plain AdamW on the same module (no matchmaking, no process).

    .venv/bin/python benchmarks/recovery.py [--steps 8]
"""

from __future__ import annotations

import harness  # before any project module: this checkout first on sys.path

import argparse
import signal
import statistics
import threading
import time
from pathlib import Path

import torch

from dht.schemas import OptimizerSettings
from peers.training.executor import StageExecutor
from peers.training.protocol import StepRequest
from shards import load_stage, resolve_model, stage_boundaries
from swarm.demo import DEMO_MODEL
from trainer.model import SwarmModelForCausalLM
from trainer.pipeline import FaultPolicy
from swarm.procs import ProcessGroup

BATCH, SEQ = 8, 128


def _step(model, optimizer, ids) -> float:
    started = time.perf_counter()
    harness.train_step(model, optimizer, ids)
    return time.perf_counter() - started


def _median_step(model, optimizer, batches, n: int) -> float:
    return statistics.median(_step(model, optimizer, next(batches)) for _ in range(n))


def _peer_of(procs: ProcessGroup, peer_id: str):
    for name, proc in procs.procs:
        if name.startswith("peer") and peer_id in (procs.logdir / f"{name}.log").read_text():
            return name, proc
    raise LookupError(peer_id)


def _kill(proc) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _lone_replica_vs_adamw(model_dir: Path, repeats: int = 20) -> tuple[float, float]:
    source = resolve_model(str(model_dir))
    layers = stage_boundaries(source.config.num_hidden_layers, 2)[0]
    settings = OptimizerSettings(lr=1e-3)
    executor = StageExecutor(load_stage(source, layers), 0, layers, settings)
    plain = load_stage(source, layers)
    adamw = torch.optim.AdamW(plain.parameters(), lr=settings.lr, betas=settings.betas, eps=settings.eps,
                              weight_decay=settings.weight_decay)
    hidden = torch.randn(BATCH, SEQ, source.config.hidden_size)
    ours, theirs = [], []
    for step in range(repeats):
        for module in (executor.module, plain):
            module(hidden).pow(2).mean().backward()
        started = time.perf_counter()
        executor.apply_step(StepRequest(stage=0, layers=layers, step=step, members=["me"]), "me")
        ours.append(time.perf_counter() - started)
        started = time.perf_counter()
        adamw.step()
        adamw.zero_grad(set_to_none=True)
        theirs.append(time.perf_counter() - started)
    return statistics.median(ours), statistics.median(theirs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="normal steps per median")
    args = parser.parse_args()
    torch.set_num_threads(1)
    root, model_dir = harness.workspace("swarm-recovery-", **DEMO_MODEL)
    with harness.local_swarm(root, model_dir, num_stages=2, num_peers=4) as (procs, address):
        policy = FaultPolicy(averaging_window=0.3)
        with SwarmModelForCausalLM.from_pretrained(initial_peers=[address], policy=policy) as model:
            optimizer = model.create_optimizer()
            batches = harness.random_ids(256, BATCH, SEQ)
            _median_step(model, optimizer, batches, 3)  # warm up
            normal = _median_step(model, optimizer, batches, args.steps)

            route = model._runner.run(model.pipeline.route())
            _, victim = _peer_of(procs, route[1].peer_id)
            _kill(victim)  # dead before the step: the trainer finds out on its first call to it
            killed_before = _step(model, optimizer, next(batches))

            route = model._runner.run(model.pipeline.route())
            _, victim = _peer_of(procs, route[0].peer_id)
            timer = threading.Timer(normal / 2, _kill, args=(victim,))  # dies half-way through the step
            timer.start()
            killed_during = _step(model, optimizer, next(batches))
            timer.join()
            lone = _median_step(model, optimizer, batches, args.steps)  # one replica per stage left
            failovers = model.pipeline.failovers
    ours, adamw = _lone_replica_vs_adamw(model_dir)
    print(f"model: GPT-2 {DEMO_MODEL['num_layers']} layers x {DEMO_MODEL['hidden_size']}, batch {BATCH}x{SEQ}, "
          f"2 stages; averaging window {policy.averaging_window} s")
    print(f"normal step, 2 replicas per stage:      {normal * 1000:8.1f} ms")
    print(f"step with a peer dead before it:        {killed_before * 1000:8.1f} ms  ({killed_before / normal:.2f}x)")
    print(f"step with a peer killed mid-step:       {killed_during * 1000:8.1f} ms  ({killed_during / normal:.2f}x)")
    print(f"normal step, 1 replica per stage:       {lone * 1000:8.1f} ms  (2 replicas cost {normal / lone:.2f}x)")
    print(f"lone replica's step vs plain AdamW:     {ours * 1e3:8.2f} ms vs {adamw * 1e3:.2f} ms ({ours / adamw:.2f}x)")
    print(f"failovers: {failovers}; logs in {root}")


if __name__ == "__main__":
    main()
