"""What the CLI prints that others wrote (errors, multiaddrs, peer ids, model names, log messages) is
printed as text: rich reads ``[/ip4/127.0.0.1/tcp/1]`` as a closing tag, and a closing tag that opens
nothing made ``swarm train`` end in a ``MarkupError`` traceback instead of its error line (issue 21)."""

from __future__ import annotations

import io
import logging
import sys

import pytest
from rich.console import Console

from swarm import cli
from swarm.logs import setup_logging
from peers.telemetry.status import Status
from swarm.status_view import render_status

ADDRESS = "[/ip4/127.0.0.1/tcp/1]"


def test_an_error_holding_a_bracketed_multiaddr_is_printed_verbatim(monkeypatch, capsys):
    """``swarm train --bootstrap '[/ip4/127.0.0.1/tcp/1]'`` as a user types it, through ``main``: the
    settings refuse the address, and the error naming it is one clean line with exit code 2."""
    monkeypatch.setattr(sys, "argv", ["swarm", "train", "--bootstrap", ADDRESS])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    err = capsys.readouterr().err
    assert exited.value.code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert f"'{ADDRESS}' is not a multiaddr" in err, err
    assert "MarkupError" not in err and "Traceback" not in err


@pytest.mark.parametrize("width", [40, 200])
def test_error_lines_are_plain_text_on_one_line(width):
    out = io.StringIO()
    message = f"stage 0's peer 37439: PeerUnavailable: failed to dial: connection refused {ADDRESS} [bold]x[/]"
    cli._print_error(Console(file=out, width=width, force_terminal=True, color_system=None), RuntimeError(message))
    assert out.getvalue() == f"error: {message}\n"


def test_log_messages_in_a_terminal_are_not_markup():
    """The terminal handler (rich, in a terminal) prints a message holding a multiaddr as it is."""
    out = io.StringIO()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        setup_logging("INFO", console=Console(file=out, width=300, force_terminal=True, color_system=None))
        logging.getLogger("trainer.pipeline").warning("dialing %s failed: connection refused", ADDRESS)
    finally:
        root.handlers[:], root.level = handlers, level
    assert f"dialing {ADDRESS} failed: connection refused" in out.getvalue()


def test_the_status_view_shows_a_run_and_model_name_with_brackets_as_they_are():
    status = {"run": {"state": "idle", "step": 0, "trainers": 0, "tokens_per_s": 0.0, "loss": None, "loss_trend": []},
              "swarm_throughput": 0.0, "stages": [], "peers": [], "bottleneck_stage": None, "delegations": [],
              "warnings": [], "run_id": "[/run]", "model": "[/org/model]", "num_layers": 2, "time": 0.0, "step": 0,
              "trainers": 0, "target_batch_size": 8}
    status = Status.model_validate(status)
    out = io.StringIO()
    Console(file=out, width=80, color_system=None).print(render_status(status))
    assert "[/run]: [/org/model] (2 layers)" in out.getvalue()
