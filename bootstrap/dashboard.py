"""The bootstrap's admin dashboard and JSON API (FastAPI; OpenAPI at ``/openapi.json``).

Public: ``/join`` (how to join, whether a key is needed), ``/api/join``, ``/api/status`` (the data of
``swarm status --json``), ``/login``, ``/health`` and ``/ready``. Everything else needs the admin's
session cookie (``Secure`` when the page is served over https, directly or behind a proxy that says
so in ``X-Forwarded-Proto``) or an API key with scope ``admin`` as ``Authorization: Bearer`` (scripts;
each use audited); requests that change something with a session also need the session's CSRF
token in the ``X-CSRF-Token`` header (a page of another site can make the browser send the cookie,
but cannot read the token). Without either the API answers 401, with a session but a missing or
wrong CSRF token 403.

The fleet view: ``/api/status`` feeds the peers table (live GPU figures and link latency per peer)
and the warnings; ``/api/peers/{id}/history`` the per-peer charts; ``/api/alerts`` the alerts active
now; ``POST /api/peers/{id}/ban`` and ``/kick`` the owner's actions (``BootstrapNode.ban_peer``);
``/api/contributions.csv`` and ``/api/audit.csv`` the exports.

The pages are static HTML with a little JavaScript and uPlot (shipped in ``bootstrap/static``, no
CDN); the loss chart follows ``/api/metrics/stream`` (server-sent events) for the training loss and
polls ``/api/evals`` for the held-out loss.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import html
import io
import json
import logging
import time
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Literal, Protocol

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field

from bootstrap.admin import AdminAuth, Session
from bootstrap.alerts import AlertBook
from bootstrap.keys import KEY_PREFIX, parse_duration, parse_scopes
from bootstrap.leases import LeaseBook
from bootstrap.state import StateDB
from core.errors import AuthRejected, ConfigError, SwarmError
from core.types import PeerId
from peers.telemetry.health import Checks, health_body, readiness
from peers.telemetry.status import Status

__all__ = ["DashboardServer", "create_app", "COOKIE", "Fleet"]

logger = logging.getLogger(__name__)

COOKIE = "swarm_session"
STATIC = Path(__file__).parent / "static"


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoginIn(_In):
    username: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=1024)


class SessionOut(BaseModel):
    username: str
    csrf: str


class KeyIn(_In):
    name: str = Field(min_length=1, max_length=100)
    expires: str | None = Field(None, max_length=20, description="a lifetime like 30d, 12h; none: no expiry")
    scopes: list[Literal["join", "api", "admin"]] = Field(["join"], min_length=1, max_length=3)


class KeyOut(BaseModel):
    id: str
    name: str
    created: float
    expires: float | None
    revoked: float | None
    state: str
    scopes: list[str]


class PeerSampleOut(BaseModel):
    at: float
    throughput: float | None
    latency_ms: float | None
    cpu_percent: float | None
    gpu_util_percent: float | None
    gpu_memory_used_gib: float | None
    gpu_memory_gib: float | None
    gpu_temperature_c: float | None
    gpu_power_w: float | None


class AlertOut(BaseModel):
    kind: str
    key: str
    text: str


class PeerActionOut(BaseModel):
    peer_id: str
    done: str


class Fleet(Protocol):
    """What the dashboard needs of the bootstrap for the owner's fleet view (``BootstrapNode``)."""

    alerts: AlertBook

    async def ban_peer(self, peer_id: PeerId, *, actor: str, kick: bool = False) -> str: ...


class NewKeyOut(BaseModel):
    key: KeyOut
    secret: str = Field(description="the key itself, shown this once")


class RunIn(_In):
    state: Literal["running", "paused", "stopped"]


class RunOut(BaseModel):
    state: str
    step: int


class AuditOut(BaseModel):
    id: int
    at: float
    actor: str
    action: str
    detail: str


class MetricOut(BaseModel):
    id: int
    at: float
    step: int
    loss: float | None
    tokens_per_second: float | None
    peers: int


class EvalOut(BaseModel):
    id: int
    at: float
    step: int
    loss: float
    perplexity: float
    tokens: int


class JoinOut(BaseModel):
    run_id: str
    command: str
    keys_required: bool
    maddrs: list[str]


StatusSource = Callable[[], Awaitable[Status]]


def create_app(db: StateDB, auth: AdminAuth, *, run_id: str, join_command: Callable[[], str],
               maddrs: Callable[[], list[str]], keys_required: bool, status: StatusSource,
               stream_period: float = 1.0, checks: Checks | None = None, fleet: Fleet | None = None) -> FastAPI:
    """The app: public routes (joining, status, health), the admin's session, keys, run control,
    metrics and, with ``fleet``, the owner's fleet view."""
    app = FastAPI(title=f"swarm bootstrap: run {run_id}", version="1",
                  description="Admin API of a swarm run's bootstrap; the dashboard's pages use it.")
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_exception_handler(SwarmError, _swarm_error)
    guard = _Guard(auth, db)
    app.include_router(_public_routes(auth, run_id, join_command, maddrs, keys_required, status, checks))
    app.include_router(_session_routes(auth, guard))
    app.include_router(_key_routes(db, guard))
    app.include_router(_run_routes(db, guard, stream_period))
    app.include_router(_fleet_routes(db, guard, fleet))
    return app


async def _swarm_error(request: Request, error: SwarmError) -> Response:
    code = 401 if isinstance(error, AuthRejected) else 400
    if isinstance(error, AuthRejected) and "too many" in str(error):
        code = 429
    return Response(json.dumps({"detail": str(error)}), status_code=code, media_type="application/json")


class _Guard:
    """The admin's dependencies: ``session`` (a logged-in admin, or a request with an admin-scoped
    API key) and ``csrf`` (a session whose request also carries its CSRF token, or an admin key: a
    key is not sent by the browser on its own, so it needs none; every route that changes something)."""

    def __init__(self, auth: AdminAuth, db: StateDB):
        self.auth, self.db = auth, db

    def session(self, request: Request) -> Session:
        found = self.auth.session(request.cookies.get(COOKIE))
        if found is not None:
            return found
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and key.strip().startswith(KEY_PREFIX):
            return self._admin_key(key.strip(), request)
        raise HTTPException(401, "log in first (POST /api/login), or send a key with scope admin as a Bearer token")

    def _admin_key(self, key: str, request: Request) -> Session:
        try:
            used = self.db.verify_key(key, scope="admin")
        except AuthRejected as e:
            self.db.audit(f"key@{request.client.host if request.client else '?'}", "admin.refused", str(e))
            raise HTTPException(401, str(e)) from None
        self.db.audit(f"key:{used.id}", "admin.use", f"{request.method} {request.url.path}")
        return Session(token="", username=f"key:{used.id}", csrf="", expires=float("inf"))

    def csrf(self, request: Request) -> Session:
        current = self.session(request)
        if current.token and request.headers.get("x-csrf-token") != current.csrf:
            raise HTTPException(403, "missing or wrong X-CSRF-Token header")
        return current


def _public_routes(auth: AdminAuth, run_id: str, join_command: Callable[[], str], maddrs: Callable[[], list[str]],
                   keys_required: bool, status: StatusSource, checks: Checks | None) -> APIRouter:
    router = APIRouter()

    @router.get("/health", tags=["public"], summary="liveness: the dashboard answers")
    async def health() -> dict:
        return health_body()

    @router.get("/ready", tags=["public"], summary="readiness: DHT up, manifest published, state database readable")
    async def ready() -> JSONResponse:
        code, body = await asyncio.to_thread(readiness, checks)
        return JSONResponse(body, status_code=code)

    @router.get("/", include_in_schema=False)
    async def index(request: Request) -> Response:
        if auth.session(request.cookies.get(COOKIE)) is None:
            return RedirectResponse("/login", status_code=303)
        return FileResponse(STATIC / "dashboard.html")

    @router.get("/login", include_in_schema=False)
    async def login_page() -> Response:
        return FileResponse(STATIC / "login.html")

    @router.get("/join", response_class=HTMLResponse, include_in_schema=False)
    async def join_page() -> str:
        return _join_html(run_id, join_command(), keys_required)

    @router.get("/api/join", response_model=JoinOut, tags=["public"])
    async def api_join() -> JoinOut:
        return JoinOut(run_id=run_id, command=join_command(), keys_required=keys_required, maddrs=maddrs())

    @router.get("/api/status", response_model=Status, tags=["public"], summary="the data of `swarm status --json`")
    async def api_status() -> Status:
        try:
            return await status()
        except SwarmError as e:  # the DHT has no manifest yet, or is briefly unreachable
            raise HTTPException(503, str(e)) from None

    return router


def _join_html(run_id: str, command: str, keys_required: bool) -> str:
    key = ("This run needs an API key: ask the run owner for one, then add <code>--key YOUR_KEY</code> "
           "(or set <code>SWARM_KEY</code>)." if keys_required else "This run is open: no key is needed.")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>join run {html.escape(run_id)}</title>"
            "<link rel='stylesheet' href='/static/style.css'></head><body><main>"
            f"<h1>Join run <code>{html.escape(run_id)}</code></h1>"
            f"<p>Install swarm, then run:</p><pre id='join-command'>{html.escape(command)}</pre>"
            f"<p id='join-key'>{key}</p></main></body></html>")


def _session_routes(auth: AdminAuth, guard: _Guard) -> APIRouter:
    router = APIRouter(tags=["session"])

    @router.post("/api/login", response_model=SessionOut,
                 responses={401: {"description": "wrong credentials"}, 429: {"description": "too many failures"}})
    async def api_login(body: LoginIn, request: Request, response: Response) -> SessionOut:
        client = request.client.host if request.client else "?"
        opened = await asyncio.to_thread(auth.login, body.username, body.password, client)
        response.set_cookie(COOKIE, opened.token, httponly=True, samesite="strict", max_age=int(auth.session_ttl),
                            secure=request.url.scheme == "https")
        return SessionOut(username=opened.username, csrf=opened.csrf)

    @router.get("/api/session", response_model=SessionOut)
    async def api_session(current: Session = Depends(guard.session)) -> SessionOut:
        return SessionOut(username=current.username, csrf=current.csrf)

    @router.post("/api/logout")
    async def api_logout(request: Request, response: Response, current: Session = Depends(guard.csrf)) -> dict:
        auth.logout(current.token)
        response.delete_cookie(COOKIE)
        return {"ok": True}

    return router


def _key_out(k: Any, revoked: float | None) -> KeyOut:
    return KeyOut(id=k.id, name=k.name, created=k.created, expires=k.expires, revoked=revoked,
                  state=k.state(time.time()), scopes=list(k.scopes))


def _key_routes(db: StateDB, guard: _Guard) -> APIRouter:
    router = APIRouter(tags=["keys"])

    @router.get("/api/keys", response_model=list[KeyOut])
    async def api_keys(current: Session = Depends(guard.session)) -> list[KeyOut]:
        return [_key_out(k, k.revoked) for k in await asyncio.to_thread(db.list_keys)]

    @router.post("/api/keys", response_model=NewKeyOut)
    async def api_create_key(body: KeyIn, current: Session = Depends(guard.csrf)) -> NewKeyOut:
        expires_in = parse_duration(body.expires) if body.expires else None
        made = await asyncio.to_thread(db.create_key, body.name, actor=f"web:{current.username}",
                                       expires_in=expires_in, scopes=parse_scopes(body.scopes))
        return NewKeyOut(key=_key_out(made.key, None), secret=made.secret)

    @router.post("/api/keys/{key_id}/revoke", response_model=KeyOut)
    async def api_revoke_key(key_id: str, current: Session = Depends(guard.csrf)) -> KeyOut:
        if not key_id.strip() or len(key_id) > 200:
            raise ConfigError("name the key by its id")
        k = await asyncio.to_thread(db.revoke_key, key_id, actor=f"web:{current.username}")
        return _key_out(k, k.revoked)

    return router


def _run_routes(db: StateDB, guard: _Guard, stream_period: float) -> APIRouter:
    """Run control, the audit log and the metrics history (with its live stream)."""
    router = APIRouter()

    @router.get("/api/run", response_model=RunOut, tags=["run"])
    async def api_run(current: Session = Depends(guard.session)) -> RunOut:
        return RunOut(state=db.run_state(), step=db.step())

    @router.post("/api/run", response_model=RunOut, tags=["run"])
    async def api_set_run(body: RunIn, current: Session = Depends(guard.csrf)) -> RunOut:
        await asyncio.to_thread(db.set_run_state, body.state, f"web:{current.username}")
        return RunOut(state=db.run_state(), step=db.step())

    @router.get("/api/audit", response_model=list[AuditOut], tags=["audit"])
    async def api_audit(limit: int = Query(200, ge=1, le=1000),
                        current: Session = Depends(guard.session)) -> list[AuditOut]:
        return [AuditOut(**vars(e)) for e in await asyncio.to_thread(db.audit_log, limit)]

    @router.get("/api/metrics", response_model=list[MetricOut], tags=["metrics"])
    async def api_metrics(since: int = Query(0, ge=0, le=2**62), limit: int = Query(1000, ge=1, le=10000),
                          current: Session = Depends(guard.session)) -> list[MetricOut]:
        return [MetricOut(**vars(p)) for p in await asyncio.to_thread(db.metrics_history, since, limit)]

    @router.get("/api/evals", response_model=list[EvalOut], tags=["metrics"])
    async def api_evals(since: int = Query(0, ge=0, le=2**62), limit: int = Query(1000, ge=1, le=10000),
                        current: Session = Depends(guard.session)) -> list[EvalOut]:
        """Held-out evaluations the trainers sent (``--eval-every``), oldest first."""
        found = await asyncio.to_thread(LeaseBook(db).evals, since, limit)
        return [EvalOut(id=i, **p.model_dump()) for i, p in found]

    @router.get("/api/contributions", tags=["metrics"])
    async def api_contributions(current: Session = Depends(guard.session)) -> dict[str, dict[str, float]]:
        return {c.peer_id: {"samples": c.samples, "last_seen": c.last_seen}
                for c in await asyncio.to_thread(db.contributions)}

    @router.get("/api/metrics/stream", tags=["metrics"], summary="server-sent events: one per new metrics point")
    async def api_metrics_stream(request: Request, since: int = Query(0, ge=0, le=2**62),
                                 current: Session = Depends(guard.session)) -> StreamingResponse:
        return StreamingResponse(_points(request, db, since, stream_period), media_type="text/event-stream")

    return router


def _fleet_routes(db: StateDB, guard: _Guard, fleet: Fleet | None) -> APIRouter:
    """Per-peer history, alerts, the owner's actions on a peer, and the CSV exports."""
    router = APIRouter(tags=["fleet"])

    @router.get("/api/peers/{peer_id}/history", response_model=list[PeerSampleOut])
    async def api_peer_history(peer_id: str, since: float = Query(0.0, ge=0), limit: int = Query(2000, ge=1, le=20000),
                               current: Session = Depends(guard.session)) -> list[PeerSampleOut]:
        samples = await asyncio.to_thread(db.peer_history, _peer_id(peer_id), since, limit)
        return [PeerSampleOut(**{k: v for k, v in vars(s).items() if k != "peer_id"}) for s in samples]

    @router.get("/api/alerts", response_model=list[AlertOut])
    async def api_alerts(current: Session = Depends(guard.session)) -> list[AlertOut]:
        active = fleet.alerts.active.values() if fleet is not None else ()
        return [AlertOut(kind=a.kind, key=a.key, text=a.text) for a in active]

    async def act(peer_id: str, current: Session, kick: bool) -> PeerActionOut:
        if fleet is None:
            raise HTTPException(404, "this dashboard serves no run whose peers it could act on")
        done = await fleet.ban_peer(_peer_id(peer_id), actor=f"web:{current.username}", kick=kick)
        return PeerActionOut(peer_id=peer_id, done=done)

    @router.post("/api/peers/{peer_id}/ban", response_model=PeerActionOut,
                 summary="ban a peer: no more credit, out of every view, its key revoked on a keyed run")
    async def api_ban(peer_id: str, current: Session = Depends(guard.csrf)) -> PeerActionOut:
        return await act(peer_id, current, kick=False)

    @router.post("/api/peers/{peer_id}/kick", response_model=PeerActionOut,
                 summary="kick a peer: revoke the key it joined with (keyed runs)")
    async def api_kick(peer_id: str, current: Session = Depends(guard.csrf)) -> PeerActionOut:
        return await act(peer_id, current, kick=True)

    @router.get("/api/contributions.csv", response_class=Response)
    async def contributions_csv(current: Session = Depends(guard.session)) -> Response:
        rows = [(c.peer_id, c.samples, _iso(c.first_seen), _iso(c.last_seen))
                for c in await asyncio.to_thread(db.contributions)]
        return _csv("contributions.csv", ("peer_id", "samples", "first_seen_utc", "last_seen_utc"), rows)

    @router.get("/api/audit.csv", response_class=Response)
    async def audit_csv(limit: int = Query(100000, ge=1, le=1000000),
                        current: Session = Depends(guard.session)) -> Response:
        rows = [(e.id, _iso(e.at), e.actor, e.action, e.detail) for e in await asyncio.to_thread(db.audit_log, limit)]
        return _csv("audit.csv", ("id", "time_utc", "actor", "action", "detail"), rows)

    return router


def _peer_id(text: str) -> str:
    if not text.strip() or len(text) > 128:
        raise ConfigError("name the peer by its peer id (1 to 128 characters)")
    return text.strip()


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _csv(name: str, header: tuple[str, ...], rows: list[tuple]) -> Response:
    """A CSV download; cells that a spreadsheet would run as a formula (=, +, -, @) are quoted with '."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    for row in rows:
        writer.writerow(["'" + c if isinstance(c, str) and c[:1] in ("=", "+", "-", "@") else c for c in row])
    return Response(out.getvalue(), media_type="text/csv",
                    headers={"Content-Disposition": f'attachment; filename="{name}"'})


async def _points(request: Request, db: StateDB, since: int, period: float) -> AsyncIterator[str]:
    last = since
    while not await request.is_disconnected():
        for point in await asyncio.to_thread(db.metrics_history, last, 1000):
            last = point.id
            yield f"id: {point.id}\ndata: {json.dumps(vars(point))}\n\n"
        yield ": keep-alive\n\n"
        await asyncio.sleep(period)


class _QuietServer(uvicorn.Server):
    """uvicorn inside the bootstrap's loop: the bootstrap owns SIGINT/SIGTERM, not uvicorn."""

    def install_signal_handlers(self) -> None:
        pass

    @contextlib.contextmanager
    def capture_signals(self):  # uvicorn >= 0.29 captures signals in serve(); the bootstrap handles them
        yield


class DashboardServer:
    """Serve an app on ``host:port`` (port 0: a free one) in the running event loop; ``tls``:
    uvicorn's ``ssl_certfile``/``ssl_keyfile`` for https (``BootstrapSettings.tls()``). Behind a
    reverse proxy on this machine, its ``X-Forwarded-Proto`` is trusted (uvicorn's default: from
    127.0.0.1), so the session cookie is ``Secure`` when the proxy speaks https."""

    def __init__(self, app: FastAPI, host: str, port: int, *, tls: dict[str, str] | None = None):
        self.app, self.host, self.port = app, host, port
        self.tls = dict(tls or {})
        self._server: _QuietServer | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        config = uvicorn.Config(self.app, host=self.host, port=self.port, log_level="warning", access_log=False,
                                lifespan="off", timeout_graceful_shutdown=2, proxy_headers=True, **self.tls)
        self._server = _QuietServer(config)
        self._task = asyncio.create_task(self._serve(), name="dashboard")
        while not self._server.started:
            if self._task.done():  # it could not bind: the port is taken, say so
                self._task.result()
                raise OSError(f"the dashboard could not listen on {self.host}:{self.port}")
            await asyncio.sleep(0.05)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]

    async def _serve(self) -> None:
        try:
            await self._server.serve()
        except SystemExit as e:  # uvicorn exits when it cannot bind; raised in a task it stops the whole loop
            raise OSError(f"the dashboard could not listen on {self.host}:{self.port} (uvicorn exit {e.code})") from None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    async def stop(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(self._task, 10)
        self._task = None
