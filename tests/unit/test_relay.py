"""The relay-slot protocol's pure parts: the circuit address, and reading a relay's answer."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from core.config import SwarmSettings
from net.relay import circuit_address, is_relayed, parse_reply, relay_of

RELAY = "12D3KooWrelay"
PEER = "12D3KooWpeer"


def test_circuit_address_goes_through_the_relay():
    address = circuit_address(f"/ip4/10.0.0.1/tcp/31337/p2p/{RELAY}", RELAY, PEER)
    assert address == f"/ip4/10.0.0.1/tcp/31337/p2p/{RELAY}/p2p-circuit/p2p/{PEER}"
    assert is_relayed(address) and relay_of(address) == RELAY
    assert not is_relayed(f"/ip4/10.0.0.1/tcp/1/p2p/{PEER}") and relay_of(f"/ip4/10.0.0.1/tcp/1/p2p/{PEER}") is None


def _varint(n: int) -> bytes:
    out = b""
    while True:
        out += bytes([(n & 0x7F) | (0x80 if n > 0x7F else 0)])
        n >>= 7
        if not n:
            return out


def test_an_ok_answer_gives_the_expiry():
    reservation = b"\x08" + _varint(1_796_665_712) + b"\x12\x03abc"
    reply = b"\x08\x02" + b"\x1a" + _varint(len(reservation)) + reservation + b"\x28" + _varint(100)
    assert parse_reply(reply) == (100, 1_796_665_712.0, 0, 0)  # no limit field: none announced


def test_an_answer_gives_the_limit_of_each_relayed_connection():
    reservation = b"\x08" + _varint(1_796_665_712)
    limit = b"\x08" + _varint(120) + b"\x10" + _varint(131_072)  # libp2p's defaults: 2 minutes, 128 KiB
    reply = (b"\x08\x02" + b"\x1a" + _varint(len(reservation)) + reservation + b"\x22" + _varint(len(limit)) + limit
             + b"\x28" + _varint(100))
    answer = parse_reply(reply)
    assert (answer.status, answer.seconds, answer.data) == (100, 120, 131_072)


def test_a_refusal_gives_its_status():
    assert parse_reply(b"\x08\x02\x28" + _varint(200)) == (200, 0.0, 0, 0)


@pytest.mark.parametrize("reply, words", [
    (b"\x08\x02", "without a status"),
    (b"\x08", "truncated"),
    (b"\x0d\x00\x00\x00\x00", "wire type 5"),
])
def test_a_malformed_answer_is_refused_naming_why(reply, words):
    with pytest.raises(ValueError, match=words):
        parse_reply(reply)


def test_a_relay_limit_that_peers_behind_nat_would_refuse_is_a_config_error():
    with pytest.raises(ValidationError, match=r"relay_bytes\n.*greater than or equal to 67108864"):
        SwarmSettings(network={"relay_bytes": "1MiB"})
    assert SwarmSettings(network={"relay_bytes": "1GiB"}).network.relay_bytes == 1 << 30
