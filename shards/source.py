"""Where a model's files are, and reading only the tensors a peer needs from them.

A model is a local directory (``config.json`` + ``*.safetensors``, sharded with
``model.safetensors.index.json`` or not) or a hub id resolved through the standard HF cache
(``HF_HOME``): config and index first, then only the shard files holding requested tensors.
"""

from __future__ import annotations

import hashlib
import json
from functools import cached_property
from pathlib import Path
from typing import Iterable

import torch
from safetensors import safe_open
from transformers import AutoConfig, PretrainedConfig

from swarm.errors import ModelLoadError

__all__ = ["ModelSource", "resolve_model"]

_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"


class ModelSource:
    """A resolved model: its config, which file holds each tensor, and selective loading.

    ``loaded_names`` and ``opened_files`` record what was actually read, so tests (and curious
    operators) can check that a peer never touched tensors outside its layers.
    """

    def __init__(self, name: str, root: Path, *, repo_id: str | None = None, revision: str | None = None):
        self.name, self.root, self.repo_id, self.revision = name, root, repo_id, revision
        self.loaded_names: set[str] = set()
        self.opened_files: set[str] = set()

    @cached_property
    def config(self) -> PretrainedConfig:
        try:
            config = AutoConfig.from_pretrained(self.root)
        except (ValueError, KeyError, OSError) as e:
            raise ModelLoadError(f"cannot read config.json of {self.name}: {e}") from None
        # what AutoModelForCausalLM picks by default on CPU and GPU alike; blocks built from a bare
        # config would otherwise have no attention implementation at all
        config._attn_implementation = getattr(config, "_attn_implementation", None) or "sdpa"
        return config

    @cached_property
    def config_hash(self) -> str:
        data = json.loads((self.root / "config.json").read_text())
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()

    @cached_property
    def _weight_map(self) -> dict[str, str]:
        index = self._fetch(_INDEX, required=False)
        if index is not None:
            return dict(json.loads(index.read_text())["weight_map"])
        single = self._fetch(_SINGLE, required=True)
        with safe_open(single, framework="pt") as f:
            return {name: _SINGLE for name in f.keys()}

    def tensor_names(self) -> list[str]:
        return list(self._weight_map)

    def load(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """Read exactly ``names``, opening only the files that hold them."""
        by_file: dict[str, list[str]] = {}
        for name in names:
            if name not in self._weight_map:
                raise ModelLoadError(f"{self.name} has no tensor {name!r}")
            by_file.setdefault(self._weight_map[name], []).append(name)
        tensors: dict[str, torch.Tensor] = {}
        for filename, wanted in by_file.items():
            path = self._fetch(filename, required=True)
            self.opened_files.add(filename)
            with safe_open(path, framework="pt") as f:
                for name in wanted:
                    tensors[name] = f.get_tensor(name)
            self.loaded_names.update(wanted)
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
            raise ModelLoadError(f"{self.name} has no {filename} (swarm loads safetensors checkpoints)")
        return None


def resolve_model(model: str | Path | ModelSource, *, revision: str | None = None) -> ModelSource:
    """A local directory as is, or a hub id through the HF cache (downloading only config and index)."""
    if isinstance(model, ModelSource):
        return model
    name = str(model)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{name} is a directory without config.json")
        return ModelSource(name, path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or not name.strip():
        raise ModelLoadError(f"model directory {name} does not exist")
    config = _hub_file(name, "config.json", revision, required=True)
    return ModelSource(name, config.parent, repo_id=name, revision=revision)


def _hub_file(repo_id: str, filename: str, revision: str | None, *, required: bool) -> Path | None:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision))
    except (EntryNotFoundError, LocalEntryNotFoundError) as e:
        if not required:
            return None
        raise ModelLoadError(f"cannot get {filename} of {repo_id!r} from the hub or the HF cache: "
                             f"{str(e).splitlines()[0]}") from None
    except Exception as e:  # RepositoryNotFoundError, HTTP and network errors: name the model and go
        if not required and "404" in str(e):
            return None
        raise ModelLoadError(f"cannot resolve model {repo_id!r}: {type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}") from None
