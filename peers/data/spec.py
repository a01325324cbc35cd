"""The ``DatasetSpec`` the settings name (``[data]``, ``--dataset``), for the bootstrap and trainers alike."""

from __future__ import annotations

from pathlib import Path

from dht.schemas import DatasetSpec
from core.config import DataSettings

__all__ = ["spec_from_settings"]


def spec_from_settings(data: DataSettings, *, split: str | None = None) -> DatasetSpec | None:
    """The spec of ``data.source`` (None when the settings name no dataset); ``split`` instead of
    ``data.split`` (the eval split). A local path is made absolute, so a manifest that carries it
    means the same files to every trainer on the machine (or the same shared mount)."""
    if data.source is None:
        return None
    source = str(Path(data.source).expanduser().resolve()) if Path(data.source).expanduser().exists() else data.source
    return DatasetSpec(source=source, split=split or data.split, text_column=data.text_column,
                       config_name=data.config_name, num_shards=data.num_shards, streaming=data.streaming)
