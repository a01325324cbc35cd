"""Soak with churn: a 2-stage swarm with 2 replicas per stage trained for ``--minutes`` while every
``--churn-every`` seconds a random peer is killed (SIGKILL) and a new one joins (it claims the stage
that lost a replica and takes its state from the survivor). Prints completed steps (target: all),
lost steps (target 0), the run's step on the stages, and the loss at the start and the end.

    .venv/bin/python benchmarks/soak.py                  # 30 minutes, churn every 2 minutes
    .venv/bin/python benchmarks/soak.py --minutes 3 --churn-every 60
"""

from __future__ import annotations

import harness  # before any project module: this checkout first on sys.path

import random
import signal
import statistics
import threading
import time
from pathlib import Path

import torch

from trainer.model import SwarmModelForCausalLM
from swarm.procs import ProcessGroup


class _Churn(threading.Thread):
    """Every ``every`` s: SIGKILL one live peer, start a new one and wait until it serves (bounded)."""

    def __init__(self, procs: ProcessGroup, address: str, state_dir: Path, every: float, until: float):
        super().__init__(name="churn", daemon=True)
        self.procs, self.address, self.state_dir, self.every, self.until = procs, address, state_dir, every, until
        self.events: list[str] = []
        self._stop = threading.Event()
        self._next = 5

    def run(self) -> None:
        rng = random.Random(0)
        # no kill in the last minute: the newcomer would still be joining when the run ends
        while not self._stop.wait(self.every) and time.monotonic() < self.until - 60:
            live = [(n, p) for n, p in self.procs.procs if n.startswith("peer") and p.poll() is None]
            name, victim = rng.choice(live)
            victim.send_signal(signal.SIGKILL)
            victim.wait()
            newcomer = f"peer{self._next}"
            self._next += 1
            try:
                claim = self.procs.start_peer(newcomer, self.address, self.state_dir)
                self.procs.wait_for_line(newcomer, dict(self.procs.procs)[newcomer], "serving stage")
                self.events.append(f"killed {name}, {newcomer} {claim.split('claiming', 1)[1].strip()[:40]}")
            except (RuntimeError, TimeoutError) as e:
                self.events.append(f"killed {name}, {newcomer} failed to join: {e}")
            print(f"[{time.strftime('%H:%M:%S')}] {self.events[-1]}", flush=True)

    def stop(self) -> None:
        self._stop.set()


def main() -> None:
    parser = harness.parser(__doc__)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--churn-every", type=float, default=120.0)
    harness.add_batch_flags(parser, batch=4, seq=32)
    args = parser.parse_args()
    torch.set_num_threads(1)

    root, model_dir = harness.workspace("swarm-soak-", "gpt2", num_layers=4, hidden_size=64, num_heads=2)
    print(f"2 stages x 2 replicas (GPT-2 4 layers x 64), batch {args.batch}x{args.seq}, {args.minutes:g} min, "
          f"a peer killed and replaced every {args.churn_every:g} s; logs in {root}", flush=True)
    completed, lost, losses, errors = 0, 0, [], []
    churn = None
    with harness.local_swarm(root, model_dir, num_stages=2, num_peers=4, target_batch_size=args.batch,
                             lr=1e-3) as (procs, address):
        deadline = time.monotonic() + args.minutes * 60
        batches = harness.random_ids(8, args.batch, args.seq)
        try:
            with SwarmModelForCausalLM.from_pretrained(initial_peers=[address], timeout=60.0) as model:
                optimizer = model.create_optimizer()
                churn = _Churn(procs, address, root / "state", args.churn_every, deadline)
                churn.start()
                while time.monotonic() < deadline:
                    try:
                        loss = harness.train_step(model, optimizer, next(batches), overlapped=True)  # as swarm train
                    except Exception as e:  # a lost step: the figure this benchmark exists for
                        lost += 1
                        errors.append(f"{type(e).__name__}: {e}"[:200])
                        optimizer.zero_grad()
                        continue
                    completed += 1
                    losses.append(loss.item())
                run_step = model.pipeline.step
        finally:
            if churn is not None:
                churn.stop()
    print(f"completed steps: {completed}, lost steps: {lost}, run step on the stages: {run_step}")
    print(f"churn events: {len(churn.events) if churn else 0}")
    for error in errors[:5]:
        print(f"  {error}")
    if losses:
        head, tail = losses[: min(10, len(losses))], losses[-min(10, len(losses)):]
        print(f"loss: first 10 steps {statistics.mean(head):.3f} -> last 10 steps {statistics.mean(tail):.3f} "
              f"(final {losses[-1]:.3f})")


if __name__ == "__main__":
    main()
