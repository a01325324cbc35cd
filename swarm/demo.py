"""``swarm demo``: a whole swarm on 127.0.0.1, each part in its own process as on separate machines.

1. build a tiny GPT-2 (byte-level vocabulary) from a config and ``save_pretrained`` it,
2. start ``swarm bootstrap`` on it, then the peers one after another (each claims the least-covered
   stage, so they spread over the stages), then ``swarm train`` with its live progress bar,
3. print the first and last loss and a sample, and stop every process (SIGTERM, then wait).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from shards.tiny import make_tiny_model
from swarm.procs import ProcessGroup

__all__ = ["run_demo", "DEMO_MODEL"]

DEMO_MODEL = dict(family="gpt2", num_layers=6, hidden_size=128, num_heads=4, vocab_size=256, max_positions=128)
DEMO_LR = 1e-3


def run_demo(*, steps: int, num_peers: int, workdir: Path | None, console: Console) -> int:
    """Run the demo; returns the process exit code (0 when the loss clearly fell)."""
    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="swarm-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    console.rule("[bold]swarm demo")
    with console.status("building a tiny GPT-2 from a config..."):
        model_dir = make_tiny_model(root / "model", **DEMO_MODEL)
    console.print(f"model: {escape(str(model_dir))} ({DEMO_MODEL['num_layers']} layers, width {DEMO_MODEL['hidden_size']}, "
                  f"byte-level vocabulary); logs in {escape(str(root))}")
    procs = ProcessGroup(root)
    try:
        with console.status(f"starting the bootstrap and {num_peers} peers..."):
            address = procs.start_swarm(
                model_dir, num_stages=num_peers, num_peers=num_peers, state_dir=root / "state", lr=DEMO_LR,
                on_peer=lambda i, claim: console.print(f"peer {i + 1}: {claim}", markup=False),
            )
        console.print(f"bootstrap up: [cyan]swarm join --bootstrap {escape(address)}[/]")
        result_path = root / "result.json"
        trainer = procs.start("trainer", ["train", "--bootstrap", address, "--steps", str(steps),
                                          "--result-json", str(result_path)], log=False)
        if trainer.wait() != 0:
            console.print(f"[red]the trainer failed (exit {trainer.returncode}); logs in {escape(str(root))}")
            return 1
        result = json.loads(result_path.read_text())
    except (RuntimeError, TimeoutError) as e:
        console.print(f"[red]demo failed:[/] {escape(str(e))}")
        return 1
    except KeyboardInterrupt:
        console.print("interrupted: stopping every process...")
        return 130
    finally:
        with console.status("stopping the peers and the bootstrap..."):
            procs.stop_all()
    first, last = result["first_loss"], result["last_loss"]
    fell = last < first * 0.8
    verdict = "[bold green]the loss fell[/]" if fell else "[bold red]the loss did not fall enough[/]"
    console.print(f"{verdict}: {first:.3f} -> {last:.3f} over {steps} steps; every process stopped.")
    return 0 if fell else 1
