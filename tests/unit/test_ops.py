"""Running swarm as a service, the pure parts: rate limits, alerts, key scopes, readiness, cutting
revoked and banned peers out of the views, and the TLS settings (tables of cases)."""

from __future__ import annotations

import math

import pytest

from bootstrap.alerts import AlertBook, Progress, alerts_of
from bootstrap.keys import ApiKey, check_key, hash_key, parse_scopes
from core.config import load_settings
from core.errors import AuthRejected, ConfigError
from dht.auth import issue_token
from dht.schemas import HardwareSummary, LayerRange, Manifest, PeerRecord, PeerState
from hivemind.utils.crypto import RSAPrivateKey
from peers.telemetry.health import readiness
from peers.telemetry.status import STALE_AFTER, build_status, without_cut_off
from swarm.api import RateLimits, client_id


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("rpm, tpm, concurrent, calls, expected_waits", [
    (3, None, None, [(0, 0)] * 4, [0, 0, 0, 60]),              # the 4th request in a minute waits for the 1st
    (None, 100, None, [(0, 60), (0, 60), (0, 0)], [0, 0, 60]),  # 120 tokens spent: the 3rd request waits
    (2, None, None, [(0, 0), (30, 0), (31, 0)], [0, 0, 29]),    # the oldest leaves the window at t=60
    (None, None, None, [(0, 10**9)] * 5, [0] * 5),              # no limit at all
])
def test_rate_limits_per_minute(rpm, tpm, concurrent, calls, expected_waits):
    clock = _Clock()
    limits = RateLimits(rpm, tpm, concurrent, clock=clock)
    waits = []
    for at, tokens in calls:
        clock.now = 1000.0 + at
        wait = limits.admit("k1")
        waits.append(wait)
        if not wait:
            limits.done("k1", tokens)
    assert waits == expected_waits
    assert limits.admit("k2") == 0  # limits are per client


def test_concurrency_cap_is_for_the_whole_server():
    limits = RateLimits(None, None, 2, clock=_Clock())
    assert [limits.admit("a"), limits.admit("b"), limits.admit("c")] == [0, 0, 1.0]
    limits.done("a", 0)
    assert limits.admit("c") == 0 and limits.in_flight == 2


def test_client_id_names_run_keys_by_id_and_hides_others():
    assert client_id("swk_0123abcd_" + "x" * 43) == "0123abcd"
    other = client_id("sk-secret-static-key")
    assert other.startswith("h") and "secret" not in other and len(other) == 9


@pytest.mark.parametrize("text, expected", [
    ("join", ("join",)), ("api,join", ("join", "api")), (["admin", "api"], ("api", "admin")),
    (" join , admin ", ("join", "admin")),
])
def test_scopes_parse(text, expected):
    assert parse_scopes(text) == expected


@pytest.mark.parametrize("text, message", [("", "at least one scope"), ("root", "unknown key scope 'root'"),
                                           (["join", "inference"], "unknown key scope 'inference'")])
def test_bad_scopes_are_named(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_scopes(text)


@pytest.mark.parametrize("scopes, asked, refused", [
    (("join",), "join", None), (("join",), "api", "cannot use the inference API"),
    (("api",), "join", "cannot join the run"), (("api",), "api", None), (("join", "api"), "admin", "admin API"),
    (("admin",), None, None),
])
def test_a_key_is_refused_outside_its_scopes(scopes, asked, refused):
    full = "swk_0123abcd_" + "y" * 43
    stored = ApiKey("0123abcd", "alice", 0.0, scopes=scopes)
    if refused is None:
        assert check_key(stored, hash_key(full), full, 1.0, asked) == stored
    else:
        with pytest.raises(AuthRejected, match=refused):
            check_key(stored, hash_key(full), full, 1.0, asked)


def _status(online: list[int], ages: dict[str, float] | None = None):
    manifest = Manifest(run_id="r", model="m", config_hash="h", num_layers=len(online) * 2,
                        stages=[LayerRange(start=2 * i, end=2 * i + 2) for i in range(len(online))],
                        target_batch_size=2)
    records = {i: [PeerRecord(peer_id=f"peer{i}-{j}", stage=i, layers=manifest.stages[i], state=PeerState.ONLINE,
                              throughput=10.0, updated=100.0 - (ages or {}).get(f"peer{i}-{j}", 0.0))
                   for j in range(n)] for i, n in enumerate(online)}
    return build_status(manifest, records, [], now=100.0)


def _progress(**kw) -> Progress:
    return Progress(**{"step": 5, "step_since": 0.0, "loss": 2.0, "run_state": "running", "trainers": 1, **kw})


@pytest.mark.parametrize("online, ages, progress, now, kinds", [
    ([2, 2], None, _progress(), 10.0, []),
    ([2, 1], None, _progress(), 10.0, ["stage.one"]),
    ([0, 2], None, _progress(), 10.0, ["stage.none"]),
    ([2, 2], {"peer0-1": STALE_AFTER + 5}, _progress(), 10.0, ["peer.stale"]),
    ([2, 2], None, _progress(loss=math.nan), 10.0, ["loss.nan"]),
    ([2, 2], None, _progress(), 700.0, ["step.stalled"]),
    ([2, 2], None, _progress(run_state="paused"), 700.0, []),  # a paused run is not stalled
    ([2, 2], None, _progress(trainers=0), 700.0, []),          # nobody trains: nothing to stall
    ([0, 1], {"peer1-0": STALE_AFTER + 5}, _progress(run_state="stopped", loss=math.nan), 700.0, []),  # the owner's stop
])
def test_alerts_table(online, ages, progress, now, kinds):
    found = alerts_of(_status(online, ages), progress, now=now, stall_after=600.0)
    assert [a.kind for a in found] == kinds


def test_an_alert_fires_once_until_it_clears():
    book = AlertBook()
    one = alerts_of(_status([2, 1]), _progress(), now=1.0, stall_after=600.0)
    assert [a.key for a in book.update(one)] == ["stage.one:1"]
    assert book.update(one) == []
    assert book.update([]) == [] and book.active == {}
    assert [a.key for a in book.update(one)] == ["stage.one:1"]


def test_revoked_and_banned_peers_leave_the_views():
    authority = RSAPrivateKey()
    layers = LayerRange(start=0, end=2)
    record = lambda peer, key: PeerRecord(  # noqa: E731
        peer_id=peer, stage=0, layers=layers, state=PeerState.ONLINE,
        access_token=issue_token(authority, key, peer, b"pk", 2e9) if key else None)
    records = {0: [record("a", "k1"), record("b", "k2"), record("c", None)]}
    assert [r.peer_id for r in without_cut_off(records, {"k1"}, set())[0]] == ["b", "c"]
    assert [r.peer_id for r in without_cut_off(records, set(), {"c"})[0]] == ["a", "b"]
    assert [r.peer_id for r in without_cut_off(records, set(), set())[0]] == ["a", "b", "c"]


@pytest.mark.parametrize("checks, code, failing", [
    (lambda: {"dht": True, "stage": True}, 200, []),
    (lambda: {"dht": True, "stage": False, "bootstrap": False}, 503, ["bootstrap", "stage"]),
    (lambda: 1 / 0, 503, ["checks"]),
    (None, 200, []),
])
def test_readiness(checks, code, failing):
    got, body = readiness(checks)
    assert (got, body["failing"], body["ready"]) == (code, failing, code == 200)


def test_tls_files_go_together_and_must_exist(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("c")
    key.write_text("k")
    settings = load_settings(api={"ssl_certfile": str(cert), "ssl_keyfile": str(key)})
    assert settings.api.tls() == {"ssl_certfile": str(cert), "ssl_keyfile": str(key)}
    assert load_settings().bootstrap.tls() == {}
    with pytest.raises(ConfigError, match="go together"):
        load_settings(bootstrap={"ssl_certfile": str(cert)})
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(api={"ssl_certfile": str(cert), "ssl_keyfile": str(tmp_path / "missing.pem")})
    assert HardwareSummary().gpu_util_percent is None  # the fleet table's GPU fields are optional
