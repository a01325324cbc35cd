"""Logging of every swarm command: levels, the node's peer id on every line, terminal and file.

* the terminal (stderr): rich when it is a terminal, else one plain greppable line per record;
* a rotating file ``<state_dir>/<run>/logs/<command>.log`` of JSON lines (``ts``, ``level``,
  ``logger``, ``peer``, ``msg``, ``exc``), for the commands that run for long (bootstrap, join, train).
  A second process of the same command on the same state dir writes ``<command>-<pid>.log``.

``set_log_identity(peer_id)`` stamps the lines from then on with that node's id. This module imports
nothing from the project, so every layer may use it.
"""

from __future__ import annotations

import fcntl
import json
import logging
import logging.handlers
import os
from pathlib import Path
from typing import IO

from rich.console import Console
from rich.logging import RichHandler
from core.types import PeerId

__all__ = ["setup_logging", "set_log_identity", "JsonFormatter", "PROJECT_LOGGERS"]

PROJECT_LOGGERS = ("swarm", "trainer", "delegation", "bootstrap", "peers", "net", "dht", "shards", "core")

_identity = ""
_lock_files: list[IO] = []


def set_log_identity(peer_id: PeerId) -> None:
    """Every log line of this process names ``peer_id`` from now on."""
    global _identity
    _identity = peer_id


class _IdentityFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.peer = _identity
        record.peer_tag = f"[{_identity[-8:]}] " if _identity else ""
        return True


_LEVELS = {logging.DEBUG: "DEBUG", logging.INFO: "INFO", logging.WARNING: "WARNING", logging.ERROR: "ERROR",
           logging.CRITICAL: "CRITICAL"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: what a log shipper or ``jq`` reads. Level names are the standard
    ones whatever another library renamed them to (hivemind shows WARNING as WARN)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": round(record.created, 3), "level": _LEVELS.get(record.levelno, record.levelname), "logger": record.name,
                 "peer": getattr(record, "peer", ""), "msg": record.getMessage()}
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(level: str, *, console: Console | None = None, log_dir: Path | None = None,
                  command: str = "swarm", max_bytes: int = 10 << 20, backups: int = 3) -> Path | None:
    """Configure the root logger (idempotent); returns the log file's path when there is one."""
    console = console or Console(stderr=True)
    identity = _IdentityFilter()
    if console.is_terminal:
        # markup=False (rich's default, said here because it matters): messages carry multiaddrs, peer ids
        # and remote errors, and "[/ip4/...]" read as markup is a closing tag that crashes the handler
        terminal: logging.Handler = RichHandler(console=console, show_path=False, rich_tracebacks=False,
                                                markup=False)
        terminal.setFormatter(logging.Formatter("%(peer_tag)s%(message)s"))
    else:  # a log file or a pipe: one unwrapped line per record, so it can be grepped
        terminal = logging.StreamHandler(console.file)
        terminal.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(peer_tag)s%(name)s: %(message)s"))
    terminal.addFilter(identity)
    handlers = [terminal]
    path = _log_file(log_dir, command) if log_dir is not None else None
    if path is not None:
        file_handler = logging.handlers.RotatingFileHandler(path, maxBytes=max_bytes, backupCount=backups)
        file_handler.setFormatter(JsonFormatter())
        file_handler.addFilter(identity)
        handlers.append(file_handler)
    logging.basicConfig(level=logging.WARNING, handlers=handlers, force=True)
    for name in PROJECT_LOGGERS:
        logging.getLogger(name).setLevel(level)
    return path


def _log_file(log_dir: Path, command: str) -> Path | None:
    """``<command>.log`` unless another live process holds it, then ``<command>-<pid>.log``.
    A state dir that cannot be written costs the file, not the command (a warning says so)."""
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
        lock = (log_dir / f".{command}.lock").open("a")
    except OSError as e:
        logging.getLogger("swarm").warning("no log file in %s: %s", log_dir, e.strerror)
        return None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # held by another process of the same command: a file of our own
        lock.close()
        return log_dir / f"{command}-{os.getpid()}.log"
    _lock_files.append(lock)  # held for the life of the process
    return log_dir / f"{command}.log"
