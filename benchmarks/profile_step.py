"""Where a training step's time goes: py-spy samples a serving peer, pyinstrument the trainer, while
a 2-peer swarm on loopback trains; prints each side's functions by own time (what docs/performance.md
quotes).

    .venv/bin/python benchmarks/profile_step.py                # batch 32 x 128, GPT-2 8 layers x 256
    .venv/bin/python benchmarks/profile_step.py --steps 5 --top 25

Needs ``py-spy`` and ``pyinstrument`` (``pip install -e .[profile]``); py-spy reads another process's
memory, which needs root or ``ptrace`` permission. Uses only the public API, so the same file can
profile an older checkout: ``--root /path/to/checkout``.
"""

from __future__ import annotations

import harness  # before any project module: this checkout first on sys.path (``--root`` goes before it)

import collections
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path


def _own_time(raw: Path, top: int) -> list[tuple[float, str]]:
    """Share of samples per leaf function from py-spy's collapsed stacks (``a;b;c count``)."""
    leaves: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        leaves[frames[-1].split(" (")[0] + " (" + frames[-1].rsplit("/", 1)[-1]] += int(count)
        total += int(count)
    return [(n / max(total, 1), name) for name, n in leaves.most_common(top)]


def main() -> None:
    parser = harness.parser(__doc__)
    harness.add_batch_flags(parser, batch=32, seq=128)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--root", type=Path, default=harness.ROOT,
                        help="the checkout to profile (default: this one)")
    args = parser.parse_args()
    sys.path.insert(0, str(args.root))
    import torch
    from pyinstrument import Profiler

    from swarm.data import random_batches, stdlib_corpus
    from trainer.model import SwarmModelForCausalLM

    torch.set_num_threads(args.threads)
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    root, model_dir = harness.workspace("swarm-profile-", "gpt2", num_layers=8, hidden_size=256, num_heads=4,
                                        max_positions=max(args.seq, 128))
    with harness.local_swarm(root, model_dir, num_stages=2, num_peers=2, target_batch_size=args.batch,
                             threads=max(1, args.threads // 2)) as (procs, address):
        peer = dict(procs.procs)["peer1"]
        with SwarmModelForCausalLM.from_pretrained(initial_peers=[address]) as model:
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
            batches = random_batches(stdlib_corpus(), args.batch, args.seq, seed=0)

            def step() -> None:
                harness.train_step(model, optimizer, next(batches))

            step()
            sampler = subprocess.Popen([pyspy, "record", "--pid", str(peer.pid), "--format", "raw", "--rate", "200",
                                        "--nonblocking", "--output", str(root / "peer.txt")],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)  # py-spy attaches
            profiler = Profiler(interval=0.005)
            started = time.perf_counter()
            with profiler:
                for _ in range(args.steps):
                    step()
            seconds = (time.perf_counter() - started) / args.steps
            sampler.send_signal(signal.SIGINT)  # py-spy writes its file on Ctrl+C
            sampler.wait(timeout=30)
    print(f"checkout {args.root}; batch {args.batch}x{args.seq}; {seconds * 1000:.0f} ms/step over {args.steps} steps; "
          f"load average {os.getloadavg()[0]:.1f}")
    print("peer (stage 0), own time by function, share of py-spy samples of busy threads:")
    for share, name in _own_time(root / "peer.txt", args.top):
        print(f"  {share:6.1%}  {name}")
    print("trainer (pyinstrument, main thread):")
    print(profiler.output_text(unicode=False, color=False, show_all=False, short_mode=True)[:6000])


if __name__ == "__main__":
    main()
