"""The ``DatasetSpec`` the settings name (``[data]``, ``--dataset``), for the bootstrap and trainers alike."""

from __future__ import annotations

from pathlib import Path

from dht.schemas import DatasetSpec
from core.config import DataSettings
from core.errors import ConfigError

__all__ = ["spec_from_settings"]

_FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".txt")


def spec_from_settings(data: DataSettings, *, split: str | None = None) -> DatasetSpec | None:
    """The spec of ``data.source`` (None when the settings name no dataset); ``split`` instead of
    ``data.split`` (the eval split). A local path is made absolute, so a manifest that carries it
    means the same files to every trainer on the machine (or the same shared mount)."""
    if data.source is None:
        return None
    path = Path(data.source).expanduser()
    if path.exists():
        source = str(path.resolve())
    elif path.is_absolute() or data.source.startswith(".") or path.suffix.lower() in _FILE_SUFFIXES:
        raise ConfigError(f"--dataset {data.source}: no such file or directory (a hub dataset is named like "
                          "org/name)")
    else:
        source = data.source
    return DatasetSpec(source=source, split=split or data.split, text_column=data.text_column,
                       config_name=data.config_name, num_shards=data.num_shards, streaming=data.streaming)
