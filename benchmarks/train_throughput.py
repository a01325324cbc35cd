"""Training throughput: the same tiny model trained (a) locally in one process and (b) through a
2-peer swarm on loopback, side by side in one run. Prints tokens/s of both and their ratio.

    .venv/bin/python benchmarks/train_throughput.py            # batch 8 x 128, GPT-2 8 layers x 256
    .venv/bin/python benchmarks/train_throughput.py --batch 32 --hidden 512

Thread budget: the local run uses ``--threads`` torch threads. In the swarm, the trainer and each peer
get the same ``--threads``; the pipeline runs one stage at a time (no microbatch pipelining yet), so at
any moment one process computes with that many threads.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shards.tiny import make_tiny_model  # noqa: E402
from swarm.data import random_batches, stdlib_corpus  # noqa: E402
from swarm.model import SwarmModelForCausalLM  # noqa: E402
from swarm.procs import ProcessGroup  # noqa: E402


def _timed_steps(model: torch.nn.Module, batches, steps: int, warmup: int) -> float:
    """Seconds for ``steps`` AdamW steps after ``warmup`` untimed ones."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    started = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            started = time.perf_counter()
        ids = next(batches)
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    root = Path(tempfile.mkdtemp(prefix="swarm-bench-"))
    model_dir = make_tiny_model(root / "model", "gpt2", num_layers=args.layers, hidden_size=args.hidden,
                                num_heads=max(1, args.hidden // 64), max_positions=max(args.seq, 128))
    corpus = stdlib_corpus()
    tokens = args.steps * args.batch * args.seq
    print(f"model: GPT-2, {args.layers} layers, width {args.hidden}; batch {args.batch}x{args.seq}; "
          f"{args.steps} timed steps after {args.warmup} warm-up; torch threads {args.threads}")

    local = AutoModelForCausalLM.from_pretrained(model_dir)
    local_s = _timed_steps(local, random_batches(corpus, args.batch, args.seq, seed=1), args.steps, args.warmup)
    del local

    procs = ProcessGroup(root)
    try:
        address = procs.start_swarm(model_dir, num_stages=2, num_peers=2, state_dir=root / "state",
                                    target_batch_size=args.batch, threads=args.threads)
        procs.wait_serving(2)
        with SwarmModelForCausalLM.from_pretrained(initial_peers=[address]) as remote:
            swarm_s = _timed_steps(remote, random_batches(corpus, args.batch, args.seq, seed=1), args.steps,
                                   args.warmup)
    finally:
        procs.stop_all()

    local_tps, swarm_tps = tokens / local_s, tokens / swarm_s
    print(f"local:  {local_tps:10,.0f} tokens/s  ({local_s / args.steps * 1000:.0f} ms/step)")
    print(f"swarm:  {swarm_tps:10,.0f} tokens/s  ({swarm_s / args.steps * 1000:.0f} ms/step, 2 peers on loopback)")
    print(f"ratio swarm/local: {swarm_tps / local_tps:.2f}")


if __name__ == "__main__":
    main()
