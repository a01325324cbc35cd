"""The delegation side of ``swarm join``: run as a delegator (``--delegate-to``), or add delegate
duties to a serving peer (``--accept-delegations``), and ``swarm status --delegate ADDR``."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

from rich.console import Console
from rich.markup import escape

from core.loop import start_unless_stopped
from core.config import SwarmSettings, check_multiaddr
from swarm.logs import set_log_identity

__all__ = ["run_delegator", "announce_delegate", "delegator_line", "delegate_line", "print_delegate_status"]


async def run_delegator(settings: SwarmSettings, console: Console, stop: asyncio.Event) -> None:
    """``swarm join --delegate-to``: keep this machine's identity, have the delegate compute, print
    the delegator's status every ``monitor.interval`` s until Ctrl+C."""
    from delegation.delegator import Delegator

    delegator = Delegator(settings)
    if not await start_unless_stopped(delegator, stop):  # Ctrl+C while joining
        return
    set_log_identity(delegator.peer_id)
    console.print(f"[bold]identity[/]  delegator {escape(delegator.peer_id)} (its key signs its records and ledger)")
    closed = asyncio.create_task(delegator.wait_closed())
    while not stop.is_set() and not closed.done():
        console.print(delegator_line(delegator.status().model_dump(mode="json")), highlight=False, markup=False)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(stop.wait()), settings.monitor.interval)
    closed.cancel()
    console.print("leaving the swarm (stopping the delegation session)...")
    await delegator.stop()


def delegator_line(status: dict[str, Any]) -> str:
    """One line of a delegator's status."""
    who = (status.get("delegate") or "?")[-8:]
    if not status.get("delegate_reachable"):
        return f"delegation_mode on, delegate {who} unreachable ({status.get('last_error') or 'no session yet'})"
    return (f"delegation_mode on, delegate {who} ({status.get('gpu_count') or 0} GPU(s)): stage {status.get('stage')} "
            f"{status.get('state') or '?'}, {status.get('receipts')} receipts, {status.get('tokens')} tokens, "
            f"{status.get('ledger_entries')} signed ledger entries")


async def announce_delegate(peer: Any, settings: SwarmSettings, console: Console) -> Any:
    """``--accept-delegations``: serve the delegation RPCs on ``peer``; returns its sessions."""
    from delegation.service import serve_delegations

    sessions = await serve_delegations(peer.delegate, settings.delegation)
    if peer.maddrs:
        console.print(f"[bold]delegate[/]  accepting up to {settings.delegation.max_sessions} delegation sessions; "
                      "weak machines join with:")
        print(f"swarm join --bootstrap {settings.network.initial_peers[0]} --delegate-to {peer.maddrs[0]} "
              "--delegation-token <token>", flush=True)
    return sessions


def delegate_line(status: dict[str, Any]) -> str:
    """One line of a delegate's status."""
    sessions = ", ".join(f"{s['delegator'][-8:]}: stage {s['stage']} {s['status']} {s['tokens']} tokens "
                         f"{s['age_s']:.0f} s" for s in status["sessions"] if s["status"] in ("loading", "active"))
    return (f"delegate {status['peer_id'][-8:]} ({status['gpu_count']} GPU(s)): {status['active_sessions']} of "
            f"{status['max_sessions']} sessions active, {status['total_sessions']} in all"
            + (f" [{sessions}]" if sessions else ""))


def print_delegate_status(settings: SwarmSettings, address: str, console: Console, as_json: bool) -> None:
    """``swarm status --delegate ADDR``: ask a delegate for its sessions."""
    check_multiaddr(address)  # a typo is said before hivemind and torch are imported
    from delegation.client import DelegationClient
    from delegation.delegator import delegate_peer_id
    from dht.records import SwarmDHT
    from net.auth import ClientCalls

    async def ask(dht: SwarmDHT) -> dict[str, Any]:
        client = await ClientCalls.open(dht, settings.key)  # a keyed run's delegate answers key holders only
        try:
            return (await DelegationClient(client.calls, delegate_peer_id(address)).status()).model_dump(mode="json")
        finally:
            await client.close()

    dht = SwarmDHT.create_client(settings.run_id, [*settings.network.initial_peers, address])
    try:
        status = asyncio.run(ask(dht))
    finally:
        dht.shutdown()
    if as_json:
        print(json.dumps(status))
    else:
        console.print(delegate_line(status), highlight=False, markup=False)
