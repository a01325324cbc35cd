"""Checkpoints of one part (a stage, or a trainer's local parts) in one directory.

A checkpoint is ``step-<n>.safetensors`` (the tensors of a state, see ``peers.state.snapshot``) and
``step-<n>.json`` (its ``StateMeta``). Both are written to a temporary file, flushed and renamed into
place, the JSON last: a checkpoint exists once its JSON does, so a crash mid-write leaves at most a
stray temporary file, never a half checkpoint. Only the newest ``keep`` checkpoints are kept.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from peers.state.snapshot import StateMeta
from core.errors import CapacityExceeded, StateMismatch

__all__ = ["CheckpointDir"]

logger = logging.getLogger(__name__)

_NAME = re.compile(r"step-(\d{10})\.json")


class CheckpointDir:
    """The checkpoints of one part under ``root``; ``save`` keeps the newest ``keep`` of them."""

    def __init__(self, root: Path, *, keep: int = 2):
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self.root, self.keep = Path(root), keep

    def save(self, meta: StateMeta, tensors: dict[str, torch.Tensor]) -> Path:
        """Write one checkpoint atomically and drop the ones beyond ``keep``; returns the JSON's path."""
        stem = self.root / f"step-{meta.step:010d}"
        tmp, tmp_meta = stem.with_suffix(".safetensors.tmp"), stem.with_suffix(".json.tmp")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            save_file({k: t.contiguous() for k, t in tensors.items()}, str(tmp), metadata={"format": "pt"})
            _sync_and_rename(tmp, stem.with_suffix(".safetensors"))
            tmp_meta.write_text(meta.model_dump_json())
            _sync_and_rename(tmp_meta, stem.with_suffix(".json"))
        except (OSError, SafetensorError) as e:  # a full disk, a read-only dir: the ones there are untouched
            for partial in (tmp, tmp_meta):
                with contextlib.suppress(OSError):
                    partial.unlink(missing_ok=True)
            why = getattr(e, "strerror", None) or e
            raise CapacityExceeded(f"cannot write checkpoint {stem.name} in {self.root}: {why}; the previous "
                                   "checkpoints are kept") from None
        self._prune()
        return stem.with_suffix(".json")

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints here, oldest first."""
        if not self.root.is_dir():
            return []
        found = (_NAME.fullmatch(path.name) for path in self.root.iterdir())
        return sorted(int(match.group(1)) for match in found if match)

    def latest(self) -> StateMeta | None:
        """The meta of the newest readable checkpoint, or None."""
        for step in reversed(self.steps()):
            try:
                return self.meta(step)
            except StateMismatch as e:
                logger.warning("skipping checkpoint step %d in %s: %s", step, self.root, e)
        return None

    def meta(self, step: int) -> StateMeta:
        path = self.root / f"step-{step:010d}.json"
        try:
            return StateMeta.model_validate_json(path.read_text())
        except (OSError, ValidationError) as e:
            raise StateMismatch(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None

    def load(self, step: int) -> tuple[StateMeta, dict[str, torch.Tensor]]:
        meta = self.meta(step)
        path = self.root / f"step-{step:010d}.safetensors"
        try:
            tensors = load_file(str(path))
        except Exception as e:  # safetensors raises its own untyped errors for corrupt or truncated files
            raise StateMismatch(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None
        return meta, tensors

    def _prune(self) -> None:
        for step in self.steps()[: -self.keep]:
            for suffix in (".json", ".safetensors"):  # the marker first: never a meta without its tensors
                (self.root / f"step-{step:010d}{suffix}").unlink(missing_ok=True)


def _sync_and_rename(tmp: Path, final: Path) -> None:
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
