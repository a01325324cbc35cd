"""What `swarm join` tells its owner: why it took its stage, and whether others can reach it.

``probe_reachability`` dials this peer's announced addresses from a fresh, separate p2p daemon
(no relay, so only a direct connection counts), the way a newcomer would; ``reachability_verdict``
turns the outcome and the kind of address into a sentence and, when needed, the fix.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from dataclasses import dataclass
from enum import Enum
from typing import Sequence

from hivemind.p2p import P2P, PeerID
from multiaddr import Multiaddr
from core.types import StageIndex

__all__ = ["AddressKind", "Verdict", "address_kind", "behind_nat", "explain_claim", "explain_placement",
           "reachability_verdict", "relayed_verdict", "probe_reachability"]

logger = logging.getLogger(__name__)


class AddressKind(str, Enum):
    LOOPBACK = "loopback"
    PRIVATE = "private"
    PUBLIC = "public"
    UNSPECIFIED = "unspecified"


def address_kind(maddr: str) -> AddressKind:
    """The kind of the IP in a multiaddr (a DNS name counts as public)."""
    parts = maddr.split("/")
    for proto in ("ip4", "ip6"):
        if proto in parts:
            ip = ipaddress.ip_address(parts[parts.index(proto) + 1])
            if ip.is_unspecified:
                return AddressKind.UNSPECIFIED
            if ip.is_loopback:
                return AddressKind.LOOPBACK
            return AddressKind.PRIVATE if ip.is_private or ip.is_link_local else AddressKind.PUBLIC
    return AddressKind.PUBLIC


def _port(maddr: str) -> str:
    parts = maddr.split("/")
    return parts[parts.index("tcp") + 1] if "tcp" in parts else "?"


@dataclass(frozen=True)
class Verdict:
    """``reachable``: others can (probably) dial this peer; ``text``: the verdict; ``fix``: what to do."""

    reachable: bool
    text: str
    fix: str = ""


def reachability_verdict(maddr: str, dialed: bool, error: str = "", *, lan: bool = False) -> Verdict:
    """The verdict for the best announced address ``maddr``, dialed (or not) from a fresh node;
    ``lan``: the swarm's bootstrap is on this private network too, so its members can dial it."""
    kind, port = address_kind(maddr), _port(maddr)
    forward = (f"pass --announce-host <your public IP> and forward TCP port {port} on your router "
               f"to this machine (pin it with --port {port})")
    if not dialed:
        why = f" ({error})" if error else ""
        return Verdict(False, f"NOT reachable: a fresh node could not connect to {maddr}{why}",
                       f"check the firewall allows TCP port {port} in; " + forward)
    if kind is AddressKind.LOOPBACK:
        return Verdict(True, f"reachable on this machine only ({maddr}: loopback)",
                       "fine for a local swarm; to take peers from elsewhere, --host 0.0.0.0 and " + forward)
    if kind is AddressKind.PRIVATE and lan:
        return Verdict(True, f"reachable on your local network ({maddr}), where the bootstrap is; peers outside "
                       "it cannot dial a private address", forward)
    if kind is AddressKind.PRIVATE:
        return Verdict(False, f"reachable only on your local network ({maddr}): peers outside it cannot dial "
                       "a private address, and no relay holds a slot for this peer",
                       "let it find a relay (network.reachability = \"auto\" or \"private\"), or " + forward)
    if kind is AddressKind.UNSPECIFIED:
        return Verdict(False, f"{maddr} is not an address others can dial", "pass --announce-host <your IP>")
    return Verdict(True, f"reachable at {maddr} (a public address, dialed directly)")


def relayed_verdict(relay: str, maddr: str) -> Verdict:
    """The verdict for a peer behind NAT holding a slot on ``relay``: callers reach it through it."""
    return Verdict(True, f"behind NAT: reachable through relay {relay} ({maddr}); every byte to this peer "
                   "crosses the relay", "for direct connections, forward a TCP port (--port, --announce-host) "
                   "and set network.reachability = \"public\"")


def _ip(maddr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    parts = maddr.split("/")
    for proto in ("ip4", "ip6"):
        if proto in parts:
            return ipaddress.ip_address(parts[parts.index(proto) + 1])
    return None


def behind_nat(maddrs: Sequence[str], initial_peers: Sequence[str], setting: str = "auto") -> bool:
    """Whether this node must serve through a relay. ``setting`` "public"/"private" decides; "auto":
    its best direct address is private and every initial peer sits outside that address's /16 (a
    home network's private address, a bootstrap elsewhere: nobody there can dial it). A local swarm
    (loopback) or a LAN one (the bootstrap in the same private network) is dialed directly."""
    if setting != "auto":
        return setting == "private"
    direct = [m for m in maddrs if "/p2p-circuit" not in m]
    if not direct:
        return False
    best = best_address(direct)
    if address_kind(best) is not AddressKind.PRIVATE:
        return False
    own = _ip(best)
    for peer in initial_peers:
        ip = _ip(peer)
        if ip is None or ip.is_loopback:
            return False
        if own is not None and ip.version == own.version == 4 and \
                ipaddress.ip_network(f"{ip}/16", strict=False) == ipaddress.ip_network(f"{own}/16", strict=False):
            return False
    return True


def best_address(maddrs: Sequence[str]) -> str:
    """The address most useful to others: public over private over loopback."""
    order = {AddressKind.PUBLIC: 0, AddressKind.PRIVATE: 1, AddressKind.LOOPBACK: 2, AddressKind.UNSPECIFIED: 3}
    return min(maddrs, key=lambda m: order[address_kind(m)])


async def probe_reachability(maddrs: Sequence[str], *, timeout: float = 10.0,
                             initial_peers: Sequence[str] = ()) -> Verdict:
    """Dial ``best_address(maddrs)`` from a new p2p daemon without relays, within ``timeout`` s; a
    peer holding a relay slot (a circuit address among ``maddrs``) is reachable through its relay.
    ``initial_peers``: where the swarm is, to tell a LAN swarm from a home behind NAT."""
    if not maddrs:
        return Verdict(False, "this peer announces no address", "pass --announce-host <your IP>")
    relayed = [m for m in maddrs if "/p2p-circuit" in m]
    if relayed:
        return relayed_verdict(relayed[0].split("/p2p-circuit", 1)[0].rsplit("/p2p/", 1)[1], relayed[0])
    maddr = best_address(maddrs)
    lan = address_kind(maddr) is AddressKind.PRIVATE and bool(initial_peers) and not behind_nat(maddrs, initial_peers)
    host = "127.0.0.1" if address_kind(maddr) is AddressKind.LOOPBACK else "0.0.0.0"
    probe = None
    try:
        probe = await P2P.create(host_maddrs=[f"/ip4/{host}/tcp/0"], dht_mode="client", use_relay=False,
                                 auto_nat=False, nat_port_map=False)
        target, address = maddr.rsplit("/p2p/", 1)
        await asyncio.wait_for(probe._client.connect(PeerID.from_base58(address), [Multiaddr(target)]), timeout)
        return reachability_verdict(maddr, True, lan=lan)
    except asyncio.TimeoutError:
        return reachability_verdict(maddr, False, f"no answer in {timeout:.0f} s")
    except Exception as e:  # ControlFailure (refused, unreachable), a daemon that would not start ...
        return reachability_verdict(maddr, False, f"{type(e).__name__}: {str(e)[:120]}")
    finally:
        if probe is not None:
            await probe.shutdown()


def explain_claim(coverage: Sequence[int], stage: StageIndex) -> str:
    """Why a joining peer took ``stage`` given the live peers per stage it saw."""
    least = min(coverage)
    ties = sum(count == least for count in coverage)
    seen = ", ".join(f"{i}:{count}" for i, count in enumerate(coverage))
    if least == 0:
        why = "nobody served it" if ties == 1 else f"nobody served it (one of {ties} uncovered stages)"
    else:
        why = f"it had the fewest peers ({least})" + ("" if ties == 1 else f", tied with {ties - 1} other(s)")
    return f"{why}; peers per stage {{{seen}}}"


def explain_placement(loads: Sequence[float], stage: StageIndex, throughput: float, count: int = 1) -> str:
    """Why a joining peer took the ``count`` stages from ``stage`` given the tokens/s each stage had
    (``loads``) and what it gives each of them (``throughput``)."""
    span = range(stage, stage + count)
    before = min(loads)
    after = min(load + throughput if i in span else load for i, load in enumerate(loads))
    low = min(loads[i] for i in span)
    it = "it" if count == 1 else "some of them"
    if low <= 0:
        why = f"nobody served {it}"
    elif low == before:
        why = f"{it} {'was' if count == 1 else 'were'} the bottleneck ({low:.0f} tokens/s)"
    else:
        why = f"{'it' if count == 1 else 'they'} gained most ({low:.0f} tokens/s there)"
    seen = ", ".join(f"{i}:{load:.0f}" for i, load in enumerate(loads))
    return f"{why}; bottleneck {before:.0f} -> {after:.0f} tokens/s; tokens/s per stage {{{seen}}}"
