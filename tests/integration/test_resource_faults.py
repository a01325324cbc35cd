"""A clock minutes behind the run's and a port already in use, over real hivemind on loopback: each a
one-line error naming the cause, never a node that starts and is silently invisible."""

from __future__ import annotations

import socket

import pytest
from hivemind.utils import get_dht_time

from dht.clock import CLOCK_TOLERANCE, check_clock, clock_lag
from dht.records import SwarmDHT
from core.errors import ConfigError, PeerUnavailable

pytestmark = pytest.mark.slow


def test_a_clock_minutes_behind_the_bootstraps_is_refused_at_join(model_factory, swarm_factory):
    swarm = swarm_factory(model_factory("gpt2", num_layers=2, hidden_size=32, num_heads=4), num_stages=1,
                          num_peers=0)
    dht = swarm.bootstrap.dht
    now = get_dht_time()
    lag = swarm.loop.run(clock_lag(dht, now), timeout=30)
    assert lag is not None and -200 < lag <= 1.0  # the manifest was written moments ago, by this clock
    swarm.loop.run(check_clock(dht, now), timeout=30)  # the same clock: fine
    swarm.loop.run(check_clock(dht, now - CLOCK_TOLERANCE / 2), timeout=30)  # a little behind: tolerated
    with pytest.raises(ConfigError, match=r"clock is at least (29\d|30\d) s behind the run's bootstrap.*NTP"):
        swarm.loop.run(check_clock(dht, now - 300), timeout=30)  # five minutes behind


def test_a_port_in_use_is_a_clear_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(PeerUnavailable, match=f"cannot start the DHT on /ip4/127.0.0.1/tcp/{port}"):
            SwarmDHT.create("run", host="127.0.0.1", port=port)
