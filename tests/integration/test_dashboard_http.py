"""The dashboard's HTTP API over real HTTP (uvicorn on 127.0.0.1, a free port) and a real SQLite
state: 401 without a session, 403 without the CSRF token, login limits and audit, keys and run
control. The run's status comes from a fixed report here; tests/e2e/test_dashboard_browser.py
drives the same API against a live bootstrap with peers and a trainer."""

from __future__ import annotations

import csv
import io
import subprocess
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from bootstrap.admin import AdminAuth, LoginLimiter, set_admin_password
from bootstrap.dashboard import COOKIE, DashboardServer, create_app
from bootstrap.leases import LeaseBook
from bootstrap.state import StateDB
from core.loop import LoopThread
from peers.telemetry.status import Status

PASSWORD = "correct horse battery"
STATUS = {"version": 5, "time": 1.0, "run_id": "web", "step": 0, "trainers": 0, "model": "m", "num_layers": 2,
          "target_batch_size": 2,
          "run": {"state": "blocked", "step": 0, "loss": None, "loss_trend": [], "tokens_per_s": 0.0, "trainers": 0},
          "stages": [{"index": 0, "layers": [0, 2], "peers": [], "online": 0, "online_peers": [], "throughput": 0.0}],
          "peers": [], "bottleneck_stage": 0, "swarm_throughput": 0.0, "delegations": [],
          "warnings": ["stage 0 has no online peer: training is blocked"], "data": None, "eval": None}


class Dashboard:
    def __init__(self, tmp_path: Path, *, password: bool = True, tls: dict[str, str] | None = None):
        self.db = StateDB(tmp_path / "state.db")
        if password:
            set_admin_password(self.db, "admin", PASSWORD, actor="test")
        self.auth = AdminAuth(self.db, limiter=LoginLimiter(attempts=3, window=60))

        async def status() -> Status:
            return Status.model_validate(STATUS)

        app = create_app(self.db, self.auth, run_id="web", join_command=lambda: "swarm join --bootstrap /ip4/x --key <k>",
                         maddrs=lambda: ["/ip4/x"], keys_required=True, status=status, stream_period=0.1)
        self.clients: list[httpx.Client] = []
        self.loop = LoopThread("dashboard-test")
        self.server = DashboardServer(app, "127.0.0.1", 0, tls=tls)
        self.loop.run(self.server.start(), timeout=30)
        self.url = self.server.url

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=10)

    def login(self) -> tuple[httpx.Client, str]:
        client = self.client()
        self.clients.append(client)
        reply = client.post("/api/login", json={"username": "admin", "password": PASSWORD})
        assert reply.status_code == 200, reply.text
        return client, reply.json()["csrf"]

    def stop(self) -> None:
        for client in self.clients:
            client.close()
        self.loop.run(self.server.stop(), timeout=30)
        self.loop.stop()
        self.db.close()


@pytest.fixture
def dashboard(tmp_path: Path) -> Iterator[Dashboard]:
    board = Dashboard(tmp_path)
    yield board
    board.stop()


ADMIN_ONLY = [("GET", "/api/keys"), ("POST", "/api/keys"), ("POST", "/api/keys/abc/revoke"), ("GET", "/api/audit"),
              ("GET", "/api/run"), ("POST", "/api/run"), ("GET", "/api/metrics"), ("GET", "/api/metrics/stream"),
              ("GET", "/api/contributions"), ("GET", "/api/session"), ("POST", "/api/logout"), ("GET", "/api/evals"),
              ("GET", "/api/alerts"), ("GET", "/api/audit.csv"), ("GET", "/api/contributions.csv"),
              ("POST", "/api/peers/p1/ban"), ("POST", "/api/peers/p1/kick"), ("GET", "/api/peers/p1/history")]


@pytest.mark.parametrize("method, path", ADMIN_ONLY)
def test_401_without_a_session(dashboard: Dashboard, method: str, path: str) -> None:
    with dashboard.client() as client:
        reply = client.request(method, path, json={"name": "x"} if method == "POST" else None)
        assert reply.status_code == 401, (path, reply.text)
        client.cookies.set(COOKIE, "forged")
        forged = client.request(method, path)
        assert forged.status_code == 401


def test_public_pages_and_status(dashboard: Dashboard) -> None:
    with dashboard.client() as client:
        assert client.get("/").status_code == 303 and client.get("/").headers["location"] == "/login"
        join = client.get("/join")
        assert join.status_code == 200 and "swarm join --bootstrap /ip4/x --key &lt;k&gt;" in join.text
        assert "needs an API key" in join.text
        assert client.get("/api/status").json() == STATUS
        assert client.get("/api/join").json()["keys_required"] is True
        assert "/api/keys" in client.get("/openapi.json").json()["paths"]
        assert client.get("/static/uPlot.iife.min.js").status_code == 200


def test_state_changes_need_the_csrf_token(dashboard: Dashboard) -> None:
    client, csrf = dashboard.login()
    assert client.post("/api/keys", json={"name": "alice"}).status_code == 403
    assert client.post("/api/keys", json={"name": "alice"}, headers={"X-CSRF-Token": "wrong"}).status_code == 403
    assert client.post("/api/run", json={"state": "paused"}).status_code == 403
    made = client.post("/api/keys", json={"name": "alice", "expires": "30d"}, headers={"X-CSRF-Token": csrf})
    assert made.status_code == 200
    secret, key_id = made.json()["secret"], made.json()["key"]["id"]
    assert dashboard.db.verify_key(secret).name == "alice"
    listed = client.get("/api/keys").json()
    assert [(k["id"], k["state"]) for k in listed] == [(key_id, "active")] and secret not in str(listed)
    bad = client.post("/api/keys", json={"name": "bob", "expires": "soon"}, headers={"X-CSRF-Token": csrf})
    assert bad.status_code == 400 and "not a duration" in bad.json()["detail"]
    revoked = client.post(f"/api/keys/{key_id[:4]}/revoke", headers={"X-CSRF-Token": csrf})
    assert revoked.json()["state"] == "revoked"
    assert client.post("/api/run", json={"state": "paused"}, headers={"X-CSRF-Token": csrf}).json()["state"] == "paused"
    assert dashboard.db.run_state() == "paused"
    actions = [(e.actor, e.action) for e in dashboard.db.audit_log()]
    assert {("web:admin", "key.create"), ("web:admin", "key.revoke"), ("web:admin", "run.paused")} <= set(actions)
    assert client.post("/api/logout", headers={"X-CSRF-Token": csrf}).status_code == 200
    assert client.get("/api/keys").status_code == 401


def test_failed_logins_are_limited_and_audited(dashboard: Dashboard) -> None:
    with dashboard.client() as client:
        for _ in range(3):
            reply = client.post("/api/login", json={"username": "admin", "password": "guess-guess"})
            assert reply.status_code == 401 and reply.json()["detail"] == "wrong username or password"
        limited = client.post("/api/login", json={"username": "admin", "password": PASSWORD})
        assert limited.status_code == 429 and "too many failed logins" in limited.json()["detail"]
    actions = [e.action for e in dashboard.db.audit_log()]
    assert actions.count("login.failed") == 3 and actions.count("login.limited") == 1 and "login" not in actions


def test_no_password_no_login(tmp_path: Path) -> None:
    board = Dashboard(tmp_path, password=False)
    try:
        with board.client() as client:
            reply = client.post("/api/login", json={"username": "admin", "password": "anything-at-all"})
            assert reply.status_code == 401 and "SWARM_ADMIN_PASSWORD" in reply.json()["detail"]
    finally:
        board.stop()


def test_metrics_stream_sends_new_points(dashboard: Dashboard) -> None:
    dashboard.db.record_metrics(step=1, loss=3.5, tokens_per_second=10.0, peers=1, reports={})
    client, _ = dashboard.login()
    with client.stream("GET", "/api/metrics/stream?since=0") as stream:
        lines = stream.iter_lines()
        first = next(line for line in lines if line.startswith("data:"))
        dashboard.db.record_metrics(step=2, loss=3.0, tokens_per_second=10.0, peers=1, reports={})
        second = next(line for line in lines if line.startswith("data:"))
    assert '"step": 1' in first and '"loss": 3.5' in first and '"step": 2' in second


def test_evaluations_are_served_oldest_first_from_an_id_on(dashboard: Dashboard) -> None:
    book = LeaseBook(dashboard.db, clock=lambda: 50.0)
    book.record_eval("d", 10, 2.0, 300, "trainer")
    book.record_eval("d", 20, 1.0, 300, "trainer")
    client, _ = dashboard.login()
    evals = client.get("/api/evals").json()
    assert [(e["id"], e["step"], e["loss"], e["tokens"], e["at"]) for e in evals] == [(1, 10, 2.0, 300, 50.0),
                                                                                      (2, 20, 1.0, 300, 50.0)]
    assert evals[1]["perplexity"] == pytest.approx(2.718281828)
    assert [e["step"] for e in client.get("/api/evals?since=1").json()] == [20]


def test_fuzz_the_api_from_its_openapi_spec(dashboard: Dashboard) -> None:
    """schemathesis generates requests for every operation of /openapi.json, as the admin (session
    and CSRF token) and as nobody; no request may make the server fail (5xx). Bounded: a fixed
    number of examples per operation. The endless SSE stream and logout are left out."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings

    client, csrf = dashboard.login()
    session_cookie = client.cookies[COOKIE]
    schema = schemathesis.openapi.from_url(f"{dashboard.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    operations = [op for op in operations if op.path not in ("/api/metrics/stream", "/api/logout")]
    assert len(operations) >= 10
    failures: list[str] = []
    for operation in operations:
        @settings(max_examples=15, deadline=None, phases=[Phase.explicit, Phase.generate], database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def fuzz(case) -> None:
            for cookies, headers in (({COOKIE: session_cookie}, {"X-CSRF-Token": csrf}), ({}, {})):
                response = case.call(base_url=dashboard.url, cookies=cookies, headers=headers)
                if response.status_code >= 500:
                    failures.append(f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:200]}")

        fuzz()
    assert not failures, failures
    assert dashboard.auth.session(session_cookie) is not None  # still logged in: nothing broke the session


def test_a_taken_dashboard_port_is_an_error_not_the_end_of_the_process():
    """uvicorn exits (SystemExit) when it cannot bind; from a task that would stop the whole event loop
    and the bootstrap with it. The server turns it into an OSError the bootstrap logs and goes on."""
    import asyncio
    import socket

    from fastapi import FastAPI

    from bootstrap.dashboard import DashboardServer

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        async def start_then_go_on() -> str:
            server = DashboardServer(FastAPI(), "127.0.0.1", port)
            try:
                with pytest.raises(OSError, match=f"could not listen on 127.0.0.1:{port}"):
                    await server.start()
            finally:
                await server.stop()
            return "still running"

        assert asyncio.run(start_then_go_on()) == "still running"


def _self_signed(tmp_path: Path) -> dict[str, str]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    return {"ssl_certfile": str(cert), "ssl_keyfile": str(key)}


def test_https_serves_a_secure_cookie_and_health(tmp_path: Path) -> None:
    tls = _self_signed(tmp_path)
    board = Dashboard(tmp_path, tls=tls)
    try:
        assert board.url.startswith("https://127.0.0.1:")
        with httpx.Client(base_url=board.url, verify=tls["ssl_certfile"], timeout=10) as client:
            assert client.get("/health").json() == {"status": "ok"}
            assert client.get("/ready").json() == {"ready": True, "checks": {}, "failing": []}
            reply = client.post("/api/login", json={"username": "admin", "password": PASSWORD})
            assert reply.status_code == 200 and "; secure" in reply.headers["set-cookie"].lower()
        with httpx.Client(base_url=board.url.replace("https", "http"), timeout=10) as plain:
            with pytest.raises(httpx.HTTPError):  # https only on that port
                plain.get("/health")
    finally:
        board.stop()


def test_the_cookie_is_secure_behind_an_https_proxy_only(dashboard: Dashboard) -> None:
    with dashboard.client() as client:
        direct = client.post("/api/login", json={"username": "admin", "password": PASSWORD})
        proxied = client.post("/api/login", json={"username": "admin", "password": PASSWORD},
                              headers={"X-Forwarded-Proto": "https"})  # a proxy on this machine (127.0.0.1)
    assert "secure" not in direct.headers["set-cookie"].lower()
    assert "; secure" in proxied.headers["set-cookie"].lower()


def test_admin_key_csv_exports_and_scoped_keys(dashboard: Dashboard) -> None:
    admin = dashboard.db.create_key("ops", actor="test", scopes=("admin",)).secret
    joiner = dashboard.db.create_key("volunteer", actor="test").secret
    dashboard.db.audit("=cmd|' /C calc'!A0", "peer.join", "-2+3")  # a spreadsheet formula in a peer's text
    with dashboard.client() as client:
        refused = client.get("/api/audit.csv", headers={"Authorization": f"Bearer {joiner}"})
        assert refused.status_code == 401 and "cannot use the admin API" in refused.json()["detail"]
        made = client.post("/api/keys", json={"name": "inference", "scopes": ["api"]},
                           headers={"Authorization": f"Bearer {admin}"})  # a key needs no CSRF token
        assert made.status_code == 200 and made.json()["key"]["scopes"] == ["api"]
        bad = client.post("/api/keys", json={"name": "x", "scopes": ["root"]}, headers={"Authorization": f"Bearer {admin}"})
        assert bad.status_code == 422
        exported = client.get("/api/audit.csv", headers={"Authorization": f"Bearer {admin}"})
    assert exported.status_code == 200 and exported.headers["content-type"].startswith("text/csv")
    rows = list(csv.reader(io.StringIO(exported.text)))
    assert rows[0] == ["id", "time_utc", "actor", "action", "detail"]
    assert ["'=cmd|' /C calc'!A0", "peer.join", "'-2+3"] in [r[2:] for r in rows]
    assert [r[2] for r in rows if r[3] == "key.create"][0] == f"web:key:{admin.split('_')[1]}"
    assert any(r[3] == "admin.refused" for r in rows) and any(r[3] == "admin.use" for r in rows)
    assert dashboard.db.verify_key(made.json()["secret"], scope="api").name == "inference"
