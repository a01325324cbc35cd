"""The ``swarm`` command: a thin projection of ``SwarmSettings`` onto the flags people type daily.

Every failure a person can cause (bad flags, a broken config, an unreadable model, an unreachable
bootstrap) ends in one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any, Awaitable, Callable, Optional

import typer
import uvloop
from rich.console import Console
from rich.logging import RichHandler

from swarm.config import SwarmSettings, load_settings
from swarm.errors import SwarmError

__all__ = ["app", "main"]

app = typer.Typer(
    name="swarm",
    help="Train transformer language models on volunteer machines.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(stderr=True)
logger = logging.getLogger("swarm")

ConfigOpt = typer.Option(None, "--config", help="TOML config file (default: ./swarm.toml if present)")
RunOpt = typer.Option(None, "--run", help="run id (default: swarm)")
HostOpt = typer.Option(None, "--host", help="address to listen on (e.g. 127.0.0.1)")
PortOpt = typer.Option(None, "--port", help="TCP port to listen on (0: any free port)")
StateOpt = typer.Option(None, "--state-dir", help="where identity, manifest and logs are kept")
LogOpt = typer.Option(None, "--log-level", help="DEBUG, INFO, WARNING or ERROR")


def _settings(config: Optional[Path], **overrides: Any) -> SwarmSettings:
    settings = load_settings(config, **overrides)
    _setup_logging(settings.log_level)
    return settings


def _setup_logging(level: str) -> None:
    if console.is_terminal:
        handler: logging.Handler = RichHandler(console=console, show_path=False, rich_tracebacks=False)
        fmt = "%(message)s"
    else:  # a log file: one unwrapped line per record, so it can be grepped
        handler, fmt = logging.StreamHandler(sys.stderr), "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=logging.WARNING, handlers=[handler], format=fmt, force=True)
    for name in ("swarm", "peers", "dht", "shards", "bootstrap", "delegation"):
        logging.getLogger(name).setLevel(level)


def _run_until_signal(start: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run ``start(stop_event)`` on uvloop; SIGINT/SIGTERM set the event so it can shut down cleanly."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await start(stop)

    uvloop.run(main())


def _interrupt_on_sigterm() -> None:
    """Synchronous commands stop on SIGTERM as on Ctrl+C: through KeyboardInterrupt, so their
    ``with`` blocks release the DHT process and p2pd instead of dying around them."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


@app.command()
def bootstrap(
    model: Optional[str] = typer.Option(None, "--model", help="HF hub id or local model directory"),
    num_stages: Optional[int] = typer.Option(None, "--num-stages", help="how many stages to cut the layers into"),
    target_batch_size: Optional[int] = typer.Option(None, "--target-batch-size", help="sequences per step"),
    lr: Optional[float] = typer.Option(None, "--lr", help="AdamW learning rate (default 1e-4)"),
    host: Optional[str] = HostOpt,
    port: Optional[int] = PortOpt,
    run: Optional[str] = RunOpt,
    state_dir: Optional[Path] = StateOpt,
    config: Optional[Path] = ConfigOpt,
    log_level: Optional[str] = LogOpt,
) -> None:
    """Start a run: publish its manifest and print the line volunteers paste to join."""
    from bootstrap.node import BootstrapNode

    settings = _settings(
        config, run_id=run, state_dir=state_dir, log_level=log_level,
        network={"host": host, "port": port},
        bootstrap={"model": model, "num_stages": num_stages, "target_batch_size": target_batch_size, "lr": lr},
    )

    async def serve(stop: asyncio.Event) -> None:
        async with BootstrapNode(settings) as node:
            manifest = node.manifest
            (node.state_dir / "maddrs.json").write_text(json.dumps(node.maddrs))
            console.print(f"[bold green]run {manifest.run_id!r}[/]: {manifest.model}, {manifest.num_layers} "
                          f"layers in {manifest.num_stages} stages {[s.as_list() for s in manifest.stages]}")
            console.print("volunteers join with:")
            print(node.join_command(), flush=True)
            await stop.wait()
            console.print("stopping the bootstrap...")

    _run_until_signal(serve)


@app.command()
def join(
    bootstrap_addr: Optional[list[str]] = typer.Option(None, "--bootstrap", help="multiaddr of the bootstrap (repeatable)"),
    stage: Optional[int] = typer.Option(None, "--stage", help="serve this stage instead of the least covered"),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch threads for compute"),
    host: Optional[str] = HostOpt,
    port: Optional[int] = PortOpt,
    state_dir: Optional[Path] = StateOpt,
    run: Optional[str] = RunOpt,
    config: Optional[Path] = ConfigOpt,
    log_level: Optional[str] = LogOpt,
) -> None:
    """Join a run: claim the least-covered stage, load its layers, serve until Ctrl+C."""
    from peers.server import Peer

    settings = _settings(
        config, run_id=run, state_dir=state_dir, log_level=log_level,
        network={"host": host, "port": port, "initial_peers": bootstrap_addr or None},
        peer={"stage": stage, "threads": threads},
    )

    async def serve(stop: asyncio.Event) -> None:
        peer = Peer(settings)
        start = asyncio.create_task(peer.start())
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait({start, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if not start.done():  # Ctrl+C while still joining or loading
            start.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await start
            await peer.stop()
            return
        start.result()
        console.print(f"[bold green]serving[/] stage {peer.record.stage} (layers {peer.record.layers}) "
                      f"as {peer.peer_id}; Ctrl+C to leave")
        await stop.wait()
        console.print("leaving the swarm...")
        await peer.stop()

    _run_until_signal(serve)


@app.command()
def status(
    bootstrap_addr: Optional[list[str]] = typer.Option(None, "--bootstrap", help="multiaddr of any peer of the run"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object instead of the table"),
    run: Optional[str] = RunOpt,
    config: Optional[Path] = ConfigOpt,
    log_level: Optional[str] = LogOpt,
) -> None:
    """Show the run's stages, the peers serving each, and their state."""
    from dht.records import SwarmDHT
    from swarm.status import collect_status, render_status

    settings = _settings(config, run_id=run, log_level=log_level or "WARNING",
                         network={"initial_peers": bootstrap_addr or None})
    if not settings.network.initial_peers:
        raise SwarmError("status needs --bootstrap (the multiaddr the bootstrap printed)")
    dht = SwarmDHT.create_client(settings.run_id, settings.network.initial_peers)
    try:
        report = asyncio.run(collect_status(dht))
    finally:
        dht.shutdown()
    if as_json:
        print(json.dumps(report))
    else:
        Console().print(render_status(report))


@app.command("train")
def train_command(
    bootstrap_addr: Optional[list[str]] = typer.Option(None, "--bootstrap", help="multiaddr of the bootstrap"),
    steps: int = typer.Option(200, "--steps", min=1, help="optimizer steps"),
    seq_len: int = typer.Option(128, "--seq-len", min=2, help="tokens per sequence"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="default: the run's target batch"),
    seed: int = typer.Option(0, "--seed"),
    result_json: Optional[Path] = typer.Option(None, "--result-json", help="write losses and sample here"),
    run: Optional[str] = RunOpt,
    config: Optional[Path] = ConfigOpt,
    log_level: Optional[str] = LogOpt,
) -> None:
    """Train the run's model through the swarm on the Python stdlib's source (byte-level tokens)."""
    from swarm.pipeline import FaultPolicy
    from swarm.train import train

    _interrupt_on_sigterm()
    settings = _settings(config, run_id=run, log_level=log_level or "WARNING",
                         network={"initial_peers": bootstrap_addr or None})
    if not settings.network.initial_peers:
        raise SwarmError("train needs --bootstrap (the multiaddr the bootstrap printed)")
    trainer = settings.trainer
    policy = FaultPolicy(ban_time=trainer.ban_time, averaging_window=trainer.averaging_window,
                         step_wait=trainer.step_wait)
    train(settings.network.initial_peers, run_id=settings.run_id, steps=steps, seq_len=seq_len,
          batch_size=batch_size, seed=seed, timeout=trainer.timeout, policy=policy,
          microbatch_size=trainer.microbatch_size, result_path=result_json, console=Console(),
          checkpoint_every=trainer.checkpoint_every)


@app.command("export")
def export_command(
    bootstrap_addr: Optional[list[str]] = typer.Option(None, "--bootstrap", help="multiaddr of the bootstrap"),
    out: Path = typer.Option(..., "--out", help="directory to write config.json + model.safetensors to"),
    run: Optional[str] = RunOpt,
    config: Optional[Path] = ConfigOpt,
    log_level: Optional[str] = LogOpt,
) -> None:
    """Gather the swarm's current weights into a Hugging Face checkpoint (AutoModelForCausalLM loads it)."""
    from swarm.export import export_swarm

    _interrupt_on_sigterm()
    settings = _settings(config, run_id=run, log_level=log_level or "WARNING",
                         network={"initial_peers": bootstrap_addr or None})
    if not settings.network.initial_peers:
        raise SwarmError("export needs --bootstrap (the multiaddr the bootstrap printed)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SwarmError(f"--out {out} exists and is not an empty directory")
    export_swarm(settings.network.initial_peers, out, run_id=settings.run_id, timeout=settings.trainer.timeout,
                 console=Console())


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="the text to continue"),
    bootstrap_addr: Optional[list[str]] = typer.Option(None, "--bootstrap", help="multiaddr of the bootstrap"),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1, help="tokens to generate at most"),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0: greedy; > 0: sample"),
    top_k: int = typer.Option(0, "--top-k", min=0, help="sample among the k likeliest tokens (0: all)"),
    top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0, help="nucleus sampling threshold"),
    seed: Optional[int] = typer.Option(None, "--seed", help="sampling seed, for repeatable samples"),
    run: Optional[str] = RunOpt,
    config: Optional[Path] = ConfigOpt,
    log_level: Optional[str] = LogOpt,
) -> None:
    """Generate text through the swarm, printing tokens as they come."""
    from swarm.model import SwarmModelForCausalLM
    from swarm.serving import codec_of, stream_text

    _interrupt_on_sigterm()
    settings = _settings(config, run_id=run, log_level=log_level or "WARNING",
                         network={"initial_peers": bootstrap_addr or None})
    if not settings.network.initial_peers:
        raise SwarmError("generate needs --bootstrap (the multiaddr the bootstrap printed)")
    with console.status("joining the swarm..."):
        model = SwarmModelForCausalLM.from_pretrained(initial_peers=settings.network.initial_peers,
                                                     run_id=settings.run_id, timeout=settings.trainer.timeout)
    with model:
        codec = codec_of(model)
        sys.stdout.write(prompt)
        _, count, seconds = stream_text(model, codec, prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                                        top_k=top_k, top_p=top_p, seed=seed)
        sys.stdout.write("\n")
        sys.stdout.flush()
    console.print(f"[dim]{count} tokens in {seconds:.2f} s ({count / max(seconds, 1e-9):.1f} tokens/s)[/]")


@app.command("serve-api")
def serve_api_command(
    bootstrap_addr: Optional[list[str]] = typer.Option(None, "--bootstrap", help="multiaddr of the bootstrap"),
    host: Optional[str] = typer.Option(None, "--host", help="address to listen on (default 127.0.0.1)"),
    port: Optional[int] = typer.Option(None, "--port", help="HTTP port (default 8000)"),
    api_key: Optional[list[str]] = typer.Option(None, "--api-key", help="accepted bearer key (repeatable)"),
    model_name: Optional[str] = typer.Option(None, "--model-name", help="model id clients send"),
    run: Optional[str] = RunOpt,
    config: Optional[Path] = ConfigOpt,
    log_level: Optional[str] = LogOpt,
) -> None:
    """Serve an OpenAI-compatible API (completions, chat, embeddings) backed by the swarm."""
    from swarm.serving import serve_api

    settings = _settings(config, run_id=run, log_level=log_level,
                         network={"initial_peers": bootstrap_addr or None},
                         api={"host": host, "port": port, "api_keys": api_key or None, "model_name": model_name})
    if not settings.network.initial_peers:
        raise SwarmError("serve-api needs --bootstrap (the multiaddr the bootstrap printed)")
    serve_api(settings, console)


@app.command()
def demo(
    steps: int = typer.Option(300, "--steps", min=1, help="training steps"),
    peers: int = typer.Option(3, "--peers", min=1, max=6, help="peer processes, one stage each (the demo model has 6 layers)"),
    workdir: Optional[Path] = typer.Option(None, "--workdir", help="keep the model and logs here"),
) -> None:
    """A local swarm on 127.0.0.1: bootstrap, peers and a trainer as separate processes."""
    from swarm.demo import run_demo

    _setup_logging("INFO")
    raise typer.Exit(run_demo(steps=steps, num_peers=peers, workdir=workdir, console=Console()))


def main() -> None:
    """Entry point: click reports bad flags itself (exit 2); swarm's own errors become one line."""
    try:
        app()
    except SwarmError as e:
        console.print(f"[red]error:[/] {e}", highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl+C outside the serving loops (joining, training): no traceback
        console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
