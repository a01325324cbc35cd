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
from rich.markup import escape
from rich.text import Text

from core.config import SwarmSettings, load_settings
from core.errors import SwarmError
from swarm.logs import set_log_identity, setup_logging

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
KeyOpt = typer.Option(None, "--key", help="API key of a keyed run (or SWARM_KEY)")
MetricsPortOpt = typer.Option(None, "--metrics-port", help="serve Prometheus /metrics, /health and /ready on this "
                              "port (0: any free)")
CertOpt = typer.Option(None, "--ssl-certfile", help="serve https with this certificate (PEM; with --ssl-keyfile)")
CertKeyOpt = typer.Option(None, "--ssl-keyfile", help="the private key of --ssl-certfile (PEM)")
DeviceOpt = typer.Option(None, "--device", help="where the local parts (embeddings, head) compute: auto (the GPU "
                         "when CUDA is present), cpu, cuda or cuda:N (default cpu)")
DatasetOpt = typer.Option(None, "--dataset", help="HF hub id, local directory or file (jsonl, json, parquet, csv, "
                          "txt) to train on")
SplitOpt = typer.Option(None, "--split", help="the dataset's split to train on (default train)")
TextColumnOpt = typer.Option(None, "--text-column", help="the dataset's column holding the text (default text)")
ConfigNameOpt = typer.Option(None, "--config-name", help="the dataset's configuration, if it has several")
DataShardsOpt = typer.Option(None, "--data-shards", min=1, help="shards the dataset is cut into and leased to "
                             "trainers (default 16)")


def _settings(config: Optional[Path], *, log_file: str | None = None, **overrides: Any) -> SwarmSettings:
    """Load the settings and set up logging; ``log_file``: also log to ``<state>/<run>/logs/<log_file>.log``
    (the long-running commands)."""
    settings = load_settings(config, **overrides)
    log_dir = None
    if log_file and settings.logs.file:
        log_dir = settings.state_dir.expanduser() / settings.run_id / "logs"
    path = setup_logging(settings.log_level, console=console, log_dir=log_dir, command=log_file or "swarm",
                         max_bytes=settings.logs.max_bytes, backups=settings.logs.backups)
    if path is not None:
        logger.debug("logging to %s", path)
    return settings


def _client_settings(command: str, config: Optional[Path], bootstrap_addr: Optional[list[str]],
                     **overrides: Any) -> SwarmSettings:
    """The settings of a command that joins a run: ``--bootstrap`` (or ``network.initial_peers``) is
    required. Commands load their settings before they import hivemind and torch (seconds), so a
    typo in a flag or the config is said at once."""
    network = {**overrides.pop("network", {}), "initial_peers": bootstrap_addr or None}
    settings = _settings(config, network=network, **overrides)
    if not settings.network.initial_peers:
        raise SwarmError(f"{command} needs --bootstrap (the multiaddr the bootstrap printed)")
    return settings


def _setup_logging(level: str) -> None:
    setup_logging(level, console=console)


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
    wire: Optional[str] = typer.Option(None, "--wire", help="how activations and gradients travel: float32 "
                                       "(default, exact), float16, bfloat16 or int8"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="precision the peers and trainers compute in: "
                                        "float32 (default), bfloat16 or float16 (autocast; weights and AdamW "
                                        "state stay float32)"),
    open_run: Optional[bool] = typer.Option(None, "--open", help="a public run: joining needs no API key"),
    dashboard_port: Optional[int] = typer.Option(None, "--dashboard-port", help="admin dashboard port (default 8002)"),
    mirror: Optional[str] = typer.Option(
        None, "--mirror", help="multiaddr of a running bootstrap of this run: start a second bootstrap that serves "
        "joins and a dashboard too, and syncs keys and run state with it (needs --authority-key)"),
    authority_key: Optional[Path] = typer.Option(
        None, "--authority-key", help="the run's authority key: a copy of authority.key from the first bootstrap's "
        "state dir (<state-dir>/<run>/authority.key); a mirror needs it to issue tokens"),
    host: Optional[str] = HostOpt,
    port: Optional[int] = PortOpt,
    run: Optional[str] = RunOpt,
    state_dir: Optional[Path] = StateOpt,
    config: Optional[Path] = ConfigOpt,
    log_level: Optional[str] = LogOpt,
    metrics_port: Optional[int] = MetricsPortOpt,
    ssl_certfile: Optional[Path] = CertOpt,
    ssl_keyfile: Optional[Path] = CertKeyOpt,
    dataset: Optional[str] = DatasetOpt,
    split: Optional[str] = SplitOpt,
    text_column: Optional[str] = TextColumnOpt,
    config_name: Optional[str] = ConfigNameOpt,
    data_shards: Optional[int] = DataShardsOpt,
) -> None:
    """Start a run: publish its manifest and print the line volunteers paste to join."""
    settings = _settings(
        config, log_file="bootstrap", run_id=run, state_dir=state_dir, log_level=log_level,
        monitor={"metrics_port": metrics_port}, network={"host": host, "port": port},
        data={"source": dataset, "split": split, "text_column": text_column, "config_name": config_name,
              "num_shards": data_shards},
        bootstrap={"model": model, "num_stages": num_stages, "target_batch_size": target_batch_size, "lr": lr,
                   "wire": wire, "dtype": dtype, "open": open_run, "dashboard_port": dashboard_port, "mirror": mirror,
                   "authority_key": authority_key, "ssl_certfile": ssl_certfile, "ssl_keyfile": ssl_keyfile},
    )
    from bootstrap.node import BootstrapNode

    async def serve(stop: asyncio.Event) -> None:
        async with BootstrapNode(settings) as node:
            set_log_identity(node.dht.peer_id)
            manifest = node.manifest
            (node.state_dir / "maddrs.json").write_text(json.dumps(node.maddrs))
            if node.mirror is not None:
                console.print(f"[bold green]mirror[/] of the bootstrap at {escape(str(node.mirror))}: keys and run "
                              f"state sync every {settings.bootstrap.sync_interval:g} s")
            console.print(f"[bold green]run {escape(repr(manifest.run_id))}[/]: {escape(manifest.model)}, "
                          f"{manifest.num_layers} layers in {manifest.num_stages} stages "
                          f"{escape(str([s.as_list() for s in manifest.stages]))}")
            if manifest.dataset is not None:
                console.print(f"dataset {escape(manifest.dataset.source)} (split {escape(manifest.dataset.split)}), "
                              f"{manifest.dataset.num_shards} shards leased to trainers")
            if node.telemetry is not None and node.telemetry.server is not None:
                console.print(f"Prometheus metrics at {node.telemetry.server.url}", markup=False)
            console.print("volunteers join with:")
            print(node.join_command(), flush=True)
            if node.dashboard is not None:
                console.print(f"dashboard: {node.dashboard.url}  (public join page: {node.dashboard.url}/join)",
                              markup=False)
            if node.keys_required:
                run_flag = "" if settings.run_id == "swarm" else f" --run {escape(settings.run_id)}"
                console.print("this run needs an API key to join: make one per volunteer with "
                              f"`swarm keys create --name <who>{run_flag}`"
                              " (or start with --open for a public run)")
            await stop.wait()
            console.print("stopping the bootstrap...")

    _run_until_signal(serve)


@app.command()
def join(
    bootstrap_addr: Optional[list[str]] = typer.Option(None, "--bootstrap", help="multiaddr of the bootstrap (repeatable)"),
    stage: Optional[str] = typer.Option(None, "--stage", help="serve this stage, or a range like 2-3, instead of what "
                                        "placement picks"),
    max_stages: Optional[int] = typer.Option(
        None, "--max-stages", min=1, help="serve at most this many consecutive stages (default: as memory holds)"),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch threads for compute"),
    device: Optional[str] = typer.Option(None, "--device", help="where this peer computes: auto (default: a GPU when "
                                         "CUDA is present, else the CPU), cpu, cuda or cuda:N"),
    devices: Optional[str] = typer.Option(None, "--devices", help="serve one peer per device listed, e.g. 0,1,2,3 "
                                          "(default: every visible GPU)"),
    offload_optimizer: Optional[str] = typer.Option(None, "--offload-optimizer", help="keep AdamW's state in host "
                                                    "memory: true, false or auto (default: when the GPU is short)"),
    key: Optional[str] = typer.Option(None, "--key", help="API key of a keyed run (or SWARM_KEY)"),
    host: Optional[str] = HostOpt,
    port: Optional[int] = PortOpt,
    state_dir: Optional[Path] = StateOpt,
    announce_host: Optional[str] = typer.Option(None, "--announce-host", help="public IP or name others dial"),
    run: Optional[str] = RunOpt,
    config: Optional[Path] = ConfigOpt,
    log_level: Optional[str] = LogOpt,
    metrics_port: Optional[int] = MetricsPortOpt,
    accept_delegations: Optional[bool] = typer.Option(
        None, "--accept-delegations", help="also serve weak machines' stages on their behalf (they join with "
        "--delegate-to this peer); accepted tokens: --delegation-token, delegation.tokens or delegation.tokens_file"),
    delegate_to: Optional[list[str]] = typer.Option(
        None, "--delegate-to", help="multiaddr of a delegate (repeatable, tried in order): this machine keeps its "
        "identity and signs the work, the delegate computes its stage"),
    delegation_token: Optional[str] = typer.Option(
        None, "--delegation-token", help="with --delegate-to: the token the delegate's owner gave you; with "
        "--accept-delegations: a token to accept"),
) -> None:
    """Join a run: measure this machine, claim the stage that raises the bottleneck most, serve until Ctrl+C.
    With --delegate-to, a delegate serves this machine's stage instead and this machine signs its work."""
    settings = _client_settings(
        "join", config, bootstrap_addr, log_file="join", run_id=run, log_level=log_level, state_dir=state_dir,
        key=key, network={"host": host, "port": port, "announce_host": announce_host},
        peer={"stage": stage, "threads": threads, "max_stages": max_stages, "device": device, "devices": devices,
              "offload_optimizer": offload_optimizer}, monitor={"metrics_port": metrics_port},
    )
    settings = _with_delegation(settings, accept_delegations, delegate_to, delegation_token)
    from swarm.delegation_cli import announce_delegate, delegate_line, run_delegator

    if settings.delegation.delegate_to:
        _run_until_signal(lambda stop: run_delegator(settings, console, stop))
        return
    from shards.devices import device_list

    served = device_list(settings.peer.devices, settings.peer.device)
    if len(served) > 1:  # one peer process per device (docs/design.md, issue 24)
        from swarm.device_peers import plan_device_peers, run_device_peers

        plan = plan_device_peers(served, sys.argv[1:], settings.state_dir.expanduser())
        async def serve_devices(stop: asyncio.Event) -> None:
            ended = await run_device_peers(plan, console, stop)
            if ended is not None:  # exit non-zero: a supervisor restarts the whole set
                raise SwarmError(f"a device's peer left: {ended}")

        _run_until_signal(serve_devices)
        return
    settings = settings.model_copy(update={"peer": settings.peer.model_copy(update={"device": served[0]})})
    from peers.server import Peer
    from core.loop import start_unless_stopped
    from swarm.join_view import describe_span, introduce, live_lines

    async def serve(stop: asyncio.Event) -> None:
        with _measure_progress() as progress:
            peer = Peer(settings, progress=progress)
            if not await start_unless_stopped(peer, stop):  # Ctrl+C while still joining or loading
                return
        _print_measurement(peer)
        set_log_identity(peer.peer_id)
        await introduce(peer, settings, console)
        sessions = await announce_delegate(peer, settings, console) if settings.delegation.accept else None
        console.print(f"[bold green]serving[/] {escape(describe_span(peer))} as {escape(peer.peer_id)}; "
                      "Ctrl+C to leave")
        extra = None if sessions is None else (lambda: delegate_line(sessions.status().model_dump(mode="json")))
        live = asyncio.create_task(live_lines(peer, console, stop, interval=settings.monitor.interval, extra=extra))
        closed = asyncio.create_task(peer.wait_closed())  # the run owner may stop the run
        await asyncio.wait({live, closed}, return_when=asyncio.FIRST_COMPLETED)
        for task in (live, closed):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        console.print("leaving the swarm...")
        if sessions is not None:
            await sessions.stop()
        await peer.stop()
        if peer.failure is not None:  # exit non-zero: a supervisor restarts it, and says why
            raise SwarmError(peer.failure)

    _run_until_signal(serve)


def _with_delegation(settings: SwarmSettings, accept: Optional[bool], delegate_to: Optional[list[str]],
                     token: Optional[str]) -> SwarmSettings:
    """``swarm join``'s delegation flags over the settings. ``--delegation-token`` is the token to
    present as a delegator, or one more token to accept as a delegate (beside the configured ones)."""
    delegation = settings.delegation.model_copy(update={
        key: value for key, value in (("accept", accept), ("delegate_to", delegate_to or None)) if value is not None})
    if delegation.accept and delegation.delegate_to:
        raise SwarmError("--accept-delegations and --delegate-to exclude each other: a delegate serves, a "
                         "delegator has its stage served")
    if token is not None:
        update = {"tokens": [*delegation.tokens, token]} if delegation.accept else {"token": token}
        delegation = delegation.model_copy(update=update)
    return settings.model_copy(update={"delegation": delegation})


@app.command()
def status(
    bootstrap_addr: Optional[list[str]] = typer.Option(None, "--bootstrap", help="multiaddr of any peer of the run"),
    as_json: bool = typer.Option(False, "--json", help="print the status data as one JSON object and exit"),
    once: bool = typer.Option(False, "--once", help="print one frame and exit (the default when not a terminal)"),
    interval: float = typer.Option(2.0, "--interval", min=0.2, help="seconds between refreshes of the live view"),
    delegate: Optional[str] = typer.Option(None, "--delegate", help="multiaddr of a delegate: show its delegation "
                                           "sessions (total/active/max, per session) and exit"),
    key: Optional[str] = typer.Option(None, "--key", help="with --delegate on a keyed run: its API key (or "
                                      "SWARM_KEY); the records the view shows are readable without one"),
    run: Optional[str] = RunOpt,
    config: Optional[Path] = ConfigOpt,
    log_level: Optional[str] = LogOpt,
) -> None:
    """Show the run live, like top: stages x peers, bottleneck, contributions, warnings (Ctrl+C to quit)."""
    _interrupt_on_sigterm()
    # settings (and their errors) before the imports of hivemind and torch (seconds)
    settings = _client_settings("status", config, bootstrap_addr, run_id=run, key=key,
                                log_level=log_level or "WARNING")
    from dht.records import SwarmDHT
    from peers.telemetry.status import collect_status
    from swarm.status_view import render_status

    out = Console()
    if delegate is not None:
        from swarm.delegation_cli import print_delegate_status

        print_delegate_status(settings, delegate, out, as_json)
        return
    dht = SwarmDHT.create_client(settings.run_id, settings.network.initial_peers)
    try:
        if as_json or once or not out.is_terminal:
            report = asyncio.run(collect_status(dht))
            if as_json:
                print(report.model_dump_json())
            else:
                out.print(render_status(report))
            return
        asyncio.run(_status_live(dht, out, interval))
    except KeyboardInterrupt:
        pass
    finally:
        dht.shutdown()


async def _status_live(dht: Any, out: Console, interval: float) -> None:
    """Redraw the status every ``interval`` s until Ctrl+C; a failed read keeps the last frame."""
    from rich.live import Live

    from peers.telemetry.status import collect_status
    from swarm.status_view import render_status

    report = await collect_status(dht)
    with Live(render_status(report), console=out, auto_refresh=False) as live:
        while True:
            await asyncio.sleep(interval)
            try:
                report = await collect_status(dht)
            except SwarmError as e:  # the bootstrap went away for a moment: say so, keep going
                logger.warning("status refresh failed: %s", e)
                continue
            live.update(render_status(report), refresh=True)


@app.command("train")
def train_command(
    bootstrap_addr: Optional[list[str]] = typer.Option(None, "--bootstrap", help="multiaddr of the bootstrap"),
    steps: int = typer.Option(200, "--steps", min=1, help="optimizer steps"),
    seq_len: int = typer.Option(128, "--seq-len", min=2, help="tokens per sequence"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="default: the run's target batch"),
    seed: int = typer.Option(0, "--seed"),
    result_json: Optional[Path] = typer.Option(None, "--result-json", help="write losses and sample here"),
    key: Optional[str] = typer.Option(None, "--key", help="API key of a keyed run (or SWARM_KEY)"),
    device: Optional[str] = DeviceOpt,
    run: Optional[str] = RunOpt,
    state_dir: Optional[Path] = StateOpt,
    config: Optional[Path] = ConfigOpt,
    log_level: Optional[str] = LogOpt,
    metrics_port: Optional[int] = MetricsPortOpt,
    dataset: Optional[str] = DatasetOpt,
    split: Optional[str] = SplitOpt,
    text_column: Optional[str] = TextColumnOpt,
    config_name: Optional[str] = ConfigNameOpt,
    data_shards: Optional[int] = DataShardsOpt,
    eval_split: Optional[str] = typer.Option(None, "--eval-split", help="held-out split to evaluate on"),
    eval_every: Optional[int] = typer.Option(None, "--eval-every", min=0, help="evaluate every N steps (0: never)"),
) -> None:
    """Train the run's model through the swarm on a dataset (--dataset, else the run's), read from the
    shards the run leases to this trainer; a run with no dataset trains on the Python stdlib's source."""
    _interrupt_on_sigterm()
    settings = _client_settings("train", config, bootstrap_addr, log_file="train", run_id=run, key=key,
                                log_level=log_level or "WARNING", state_dir=state_dir,
                                monitor={"metrics_port": metrics_port},
                                data={"source": dataset, "split": split, "text_column": text_column,
                                      "config_name": config_name, "num_shards": data_shards,
                                      "eval_split": eval_split, "eval_every": eval_every},
                                trainer={"device": device})
    from swarm.train import train

    train(settings.network.initial_peers, run_id=settings.run_id, steps=steps, seq_len=seq_len,
          batch_size=batch_size, seed=seed, trainer=settings.trainer, result_path=result_json, console=Console(),
          monitor=settings.monitor, key=settings.key, data=settings.data)


@app.command("export")
def export_command(
    bootstrap_addr: Optional[list[str]] = typer.Option(None, "--bootstrap", help="multiaddr of the bootstrap"),
    out: Path = typer.Option(..., "--out", help="directory to write config.json + model.safetensors to"),
    key: Optional[str] = KeyOpt,
    run: Optional[str] = RunOpt,
    config: Optional[Path] = ConfigOpt,
    log_level: Optional[str] = LogOpt,
) -> None:
    """Gather the swarm's current weights into a Hugging Face checkpoint (AutoModelForCausalLM loads it)."""
    _interrupt_on_sigterm()
    settings = _client_settings("export", config, bootstrap_addr, run_id=run, key=key,
                                log_level=log_level or "WARNING")
    from trainer.export import export_swarm

    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SwarmError(f"--out {out} exists and is not an empty directory")
    export_swarm(settings.network.initial_peers, out, run_id=settings.run_id, timeout=settings.trainer.timeout,
                 console=Console(), key=settings.key)


ledger_app = typer.Typer(help="The signed contribution ledger.", no_args_is_help=True)
app.add_typer(ledger_app, name="ledger")


@ledger_app.command("verify")
def ledger_verify(
    source: str = typer.Argument(..., help="a ledger file (JSON lines) or the bootstrap's multiaddr"),
    key: Optional[str] = typer.Option(None, "--key", help="with a bootstrap's multiaddr on a keyed run: its API "
                                      "key (or SWARM_KEY)"),
    run: Optional[str] = RunOpt,
    config: Optional[Path] = ConfigOpt,
    log_level: Optional[str] = LogOpt,
) -> None:
    """Check every entry's chain link and signature, offline; name the first bad entry (exit 1)."""
    from swarm.ledger_cli import load_ledger, report_check

    settings = _settings(config, run_id=run, key=key, log_level=log_level or "WARNING")
    entries, where = load_ledger(source, settings)
    raise typer.Exit(report_check(entries, where, Console()))


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="the text to continue"),
    bootstrap_addr: Optional[list[str]] = typer.Option(None, "--bootstrap", help="multiaddr of the bootstrap"),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1, help="tokens to generate at most"),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0: greedy; > 0: sample"),
    top_k: int = typer.Option(0, "--top-k", min=0, help="sample among the k likeliest tokens (0: all)"),
    top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0, help="nucleus sampling threshold"),
    seed: Optional[int] = typer.Option(None, "--seed", help="sampling seed, for repeatable samples"),
    key: Optional[str] = KeyOpt,
    device: Optional[str] = DeviceOpt,
    run: Optional[str] = RunOpt,
    config: Optional[Path] = ConfigOpt,
    log_level: Optional[str] = LogOpt,
) -> None:
    """Generate text through the swarm, printing tokens as they come."""
    _interrupt_on_sigterm()
    settings = _client_settings("generate", config, bootstrap_addr, run_id=run, key=key,
                                log_level=log_level or "WARNING", trainer={"device": device})
    from trainer.model import SwarmModelForCausalLM
    from swarm.serving import codec_of, stream_text

    with console.status("joining the swarm..."):
        model = SwarmModelForCausalLM.from_pretrained(initial_peers=settings.network.initial_peers,
                                                     run_id=settings.run_id, timeout=settings.trainer.timeout,
                                                     key=settings.key, device=settings.trainer.device)
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
    run_keys: bool = typer.Option(False, "--run-keys", help="also accept the run's API keys (swarm keys "
                                  "create), checked in the bootstrap's state on this machine (--state-dir)"),
    state_dir: Optional[Path] = typer.Option(None, "--state-dir", help="the bootstrap's state dir, with --run-keys"),
    key: Optional[str] = typer.Option(None, "--key", help="this server's own API key of a keyed run, to join it "
                                      "(or SWARM_KEY); clients' keys are --api-key / --run-keys"),
    device: Optional[str] = DeviceOpt,
    run: Optional[str] = RunOpt,
    config: Optional[Path] = ConfigOpt,
    log_level: Optional[str] = LogOpt,
    ssl_certfile: Optional[Path] = CertOpt,
    ssl_keyfile: Optional[Path] = CertKeyOpt,
) -> None:
    """Serve an OpenAI-compatible API (completions, chat, embeddings) backed by the swarm. Per-key rate
    limits: api.requests_per_minute, api.tokens_per_minute, api.max_concurrent (config or SWARM_API__*)."""
    db = _open_state(run, state_dir, config) if run_keys else None  # before joining: a wrong dir fails at once
    settings = _client_settings("serve-api", config, bootstrap_addr, run_id=run, key=key, log_level=log_level,
                                api={"host": host, "port": port, "api_keys": api_key or None, "model_name": model_name,
                                     "ssl_certfile": ssl_certfile, "ssl_keyfile": ssl_keyfile},
                                trainer={"device": device})
    from swarm.serving import serve_api

    serve_api(settings, console, run_keys=db)


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


@contextlib.contextmanager
def _measure_progress():
    """A rich progress bar per measurement of ``swarm join`` (compute, network), as ``Peer`` reports them."""
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    labels = {"compute": "measuring compute for one stage", "network": "measuring links to peers"}
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        tasks: dict[str, Any] = {}

        def progress(what: str, done: float) -> None:
            if what not in tasks:
                tasks[what] = bar.add_task(labels.get(what, what), total=1.0)
            bar.update(tasks[what], completed=done)

        yield progress


def _print_measurement(peer: Any) -> None:
    m = peer.measurement
    if m is None:
        return
    link = (f"latency {m.latency_ms:.1f} ms, bandwidth {m.bandwidth_mbps:,.0f} Mbit/s" if m.latency_ms is not None
            else "no peer to measure links against yet")
    console.print(f"measured [bold]{m.throughput:,.0f} tokens/s[/] for one stage, {link}, "
                  f"{m.memory_gib:.1f} GiB for stages")


admin_app = typer.Typer(help="The dashboard's admin account (on the bootstrap's machine).", no_args_is_help=True)
app.add_typer(admin_app, name="admin")


@admin_app.command("password")
def admin_password(
    username: str = typer.Option("admin", "--username", help="the admin's login name"),
    run: Optional[str] = RunOpt,
    state_dir: Optional[Path] = StateOpt,
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Set the dashboard's admin password (asked twice, stored as an argon2 hash)."""
    from bootstrap.admin import set_admin_password

    password = typer.prompt("new admin password", hide_input=True, confirmation_prompt=True)
    db = _open_state(run, state_dir, config)
    try:
        set_admin_password(db, username, password, actor=_actor())
    finally:
        db.close()
    console.print(f"admin password set for {username}")


keys_app = typer.Typer(help="API keys of a run (on the bootstrap's machine: reads its state dir).",
                       no_args_is_help=True)
run_app = typer.Typer(help="Pause, resume or stop the run (on the bootstrap's machine).", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(run_app, name="run")


def _open_state(run: Optional[str], state_dir: Optional[Path], config: Optional[Path]):
    """The bootstrap's ``state.db``. These commands work on the bootstrap's machine, on its state
    dir; the bootstrap notices a change within a second (keys, run state) and acts on it."""
    from bootstrap.state import StateDB

    settings = _settings(config, run_id=run, state_dir=state_dir, log_level="WARNING")
    path = settings.state_dir.expanduser() / settings.run_id / "state.db"
    if not path.is_file():
        raise SwarmError(f"no bootstrap state at {path}: run this where `swarm bootstrap` runs, with the "
                         "same --state-dir and --run")
    return StateDB(path)


def _actor() -> str:
    import getpass

    with contextlib.suppress(Exception):
        return f"cli:{getpass.getuser()}"
    return "cli"


@keys_app.command("create")
def keys_create(
    name: str = typer.Option(..., "--name", help="who the key is for"),
    expires: Optional[str] = typer.Option(None, "--expires", help="lifetime like 30d, 12h (default: no expiry)"),
    scope: Optional[list[str]] = typer.Option(
        None, "--scope", help="what the key may do: join (serve or train in the run; the default), api (call "
        "serve-api), admin (the dashboard's API); repeatable or comma-separated"),
    run: Optional[str] = RunOpt,
    state_dir: Optional[Path] = StateOpt,
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Make a key; it is printed once (only its hash is kept)."""
    from bootstrap.keys import parse_duration, parse_scopes

    expires_in = parse_duration(expires) if expires else None
    scopes = parse_scopes(",".join(scope)) if scope else ("join",)
    db = _open_state(run, state_dir, config)
    try:
        made = db.create_key(name, actor=_actor(), expires_in=expires_in, scopes=scopes)
    finally:
        db.close()
    console.print(f"key [bold]{escape(made.key.id)}[/] for {escape(made.key.name)} (scope {','.join(scopes)}); "
                  "it is shown only now, keep it:")
    print(made.secret, flush=True)


@keys_app.command("list")
def keys_list(
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of the table"),
    run: Optional[str] = RunOpt,
    state_dir: Optional[Path] = StateOpt,
    config: Optional[Path] = ConfigOpt,
) -> None:
    """List the run's keys (ids, names, state; never the secrets)."""
    import time

    from rich.table import Table

    db = _open_state(run, state_dir, config)
    try:
        keys = db.list_keys()
    finally:
        db.close()
    now = time.time()
    if as_json:
        print(json.dumps([{"id": k.id, "name": k.name, "created": k.created, "expires": k.expires,
                           "revoked": k.revoked, "state": k.state(now), "scopes": list(k.scopes)} for k in keys]))
        return
    table = Table(title="API keys")
    for column in ("id", "name", "created (UTC)", "expires (UTC)", "state", "scope"):
        table.add_column(column)
    stamp = lambda t: time.strftime("%Y-%m-%d %H:%M", time.gmtime(t)) if t else "-"  # noqa: E731
    for k in keys:
        table.add_row(Text(k.id), Text(k.name), stamp(k.created), stamp(k.expires), k.state(now), ",".join(k.scopes))
    Console().print(table)


@keys_app.command("revoke")
def keys_revoke(
    key: str = typer.Argument(..., help="the key's id, a unique prefix of it, or the key itself"),
    run: Optional[str] = RunOpt,
    state_dir: Optional[Path] = StateOpt,
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Revoke a key: its holder is cut off within 60 s."""
    db = _open_state(run, state_dir, config)
    try:
        revoked = db.revoke_key(key, actor=_actor())
    finally:
        db.close()
    console.print(f"revoked key [bold]{escape(revoked.id)}[/] of {escape(revoked.name)}")


def _set_run_state(state: str, run: Optional[str], state_dir: Optional[Path], config: Optional[Path]) -> None:
    db = _open_state(run, state_dir, config)
    try:
        changed = db.set_run_state(state, actor=_actor())
    finally:
        db.close()
    console.print(f"run is {state}" + ("" if changed else " (it already was)"))


@run_app.command("pause")
def run_pause(run: Optional[str] = RunOpt, state_dir: Optional[Path] = StateOpt,
              config: Optional[Path] = ConfigOpt) -> None:
    """Pause training: trainers wait (and say so) until resumed; peers keep serving."""
    _set_run_state("paused", run, state_dir, config)


@run_app.command("resume")
def run_resume(run: Optional[str] = RunOpt, state_dir: Optional[Path] = StateOpt,
               config: Optional[Path] = ConfigOpt) -> None:
    """Resume a paused (or stopped) run."""
    _set_run_state("running", run, state_dir, config)


@run_app.command("stop")
def run_stop(run: Optional[str] = RunOpt, state_dir: Optional[Path] = StateOpt,
             config: Optional[Path] = ConfigOpt) -> None:
    """Stop the run: trainers end their loop and peers leave."""
    _set_run_state("stopped", run, state_dir, config)


@run_app.command("show")
def run_show(run: Optional[str] = RunOpt, state_dir: Optional[Path] = StateOpt,
             config: Optional[Path] = ConfigOpt) -> None:
    """Print the run state, the step counter and the contribution tallies as JSON."""
    db = _open_state(run, state_dir, config)
    try:
        history = db.metrics_history(limit=1)
        print(json.dumps({
            "state": db.run_state(), "step": db.step(),
            "loss": history[-1].loss if history else None,
            "contributions": {c.peer_id: c.samples for c in db.contributions()},
        }))
    finally:
        db.close()


def _print_error(out: Console, error: BaseException) -> None:
    """``error: <message>`` on one line, the message as plain text: it carries what others wrote
    (multiaddrs like ``[/ip4/127.0.0.1/tcp/1]``, peer ids, model names, remote errors), which rich
    would read as markup, and a closing tag that opens nothing made printing the error crash."""
    out.print(Text.assemble(("error:", "red"), " ", str(error)), highlight=False, soft_wrap=True)


def main() -> None:
    """Entry point: click reports bad flags itself (exit 2); swarm's own errors become one line."""
    try:
        app()
    except SwarmError as e:
        _print_error(console, e)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl+C outside the serving loops (joining, training): no traceback
        console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
