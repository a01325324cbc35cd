"""Where a model's files are, and reading only the tensors a peer needs from them.

A model is a local directory (``config.json`` + ``*.safetensors``, sharded with
``model.safetensors.index.json`` or not) or a hub id resolved through the standard HF cache
(``HF_HOME``): config and index first, then only the shard files holding requested tensors.
"""

from __future__ import annotations

import hashlib
import json
import re
from functools import cached_property
from pathlib import Path
from typing import Iterable

import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
from safetensors import safe_open
from transformers import AutoConfig, PretrainedConfig

from shards.families import SUPPORTED_FAMILIES, unsupported_architecture
from core.errors import ModelLoadError

__all__ = ["ModelSource", "resolve_model"]

_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"
_COMMIT = re.compile(r"[0-9a-f]{40}")


class ModelSource:
    """A resolved model: its config, which file holds each tensor, and selective loading.

    Contract: nothing is read or downloaded before it is asked for, and ``load`` opens only the
    files holding the requested tensors. ``loaded_names`` and ``opened_files`` record what was
    actually read, so tests (and curious operators) can check that a peer never touched tensors
    outside its layers. ``name`` is the string the user gave; ``root`` the directory holding
    ``config.json`` (a snapshot directory of the HF cache for hub ids).
    """

    def __init__(self, name: str, root: Path, *, repo_id: str | None = None, revision: str | None = None):
        self.name, self.root, self.repo_id, self.revision = name, root, repo_id, revision
        self.loaded_names: set[str] = set()
        self.opened_files: set[str] = set()

    def __repr__(self) -> str:
        return f"ModelSource({self.name!r}, root={str(self.root)!r})"

    @cached_property
    def config(self) -> PretrainedConfig:
        """The transformers config; blocks get sdpa attention unless the config says otherwise."""
        raw = self._raw_config
        try:
            config = AutoConfig.from_pretrained(self.root)
        except (ValueError, KeyError) as e:
            if raw.get("model_type") not in SUPPORTED_FAMILIES:
                raise unsupported_architecture(raw.get("model_type"), raw.get("architectures")) from None
            raise ModelLoadError(f"cannot read config.json of {self.name}: {_first_line(e)}") from None
        # AutoModelForCausalLM picks sdpa by default; a bare config would have no implementation set
        config._attn_implementation = getattr(config, "_attn_implementation", None) or "sdpa"
        return config

    @cached_property
    def config_hash(self) -> str:
        """sha256 of config.json as canonical JSON: equal for equal configs, whatever the formatting."""
        canonical = json.dumps(self._raw_config, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def tensor_names(self) -> list[str]:
        return list(self._weight_map)

    def load(self, names: Iterable[str], *, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Read exactly ``names``, opening (or downloading) only the files that hold them, each tensor
        straight onto ``device`` (safetensors copies from the mapped file to a GPU tensor by tensor:
        no host copy of the whole set is made on the way)."""
        by_file: dict[str, list[str]] = {}
        for name in names:
            if name not in self._weight_map:
                raise ModelLoadError(f"{self.name} has no tensor {name!r}")
            by_file.setdefault(self._weight_map[name], []).append(name)
        tensors: dict[str, torch.Tensor] = {}
        for filename, wanted in by_file.items():
            tensors.update(self._read(filename, wanted, str(device)))
        return tensors

    @cached_property
    def _raw_config(self) -> dict:
        try:
            return json.loads((self.root / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"cannot read config.json of {self.name}: {_first_line(e)}") from None

    @cached_property
    def _weight_map(self) -> dict[str, str]:
        index = self._fetch(_INDEX, required=False)
        if index is not None:
            return dict(json.loads(index.read_text())["weight_map"])
        single = self._fetch(_SINGLE, required=True)
        with safe_open(single, framework="pt") as f:
            return {name: _SINGLE for name in f.keys()}

    def _read(self, filename: str, names: list[str], device: str) -> dict[str, torch.Tensor]:
        path = self._fetch(filename, required=True)
        self.opened_files.add(filename)
        try:
            with safe_open(path, framework="pt", device=device) as f:
                tensors = {name: f.get_tensor(name) for name in names}
        except Exception as e:  # safetensors raises its own untyped errors for corrupt or truncated files
            raise ModelLoadError(f"cannot read {filename} of {self.name}: {_first_line(e)}") from None
        self.loaded_names.update(names)
        return tensors

    def _fetch(self, filename: str, *, required: bool) -> Path | None:
        local = self.root / filename
        if local.is_file():
            return local
        if self.repo_id is not None:
            downloaded = _hub_file(self.repo_id, filename, self.revision, required=required)
            if downloaded is not None:
                return downloaded
        if required:
            raise ModelLoadError(f"{self.name} has no {filename} (swarm reads safetensors checkpoints only)")
        return None


def resolve_model(model: str | Path | ModelSource, *, revision: str | None = None) -> ModelSource:
    """A local directory as is, or a hub id through the HF cache (fetching config.json only).

    A ``ModelSource`` passes through unchanged, so every loader accepts either.
    """
    if isinstance(model, ModelSource):
        return model
    name = str(model)
    path = Path(name).expanduser()
    if path.is_dir():
        return _local_source(name, path)
    if not _looks_like_hub_id(name):
        raise ModelLoadError(f"model directory {name} does not exist")
    config = _hub_file(name, "config.json", revision, required=True)
    root = config.parent
    pinned = root.name if _COMMIT.fullmatch(root.name) else revision
    return ModelSource(name, root, repo_id=name, revision=pinned)


def _local_source(name: str, path: Path) -> ModelSource:
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"model directory {name} has no config.json")
    if not any(path.glob("*.safetensors")):
        raise ModelLoadError(f"model directory {name} has no model.safetensors nor any *.safetensors file "
                             "(swarm reads safetensors checkpoints only)")
    return ModelSource(name, path)


def _looks_like_hub_id(name: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", name)) and ".." not in name


def _hub_file(repo_id: str, filename: str, revision: str | None, *, required: bool) -> Path | None:
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision))
    except (EntryNotFoundError, LocalEntryNotFoundError) as e:
        if not required:
            return None
        raise ModelLoadError(f"cannot get {filename} of {repo_id!r} from the hub or the HF cache: "
                             f"{_first_line(e)}") from None
    except Exception as e:  # repository not found, HTTP and network errors: name the model and stop
        if not required and "404" in str(e):
            return None
        raise ModelLoadError(f"cannot resolve model {repo_id!r}: {type(e).__name__}: {_first_line(e)}") from None


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
