"""Join time: from starting ``swarm join`` (a new process) to serving a stage, with the throughput
measurement already cached (a volunteer's second and later joins), side by side with the bare
Python start of the same imports.

    .venv/bin/python benchmarks/join_time.py             # 3 timed joins
    .venv/bin/python benchmarks/join_time.py --joins 5
    .venv/bin/python benchmarks/join_time.py --compare   # each join also with the DHT in a child process

A bootstrap runs on 127.0.0.1 with a 1-stage run of a small GPT-2. One ``swarm join`` measures and
caches its throughput (in its state dir), serves, and leaves. Then the same peer (same state dir)
joins ``--joins`` times: each time the clock runs from ``Popen`` until its log shows ``serving stage``
(polled every 20 ms), and it leaves again (Ctrl+C) before the next. For scale, the time a fresh
interpreter takes just to import torch, then torch, transformers and hivemind, is measured in between, and the
same with the model family's code (what any peer on this stack must import before it can serve): the
difference between a join and that floor is the swarm's own work.
Target: <= 3 s on loopback (Petals 2.2 here: 4.5-8.1 s).
"""

from __future__ import annotations

import harness  # before any project module: this checkout first on sys.path

import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from swarm.procs import ProcessGroup


def _join(procs: ProcessGroup, address: str, state_dir: Path, name: str, *, dht_process: bool = False) -> float:
    """Seconds from Popen to 'serving stage' in the peer's log; the peer then leaves. ``dht_process``:
    the peer serves its DHT in a child process (``network.dht_process``)."""
    started = time.perf_counter()
    proc = procs.start(name, ["join", "--bootstrap", address, "--host", "127.0.0.1", "--threads", "1",
                              "--state-dir", str(state_dir)],
                       env={"SWARM_NETWORK__DHT_PROCESS": "true" if dht_process else "false"})
    log = procs.logdir / f"{name}.log"
    deadline = started + 120
    while "serving stage" not in (log.read_text(errors="replace") if log.exists() else ""):
        if proc.poll() is not None or time.perf_counter() > deadline:
            raise RuntimeError(f"{name} did not serve (exit {proc.returncode}); see {log}")
        time.sleep(0.02)
    seconds = time.perf_counter() - started
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    return seconds


FLOOR_IMPORTS = "import torch, transformers, hivemind, transformers.models.gpt2.modeling_gpt2"


def _bare_imports(statement: str = "import torch, transformers, hivemind") -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", statement], check=True)
    return time.perf_counter() - started


def main() -> None:
    parser = harness.parser(__doc__)
    parser.add_argument("--joins", type=int, default=3)
    parser.add_argument("--compare", action="store_true",
                        help="after each join, the same join with the DHT in a child process (network.dht_process)")
    args = parser.parse_args()
    root, model_dir = harness.workspace("swarm-bench-", "gpt2", num_layers=4, hidden_size=128, num_heads=4,
                                        vocab_size=256)
    joins, children, imports, floors, torches = [], [], [], [], []
    print(f"load average {os.getloadavg()[0]:.1f} before")
    with harness.processes(root) as procs:
        address = procs.start_bootstrap(["--open", "--model", str(model_dir), "--num-stages", "1", "--host",
                                         "127.0.0.1", "--port", "0", "--state-dir", str(root / "boot")])
        first = _join(procs, address, root / "peer", "join0")
        for i in range(args.joins):
            torches.append(_bare_imports("import torch"))
            imports.append(_bare_imports())
            floors.append(_bare_imports(FLOOR_IMPORTS))
            joins.append(_join(procs, address, root / "peer", f"join{i + 1}"))
            if args.compare:
                children.append(_join(procs, address, root / "peer", f"child{i + 1}", dht_process=True))
    print(f"first join (measures throughput): {first:.2f} s; load average {os.getloadavg()[0]:.1f}")
    print(f"joins with the cached measurement: {', '.join(f'{s:.2f}' for s in joins)} s -> "
          f"median {statistics.median(joins):.2f} s (target <= 3 s)")
    if args.compare:
        print(f"the same with the DHT in a child process: {', '.join(f'{s:.2f}' for s in children)} s -> median "
              f"{statistics.median(children):.2f} s; on a thread / in a child: "
              f"{statistics.median(joins) / statistics.median(children):.2f}x")
    print(f"bare `import torch` in a new interpreter: median {statistics.median(torches):.2f} s "
          f"({statistics.median(torches) / statistics.median(joins):.0%} of a join)")
    print(f"bare `import torch, transformers, hivemind` in a new interpreter: median {statistics.median(imports):.2f} s "
          f"({statistics.median(imports) / statistics.median(joins):.0%} of a join)")
    floor = statistics.median(floors)
    print(f"the same plus the model's code (`{FLOOR_IMPORTS}`; it pulls in torch._dynamo through "
          f"transformers.masking_utils): median {floor:.2f} s = {floor / statistics.median(joins):.0%} of a join; "
          f"a join beyond these imports (DHT, manifest, claim, load, serve): {statistics.median(joins) - floor:.2f} s")


if __name__ == "__main__":
    main()
