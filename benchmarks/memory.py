"""Memory of a peer: idle and peak PSS over its whole process tree (the swarm process, p2pd, and its DHT
and averager children when ``network.dht_process`` / ``peer.averager_process`` ask for them), serving half of a Llama-style model of width 512 and 8 layers
(vocabulary 32000), against what its stage must hold: parameters + gradients + AdamW's two moments.

    .venv/bin/python benchmarks/memory.py
    .venv/bin/python benchmarks/memory.py --steps 10 --batch 8
    .venv/bin/python benchmarks/memory.py --compare    # the DHT on a thread, then in a child process

A bootstrap and two peers (``swarm join --max-stages 1``, one thread each) run on 127.0.0.1; the one
serving stage 0 (layers 0-3) is measured. *Idle*: a few seconds after it serves, before any request.
*Peak*: the largest sum sampled every 100 ms while a trainer in this process trains ``--steps``
steps of batch ``--batch`` x ``--seq`` through it. PSS (proportional set size) counts each shared
page once over all processes that map it, so libraries shared with the other peers on this machine
are not counted twice; RSS is printed beside it. Target: idle <= 450 MiB (issue 27; issue 10 asked 300, below the floor it prints; Petals 2.2 here: 624 MiB
for the same 4 layers).
"""

from __future__ import annotations

import harness  # before any project module: this checkout first on sys.path

import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import torch

from swarm.data import random_batches, stdlib_corpus
from trainer.model import SwarmModelForCausalLM

MiB = 2**20


class _Sampler(threading.Thread):
    """Samples a process tree's PSS every ``period`` s and keeps the largest."""

    def __init__(self, pid: int, period: float = 0.1):
        super().__init__(daemon=True)
        self.pid, self.period, self.peak = pid, period, (0, 0, 0)
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak = max(self.peak, harness.tree_memory(self.pid))
            self._stop_event.wait(self.period)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


FLOOR_IMPORTS = "import torch, transformers, hivemind, transformers.models.llama.modeling_llama"


def interpreter_floor() -> int:
    """PSS of an idle interpreter that has imported only what any peer on this stack must (torch,
    transformers, hivemind and the model's code), measured beside the running swarm so that shared
    library pages are split the same way."""
    code = f"{FLOOR_IMPORTS}; import sys, time; print('ready', flush=True); sys.stdin.read()"
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the floor interpreter did not start")
        time.sleep(1.0)
        return psutil.Process(proc.pid).memory_full_info().pss
    finally:
        proc.kill()
        proc.wait()


def _stage_bytes(model_dir: Path, layers: range) -> int:
    from shards import LayerRange, load_stage, resolve_model

    module = load_stage(resolve_model(str(model_dir)), LayerRange(start=layers.start, end=layers.stop))
    return sum(p.numel() * p.element_size() for p in module.parameters())


def main() -> None:
    parser = harness.parser(__doc__)
    parser.add_argument("--steps", type=int, default=5)
    harness.add_batch_flags(parser, batch=8, seq=128)
    parser.add_argument("--idle-wait", type=float, default=5.0)
    parser.add_argument("--dht-process", action="store_true",
                        help="the peers serve their DHT in a child process (network.dht_process)")
    parser.add_argument("--compare", action="store_true",
                        help="measure the DHT on a thread, then in a child process, back to back")
    args = parser.parse_args()
    torch.set_num_threads(1)
    root, model_dir = harness.workspace("swarm-bench-", "llama", num_layers=8, hidden_size=512, num_heads=8,
                                        vocab_size=32000, max_positions=max(args.seq, 128))
    weights = _stage_bytes(model_dir, range(0, 4))
    print(f"peer serving stage 0 = layers 0-3 of Llama-style 8 x 512 (vocab 32000); load average "
          f"{os.getloadavg()[0]:.1f} before")
    print(f"stage state: weights {weights / MiB:.1f} MiB -> weights + gradients + AdamW moments "
          f"{4 * weights / MiB:.1f} MiB")
    modes = [False, True] if args.compare else [args.dht_process]
    idles = [_measure(args, root / f"dht-process-{mode}", model_dir, weights, dht_process=mode) for mode in modes]
    if args.compare:
        print(f"idle PSS, DHT on a thread / in a child process: {idles[0] / MiB:.1f} / {idles[1] / MiB:.1f} MiB "
              f"= {idles[0] / idles[1]:.2f}x; load average {os.getloadavg()[0]:.1f} after")


def _measure(args: argparse.Namespace, root: Path, model_dir: Path, weights: int, *, dht_process: bool) -> int:
    """Start the swarm (its peers' DHT in a child process or not), print the figures; the idle PSS."""
    root.mkdir(parents=True, exist_ok=True)
    env = {"SWARM_NETWORK__DHT_PROCESS": "true" if dht_process else "false"}
    with harness.local_swarm(root, model_dir, num_stages=2, num_peers=2, target_batch_size=args.batch,
                             peer_env=env) as (procs, address):
        stage0 = next(proc for name, proc in procs.procs
                      if name.startswith("peer") and "stage 0" in (root / f"{name}.log").read_text())
        time.sleep(args.idle_wait)
        parts: list[str] = []
        idle = harness.tree_memory(stage0.pid, parts)
        p2pd = sum(proc.memory_full_info().pss for proc in psutil.Process(stage0.pid).children(recursive=True)
                   if proc.name() == "p2pd")
        floor = interpreter_floor()
        sampler = _Sampler(stage0.pid)
        sampler.start()
        with SwarmModelForCausalLM.from_pretrained(initial_peers=[address]) as model:
            optimizer = model.create_optimizer()
            batches = random_batches(stdlib_corpus(), args.batch, args.seq, seed=0)
            for _ in range(args.steps):
                harness.train_step(model, optimizer, next(batches) % 256)
        sampler.stop()
        peak = sampler.peak
    print(f"-- the DHT {'in a child process' if dht_process else 'on a thread of the peer'}; load average "
          f"{os.getloadavg()[0]:.1f}")
    print(f"idle: PSS {idle[0] / MiB:6.1f} MiB (RSS {idle[1] / MiB:6.1f} MiB) over {idle[2]} processes "
          f"(target <= 450 MiB)")
    print("\n".join(parts))
    print(f"peak while training {args.steps} steps of {args.batch}x{args.seq}: PSS {peak[0] / MiB:6.1f} MiB "
          f"(RSS {peak[1] / MiB:6.1f} MiB) over {peak[2]} processes")
    print(f"idle PSS beyond the stage's state: {(idle[0] - 4 * weights) / MiB:.1f} MiB; peak beyond it: "
          f"{(peak[0] - 4 * weights) / MiB:.1f} MiB")
    print(f"floor of any peer on this stack: an idle interpreter after `{FLOOR_IMPORTS}` {floor / MiB:.1f} MiB "
          f"+ p2pd {p2pd / MiB:.1f} MiB + the stage's weights {weights / MiB:.1f} MiB = "
          f"{(floor + p2pd + weights) / MiB:.1f} MiB; this peer idles at {idle[0] / (floor + p2pd + weights):.2f}x it")
    return idle[0]


if __name__ == "__main__":
    main()
