"""What the benchmarks share: this checkout first on ``sys.path``, a scratch folder holding the run's
tiny model, a local swarm of ``swarm`` processes that is stopped whatever happens, one training step,
seeded random token batches, the process-tree RSS / PSS / CPU figures, and the common flags.

Every benchmark imports it before any project module (a script's own folder, ``benchmarks/``, is
``sys.path[0]``), so a benchmark measures this checkout's code, not another installed copy. Project
modules and torch are imported inside the functions that use them: ``profile_step.py --root`` puts
another checkout first after this import and its modules must come from there, and helper processes
such as ``wan.py``'s packet-delay process import this module without needing torch.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

if TYPE_CHECKING:
    import torch

    from swarm.procs import ProcessGroup

__all__ = [
    "ROOT",
    "add_batch_flags",
    "local_swarm",
    "parser",
    "processes",
    "random_ids",
    "timed_steps",
    "train_step",
    "tree_cpu",
    "tree_memory",
    "tree_rss",
    "wait_or_kill",
    "workspace",
    "add_device_flags",
    "peer_env",
    "synchronize",
]


def parser(doc: str) -> argparse.ArgumentParser:
    """A benchmark's argument parser, its module docstring as ``--help`` text, line breaks kept."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def add_batch_flags(parser: argparse.ArgumentParser, *, batch: int, seq: int) -> None:
    """``--batch`` (rows) and ``--seq`` (tokens a row) with this benchmark's defaults."""
    parser.add_argument("--batch", type=int, default=batch)
    parser.add_argument("--seq", type=int, default=seq)


def add_device_flags(parser: argparse.ArgumentParser) -> None:
    """``--device`` (where the peers, the swarm's trainer and the local baseline compute; default
    cpu, as before) and ``--dtype`` (the run's precision; the local baseline autocasts to it)."""
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto: the peers, the "
                        "swarm's trainer and the local baseline")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="the run's precision (--dtype of swarm bootstrap); the local baseline autocasts to it")


def peer_env(device: str) -> dict[str, str]:
    """The environment that puts ``swarm join`` peers on ``device``."""
    return {"SWARM_PEER__DEVICE": device}


def synchronize(device: str) -> None:
    """Wait for the GPU's queued work (a timed local step on CUDA is asynchronous until then)."""
    import torch

    if torch.device(device).type == "cuda" or (device == "auto" and torch.cuda.is_available()):
        torch.cuda.synchronize()


def workspace(prefix: str, family: str, **config: Any) -> tuple[Path, Path]:
    """A new folder (kept after the run: logs and state are read there) and the tiny model saved in
    its ``model/``; ``config`` as ``shards.tiny.make_tiny_model`` takes it."""
    from shards.tiny import make_tiny_model

    root = Path(tempfile.mkdtemp(prefix=prefix))
    return root, make_tiny_model(root / "model", family, **config)


@contextmanager
def processes(root: Path) -> Iterator[ProcessGroup]:
    """A ``ProcessGroup`` logging under ``root`` whose processes are all stopped on the way out,
    also on an error or Ctrl+C."""
    from swarm.procs import ProcessGroup

    procs = ProcessGroup(root)
    try:
        yield procs
    finally:
        procs.stop_all()


@contextmanager
def local_swarm(root: Path, model_dir: Path, *, num_stages: int, num_peers: int,
                **options: Any) -> Iterator[tuple[ProcessGroup, str]]:
    """A bootstrap and ``num_peers`` peers on loopback (state under ``root / "state"``), every peer
    serving when the body starts; yields the group and the bootstrap's address. ``options`` as
    ``ProcessGroup.start_swarm`` takes them."""
    with processes(root) as procs:
        address = procs.start_swarm(model_dir, num_stages=num_stages, num_peers=num_peers, state_dir=root / "state",
                                    **options)
        procs.wait_serving(num_peers)
        yield procs, address


def wait_or_kill(proc: subprocess.Popen, timeout: float) -> None:
    """Give a child that was told to end (a stop file, its stdin closed) ``timeout`` seconds to do so,
    then SIGKILL it: a benchmark never leaves a process behind."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def random_ids(vocab: int, batch: int, seq: int, seed: int = 0) -> Iterator[torch.Tensor]:
    """Endless ``batch`` x ``seq`` batches of token ids below ``vocab``, the same ones for a seed."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randint(0, vocab, (batch, seq), generator=generator)


def train_step(model: Any, optimizer: Any, ids: torch.Tensor, *, overlapped: bool = False) -> torch.Tensor:
    """One training step on ``ids`` (the labels too); returns the loss. ``overlapped``: the swarm
    model's ``train_step`` (each microbatch's backward as soon as its loss is known, as ``swarm
    train`` does) instead of the README's ``model(...).loss.backward()``."""
    if overlapped:
        loss = model.train_step(ids)
    else:
        loss = model(ids, labels=ids).loss
        loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss


def timed_steps(model: Any, optimizer: Any, batches: Iterator[torch.Tensor],
                keep_going: Callable[[], bool]) -> Iterator[dict]:
    """Training steps while ``keep_going()``: one record a step, ``end`` (``time.monotonic()``) with
    ``took`` (seconds) and ``loss``, or with ``error``. A failed step is recorded and the next one
    runs: how many fail is one of the figures."""
    while keep_going():
        ids = next(batches)
        started = time.perf_counter()
        try:
            loss = train_step(model, optimizer, ids)
        except Exception as e:  # survived and counted, whatever it is
            yield {"end": time.monotonic(), "error": f"{type(e).__name__}: {e}"[:300]}
        else:
            yield {"end": time.monotonic(), "took": time.perf_counter() - started, "loss": loss.item()}


def _tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def tree_rss(pid: int) -> int:
    """RSS bytes of a process and its children (a peer: its DHT process, p2pd, averager); 0 once it
    is gone."""
    try:
        return sum(p.memory_info().rss for p in _tree(pid))
    except psutil.Error:
        return 0


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a process and its children so far (children that exited are
    not counted: read it while they run)."""
    try:
        return sum(sum(p.cpu_times()[:2]) for p in _tree(pid))
    except psutil.Error:
        return 0.0


def tree_memory(pid: int, parts: list[str] | None = None) -> tuple[int, int, int]:
    """(PSS, RSS, number of processes) summed over ``pid`` and all its descendants, a process that
    ends meanwhile left out; ``parts`` gets a line per process."""
    pss = rss = count = 0
    for proc in _tree(pid):
        try:
            info, name = proc.memory_full_info(), " ".join(proc.cmdline()[:3])[-60:]
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        pss, rss, count = pss + info.pss, rss + info.rss, count + 1
        if parts is not None:
            parts.append(f"    pid {proc.pid:>7}  PSS {info.pss / 2**20:7.1f} MiB  RSS {info.rss / 2**20:7.1f} MiB  {name}")
    return pss, rss, count
