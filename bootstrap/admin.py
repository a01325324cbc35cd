"""Who may use the dashboard: the admin's password (argon2 hash in ``state.db``), sessions with a
CSRF token each, and a limit on failed logins.

There is no default password. It is set from ``SWARM_ADMIN_PASSWORD`` when the bootstrap starts
(hashed at once; the variable is the way to change it too), or with ``swarm admin password``. Until
one is set, every login fails with a message saying how to set it.
"""

from __future__ import annotations

import secrets
import time
from collections import deque
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from bootstrap.state import StateDB
from core.errors import AuthRejected, ConfigError

__all__ = ["AdminAuth", "LoginLimiter", "Session", "set_admin_password", "MIN_PASSWORD"]

MIN_PASSWORD = 10
_HASHER = PasswordHasher()


def set_admin_password(db: StateDB, username: str, password: str, *, actor: str) -> None:
    """Store the admin's username and the argon2 hash of ``password`` (never the password)."""
    if len(password) < MIN_PASSWORD:
        raise ConfigError(f"the admin password must have at least {MIN_PASSWORD} characters")
    if not username.strip() or len(username) > 64:
        raise ConfigError("the admin username must have 1 to 64 characters")
    db.set_meta("admin_user", username.strip())
    db.set_meta("admin_hash", _HASHER.hash(password))
    db.audit(actor, "admin.password", f"set for {username.strip()}")


@dataclass(frozen=True)
class Session:
    token: str
    username: str
    csrf: str
    expires: float


class LoginLimiter:
    """At most ``attempts`` failed logins per client in ``window`` seconds; then refuse until the
    oldest failure leaves the window."""

    def __init__(self, attempts: int = 5, window: float = 300.0):
        self.attempts, self.window = attempts, window
        self._failures: dict[str, deque[float]] = {}

    def retry_after(self, client: str, now: float | None = None) -> float:
        """Seconds until ``client`` may try again (0 if it may now)."""
        now = time.monotonic() if now is None else now
        failures = self._failures.get(client)
        if not failures:
            return 0.0
        while failures and failures[0] <= now - self.window:
            failures.popleft()
        if len(failures) < self.attempts:
            return 0.0
        return failures[0] + self.window - now

    def failed(self, client: str, now: float | None = None) -> None:
        self._failures.setdefault(client, deque()).append(time.monotonic() if now is None else now)

    def succeeded(self, client: str) -> None:
        self._failures.pop(client, None)


class AdminAuth:
    """Logins against the stored hash, and the sessions they open (in memory: a restarted
    bootstrap asks its admin to log in again)."""

    def __init__(self, db: StateDB, *, session_ttl: float = 12 * 3600, limiter: LoginLimiter | None = None):
        self.db, self.session_ttl = db, session_ttl
        self.limiter = limiter or LoginLimiter()
        self._sessions: dict[str, Session] = {}

    @property
    def configured(self) -> bool:
        return self.db.get_meta("admin_hash") is not None

    def login(self, username: str, password: str, client: str) -> Session:
        """A new session, or ``AuthRejected``; every failure is audited."""
        wait = self.limiter.retry_after(client)
        if wait > 0:
            self.db.audit(f"{username[:64]}@{client}", "login.limited", f"retry in {wait:.0f} s")
            raise AuthRejected(f"too many failed logins: try again in {wait:.0f} s")
        stored_user, stored_hash = self.db.get_meta("admin_user"), self.db.get_meta("admin_hash")
        if stored_hash is None:
            raise AuthRejected("no admin password is set: start the bootstrap with SWARM_ADMIN_PASSWORD "
                               "or run `swarm admin password`")
        if not (secrets.compare_digest(username, stored_user or "") and _verify(stored_hash, password)):
            self.limiter.failed(client)
            self.db.audit(f"{username[:64]}@{client}", "login.failed", "wrong username or password")
            raise AuthRejected("wrong username or password")
        self.limiter.succeeded(client)
        self.db.audit(f"{username}@{client}", "login", "")
        session = Session(secrets.token_urlsafe(32), username, secrets.token_urlsafe(32),
                          time.time() + self.session_ttl)
        self._sessions[session.token] = session
        return session

    def session(self, token: str | None) -> Session | None:
        session = self._sessions.get(token or "")
        if session is not None and session.expires <= time.time():
            del self._sessions[session.token]
            return None
        return session

    def logout(self, token: str | None) -> None:
        session = self._sessions.pop(token or "", None)
        if session is not None:
            self.db.audit(session.username, "logout", "")


def _verify(stored_hash: str, password: str) -> bool:
    try:
        return _HASHER.verify(stored_hash, password)
    except (VerificationError, InvalidHashError):
        return False
