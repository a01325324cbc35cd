"""``swarm join --devices 0,1,2,3``: one peer process per device of the machine.

Each device gets a ``swarm join`` of its own, with the same flags as the one typed, ``--device``
set to its device and a state dir of its own (``<state-dir>/<device>``: its checkpoints, logs and
measurements), so each is measured, claims a span, announces and averages as any other peer.
Why processes and not workers of one peer: docs/design.md, "As built (issue 24)".

This process supervises them: it prints each peer's serving line as it comes, and on Ctrl+C or
SIGTERM (or when one of them exits) it stops them all, SIGINT first so each leaves the DHT cleanly.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from swarm.procs import ProcessGroup

__all__ = ["DevicePeer", "plan_device_peers", "run_device_peers"]

_OWN_OPTIONS = ("--devices", "--device", "--state-dir")
"""Options of the typed command that every device's process sets for itself."""


@dataclass(frozen=True)
class DevicePeer:
    """One device's ``swarm join``: its process name, device, state dir and arguments."""

    name: str
    device: str
    state_dir: Path
    args: tuple[str, ...]


def plan_device_peers(devices: list[str], argv: list[str], state_dir: Path) -> list[DevicePeer]:
    """The ``swarm join`` of each of ``devices``, from the typed arguments ``argv`` (``join`` first)
    without the options each sets for itself. ``cpu`` may be listed more than once (a machine
    without a GPU trying the fan-out); each copy gets a state dir of its own."""
    if not argv or argv[0] != "join":
        raise ValueError(f"expected the arguments of swarm join, got {argv[:1]}")
    shared = _without_options(argv[1:], _OWN_OPTIONS)
    plan = []
    for index, device in enumerate(devices):
        name = device.replace(":", "") if devices.count(device) == 1 else f"{device.replace(':', '')}-{index}"
        folder = state_dir / name
        args = ("join", *shared, "--device", device, "--devices", device, "--state-dir", str(folder))
        plan.append(DevicePeer(name=name, device=device, state_dir=folder, args=args))
    return plan


def _without_options(args: list[str], names: tuple[str, ...]) -> list[str]:
    """``args`` without each of ``names`` and its value (``--name value`` or ``--name=value``)."""
    kept, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg in names:
            skip = True
        elif not arg.startswith(tuple(f"{name}=" for name in names)):
            kept.append(arg)
    return kept


async def run_device_peers(plan: list[DevicePeer], console: Console, stop: asyncio.Event) -> str | None:
    """Start every device's peer, say when each serves, and stop them all on ``stop`` or when one
    of them exits. Returns why the set ended on its own (a peer exited: its name and exit code),
    ``None`` when it was told to stop, so that ``swarm join`` exits non-zero and a supervisor
    restarts it."""
    ended: str | None = None
    logdir = plan[0].state_dir.parent / "device-logs"
    logdir.mkdir(parents=True, exist_ok=True)
    group = ProcessGroup(logdir)
    console.print(f"serving on {len(plan)} devices, one peer each: {', '.join(p.device for p in plan)} "
                  f"(logs in {escape(str(logdir))})")
    waits: dict[str, asyncio.Task] = {}
    try:
        procs = {peer.name: group.start(peer.name, list(peer.args)) for peer in plan}
        waits = {name: asyncio.create_task(asyncio.to_thread(group.wait_for_line, name, proc, "Ctrl+C to leave"))
                 for name, proc in procs.items()}
        for name, wait in waits.items():
            line = await wait
            console.print(f"[bold]{escape(name)}[/]: {escape(line.strip())}")
        while not stop.is_set() and all(proc.poll() is None for proc in procs.values()):
            try:
                await asyncio.wait_for(stop.wait(), timeout=1.0)
            except asyncio.TimeoutError:
                continue
        gone = [name for name, proc in procs.items() if proc.poll() is not None]
        if gone and not stop.is_set():
            ended = ", ".join(f"{name} exited with code {procs[name].returncode}" for name in gone)
            console.print(f"[yellow]{escape(ended)} (see its log): stopping the others[/]")
    finally:
        console.print("leaving the swarm...")
        await asyncio.to_thread(group.stop_all)
        for wait in waits.values():  # a wait for a peer that exited meanwhile ends (raises) on its own
            wait.cancel()
    return ended
