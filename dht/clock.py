"""Is this machine's clock close enough to the run's for DHT expirations to work?

Every DHT record carries an absolute expiration time (``hivemind.utils.get_dht_time``, the local wall
clock). A node whose clock is minutes behind writes records that have already expired by everyone
else's clock: they are dropped on arrival and the node is invisible, silently. The bootstrap writes the
manifest with an expiration of its now + ``MANIFEST_TTL`` and rewrites it every ``MANIFEST_REFRESH`` s,
so the manifest tells when, by the bootstrap's clock, it was last written: if that lies more than
``CLOCK_TOLERANCE`` s in this machine's future, this clock is behind and joining fails with a clear
error. (A clock that is ahead cannot be told apart from a bootstrap that has been down a while: it
shows as peers whose records look expired, i.e. an empty swarm, which routes report as ``NoRoute``.)
"""

from __future__ import annotations

from hivemind.utils import get_dht_time

from dht.records import MANIFEST_TTL, SwarmDHT
from dht.schemas import manifest_key
from core.errors import ConfigError

__all__ = ["CLOCK_TOLERANCE", "clock_lag", "check_clock"]

CLOCK_TOLERANCE = 30.0


async def clock_lag(dht: SwarmDHT, now: float | None = None) -> float | None:
    """Seconds this clock is at least behind the newest manifest writer's (None: no manifest)."""
    found = await dht.dht.get(manifest_key(dht.run_id), latest=True, return_future=True)
    if found is None or not isinstance(found.value, dict) or not found.value:
        return None
    written = max(entry.expiration_time for entry in found.value.values()) - MANIFEST_TTL
    return written - (now if now is not None else get_dht_time())


async def check_clock(dht: SwarmDHT, now: float | None = None) -> None:
    """``ConfigError`` when this clock is more than ``CLOCK_TOLERANCE`` s behind the bootstrap's."""
    lag = await clock_lag(dht, now)
    if lag is not None and lag > CLOCK_TOLERANCE:
        raise ConfigError(f"this machine's clock is at least {lag:.0f} s behind the run's bootstrap: the DHT "
                          "records written here would expire before anyone reads them. Set the clock right "
                          "(e.g. enable NTP: timedatectl set-ntp true) and join again")
