"""Where a peer's data channel is offered (``net.channel.channel_hosts``): a pure decision, as a table."""

from __future__ import annotations

import pytest

from net.channel import channel_hosts

MADDRS = ["/ip4/127.0.0.1/tcp/4001/p2p/Qm", "/ip4/10.0.0.7/tcp/4001/p2p/Qm", "/ip6/::1/tcp/4001/p2p/Qm",
          "/ip4/10.0.0.7/tcp/4001/p2p/Qm"]


@pytest.mark.parametrize("announce, listen, maddrs, expected", [
    ("203.0.113.5", "0.0.0.0", MADDRS, ["203.0.113.5"]),  # the announced host wins
    (None, "127.0.0.1", MADDRS, ["127.0.0.1"]),  # a concrete listen host is where it listens
    (None, "0.0.0.0", MADDRS, ["10.0.0.7", "127.0.0.1"]),  # a wildcard: where p2p is seen, loopback last
    (None, "0.0.0.0", [], ["127.0.0.1"]),  # nothing seen: loopback (a local swarm)
    (None, "::", ["/ip4/0.0.0.0/tcp/1"], ["127.0.0.1"]),
])
def test_channel_hosts(announce, listen, maddrs, expected):
    assert channel_hosts(announce, listen, maddrs) == expected
