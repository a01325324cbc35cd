"""What `swarm join` says: reachability verdicts, why a stage was taken, the live line; and logs."""

from __future__ import annotations

import json
import logging

import pytest
from rich.console import Console

from peers.joining.reachability import (
    AddressKind,
    address_kind,
    best_address,
    explain_claim,
    explain_placement,
    behind_nat,
    reachability_verdict,
    relayed_verdict,
)
from swarm.join_view import format_live_line, key_fingerprint, span_label
from swarm.logs import set_log_identity, setup_logging

ID = "/p2p/12D3KooWabc"


@pytest.mark.parametrize("maddr, kind", [
    ("/ip4/127.0.0.1/tcp/1" + ID, AddressKind.LOOPBACK),
    ("/ip4/192.168.1.20/tcp/1" + ID, AddressKind.PRIVATE),
    ("/ip4/10.0.0.3/tcp/1" + ID, AddressKind.PRIVATE),
    ("/ip4/203.0.114.7/tcp/1" + ID, AddressKind.PUBLIC),
    ("/ip4/0.0.0.0/tcp/1" + ID, AddressKind.UNSPECIFIED),
    ("/ip6/::1/tcp/1" + ID, AddressKind.LOOPBACK),
    ("/dns4/swarm.example.org/tcp/1" + ID, AddressKind.PUBLIC),
])
def test_address_kind(maddr, kind):
    assert address_kind(maddr) is kind


@pytest.mark.parametrize("maddr, dialed, reachable, words, fix_words", [
    ("/ip4/8.8.4.4/tcp/31337" + ID, True, True, "reachable at /ip4/8.8.4.4/tcp/31337", ""),
    ("/ip4/192.168.1.20/tcp/31337" + ID, True, False, "only on your local network",
     "--announce-host <your public IP> and forward TCP port 31337"),
    ("/ip4/127.0.0.1/tcp/4000" + ID, True, True, "this machine only", "--host 0.0.0.0"),
    ("/ip4/8.8.4.4/tcp/31337" + ID, False, False, "NOT reachable", "firewall allows TCP port 31337"),
    ("/ip4/0.0.0.0/tcp/5" + ID, True, False, "not an address others can dial", "--announce-host"),
])
def test_reachability_verdict(maddr, dialed, reachable, words, fix_words):
    verdict = reachability_verdict(maddr, dialed, "refused")
    assert verdict.reachable is reachable and words in verdict.text
    assert fix_words in verdict.fix if fix_words else verdict.fix == ""


def test_a_private_address_is_ok_only_where_the_bootstrap_shares_the_network():
    verdict = reachability_verdict("/ip4/192.168.1.20/tcp/31337" + ID, True, lan=True)
    assert verdict.reachable and "where the bootstrap is" in verdict.text


def test_a_relayed_peer_names_its_relay():
    verdict = relayed_verdict("12D3KooWrelay", "/ip4/8.8.4.4/tcp/1/p2p/12D3KooWrelay/p2p-circuit" + ID)
    assert verdict.reachable and "behind NAT: reachable through relay 12D3KooWrelay" in verdict.text


HOME = "/ip4/192.168.1.2/tcp/4000" + ID
BOOT = "/ip4/10.79.1.2/tcp/31337/p2p/QmBoot"


@pytest.mark.parametrize("maddrs, initial, setting, expected", [
    ([HOME], [BOOT], "auto", True),  # a home network's address, the bootstrap elsewhere
    ([HOME], ["/ip4/192.168.7.9/tcp/1/p2p/QmBoot"], "auto", False),  # a LAN swarm
    (["/ip4/127.0.0.1/tcp/1" + ID], ["/ip4/127.0.0.1/tcp/2/p2p/QmBoot"], "auto", False),  # a local swarm
    (["/ip4/8.8.4.4/tcp/1" + ID], [BOOT], "auto", False),  # a public address
    ([HOME, "/ip4/8.8.4.4/tcp/1" + ID], [BOOT], "auto", False),  # announced public (port forwarded)
    ([HOME], [BOOT], "public", False),
    (["/ip4/8.8.4.4/tcp/1" + ID], [BOOT], "private", True),
])
def test_behind_nat(maddrs, initial, setting, expected):
    assert behind_nat(maddrs, initial, setting) is expected



def test_best_address_prefers_public_then_private():
    addrs = ["/ip4/127.0.0.1/tcp/1" + ID, "/ip4/10.1.1.1/tcp/1" + ID, "/ip4/8.8.4.4/tcp/1" + ID]
    assert best_address(addrs) == addrs[2] and best_address(addrs[:2]) == addrs[1]


@pytest.mark.parametrize("coverage, stage, expected", [
    ([1, 0, 1], 1, "nobody served it; peers per stage {0:1, 1:0, 2:1}"),
    ([0, 0], 1, "nobody served it (one of 2 uncovered stages); peers per stage {0:0, 1:0}"),
    ([2, 1, 3], 1, "it had the fewest peers (1); peers per stage {0:2, 1:1, 2:3}"),
    ([2, 2], 0, "it had the fewest peers (2), tied with 1 other(s); peers per stage {0:2, 1:2}"),
])
def test_explain_claim(coverage, stage, expected):
    assert explain_claim(coverage, stage) == expected


@pytest.mark.parametrize("loads, stage, throughput, expected", [
    ([100.0, 0.0, 80.0], 1, 50.0,
     "nobody served it; bottleneck 0 -> 50 tokens/s; tokens/s per stage {0:100, 1:0, 2:80}"),
    ([100.0, 40.0, 80.0], 1, 50.0,
     "it was the bottleneck (40 tokens/s); bottleneck 40 -> 80 tokens/s; tokens/s per stage {0:100, 1:40, 2:80}"),
    ([40.0, 40.0, 90.0], 2, 10.0,
     "it gained most (90 tokens/s there); bottleneck 40 -> 40 tokens/s; tokens/s per stage {0:40, 1:40, 2:90}"),
])
def test_explain_placement(loads, stage, throughput, expected):
    assert explain_placement(loads, stage, throughput) == expected


@pytest.mark.parametrize("loads, stage, count, share, expected", [
    ([0.0, 0.0, 0.0, 0.0], 2, 2, 50.0,
     "nobody served some of them; bottleneck 0 -> 0 tokens/s; tokens/s per stage {0:0, 1:0, 2:0, 3:0}"),
    ([100.0, 30.0, 30.0], 1, 2, 40.0,
     "some of them were the bottleneck (30 tokens/s); bottleneck 30 -> 70 tokens/s; tokens/s per stage "
     "{0:100, 1:30, 2:30}"),
    ([20.0, 60.0, 50.0], 1, 2, 5.0,
     "they gained most (50 tokens/s there); bottleneck 20 -> 20 tokens/s; tokens/s per stage {0:20, 1:60, 2:50}"),
])
def test_explain_placement_of_a_span(loads, stage, count, share, expected):
    assert explain_placement(loads, stage, share, count=count) == expected


@pytest.mark.parametrize("stages, expected", [([1], "stage 1"), ([0, 1], "stages 0-1"), ([2, 3, 4], "stages 2-4")])
def test_span_label(stages, expected):
    assert span_label(stages) == expected


def test_live_line_of_a_span():
    assert format_live_line("2-3", 1.0, 10.0, 5, 1, 0, 0).startswith("stages 2-3 | 1.0 req/s")


def test_live_line_and_fingerprint():
    assert format_live_line(1, 3.25, 1234.4, 98765, 321, 4, 2) == (
        "stage 1 | 3.2 req/s | 1,234 tok/s | queue 2 | contributed 98,765 tokens in 321 microbatches | ledger 4")
    assert key_fingerprint(b"ssh-rsa AAAA") == key_fingerprint(b"ssh-rsa AAAA") != key_fingerprint(b"ssh-rsa B")
    assert key_fingerprint(b"x").startswith("sha256:") and len(key_fingerprint(b"x")) == 7 + 16


def test_logs_go_to_a_rotating_json_file_with_level_and_peer_id(tmp_path):
    console = Console(file=open(tmp_path / "terminal.txt", "w"), force_terminal=False)
    try:
        path = setup_logging("INFO", console=console, log_dir=tmp_path / "logs", command="join", max_bytes=2048,
                             backups=2)
        assert path == tmp_path / "logs" / "join.log"
        set_log_identity("12D3KooWLogTestPeer")
        log = logging.getLogger("peers.test")
        log.debug("not at INFO")
        for i in range(60):
            log.info("serving request %d", i)
        log.warning("a warning")
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        assert lines[-1] == {"ts": lines[-1]["ts"], "level": "WARNING", "logger": "peers.test",
                             "peer": "12D3KooWLogTestPeer", "msg": "a warning"}
        assert (tmp_path / "logs" / "join.log.1").is_file() and not (tmp_path / "logs" / "join.log.3").exists()
        assert not any("not at INFO" in line for line in path.read_text().splitlines())
        # a second process of the same command does not share the file: this one holds its lock
        second = setup_logging("INFO", console=console, log_dir=tmp_path / "logs", command="join")
        assert second != path and second.name.startswith("join-")
        console.file.flush()
        terminal = (tmp_path / "terminal.txt").read_text()
        assert "[TestPeer] peers.test: a warning" in terminal and "serving request 59" in terminal
    finally:
        set_log_identity("")
        logging.basicConfig(handlers=[logging.NullHandler()], force=True)
