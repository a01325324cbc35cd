"""A text dataset read through Hugging Face ``datasets``, cut into shards and packed into sequences.

* ``open_split``: ``datasets.load_dataset`` for a ``DatasetSpec``: a hub id (streamed by default,
  cached in the usual HF cache), a local directory (its files by their names: ``train.jsonl``,
  ``test.parquet``...) or one file (jsonl, json, parquet, csv, txt; its only split is ``train``;
  a txt file has one sample per line).
* ``shard_texts``: the samples of shard ``k`` of ``N``, those whose index in the split is ``k``
  modulo ``N``, from the ``start``-th of them on, with their sample ids (the index).
* ``Packer``: the shard's documents as tokens, each followed by the end-of-sequence token, cut into
  sequences of ``seq_len``; after each sequence it says the ``Position`` where reading stands, which is
  what a trainer commits and another resumes from.

The byte-level models (vocabulary 256, no tokenizer: ``swarm.text.ByteCodec``) have no end-of-sequence
token; the NUL byte (0), which text does not contain, separates their documents.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from dht.schemas import DatasetSpec
from peers.data.protocol import Position
from core.errors import ConfigError, NoTokenizer
from swarm.text import ByteCodec, TextCodec

__all__ = ["open_split", "shard_texts", "Packer", "Packed", "separator_token", "sample_ids"]

logger = logging.getLogger(__name__)

_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}
_BYTE_SEPARATOR = 0


def open_split(spec: DatasetSpec) -> Any:
    """The split's ``datasets.Dataset`` (or ``IterableDataset`` when streaming); ``ConfigError``
    naming the source and split when it cannot be read or lacks ``spec.text_column``."""
    import datasets

    path = Path(spec.source)
    streaming = spec.streaming if spec.streaming is not None else not path.exists()
    if path.is_file():
        builder = _BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ConfigError(f"--dataset {spec.source}: a file must be one of {', '.join(sorted(_BUILDERS))}")
        if spec.split != "train":
            raise ConfigError(f"--dataset {spec.source} is one file, whose only split is 'train', not "
                              f"{spec.split!r}: put train.jsonl and test.jsonl (say) in a directory to have both")
        args: tuple = (builder,)
        options: dict = {"data_files": str(path)}
    else:
        args, options = (str(path) if path.is_dir() else spec.source, spec.config_name), {}
    try:
        data = datasets.load_dataset(*args, split=spec.split, streaming=streaming, **options)
    except Exception as e:  # datasets raises many types (FileNotFoundError, ValueError, hub errors) for one meaning
        raise ConfigError(f"cannot load split {spec.split!r} of dataset {spec.source}: {type(e).__name__}: {e}") from None
    columns = data.column_names or []
    if spec.text_column not in columns:
        raise ConfigError(f"dataset {spec.source} has no column {spec.text_column!r} (it has "
                          f"{', '.join(columns) or 'none'}): name the text column with --text-column")
    return data


def shard_texts(data: Any, spec: DatasetSpec, shard: int, start: int = 0, *, num_shards: int | None = None
                ) -> Iterator[tuple[int, str]]:
    """``(sample id, text)`` of shard ``shard`` of ``num_shards`` (default: the spec's), skipping the
    first ``start`` samples of the shard. A streamed split is read from its start (skipping the
    samples of other shards); a map-style one jumps to the samples."""
    n = num_shards or spec.num_shards
    first = shard + start * n
    column = spec.text_column
    if hasattr(data, "__len__"):
        indices = range(first, len(data), n)
        for at in range(0, len(indices), 256):
            chunk = indices[at:at + 256]
            yield from zip(chunk, (str(text or "") for text in data.select(chunk)[column]))
        return
    for index, row in itertools.islice(enumerate(data), first, None, n):
        yield index, str(row[column] or "")


def separator_token(codec: TextCodec) -> int:
    """The token put after every document: the tokenizer's EOS, or NUL for byte-level models."""
    if codec.eos_token_id is not None:
        return int(codec.eos_token_id)
    if isinstance(codec, ByteCodec):
        return _BYTE_SEPARATOR
    raise NoTokenizer("the model's tokenizer has no end-of-sequence token to put between documents")


@dataclass
class Packed:
    """One sequence: its tokens, the samples it holds tokens of, and the position after it."""

    tokens: list[int]
    samples: list[int]
    position: Position


@dataclass
class Packer:
    """Packs ``documents`` (``(sample id, text)``, the shard's from ``start.doc`` on) into sequences of
    ``seq_len`` tokens, starting ``start.offset`` tokens into the first document. An empty document
    adds nothing (not even a separator). The tokens left at the end, too few for a sequence, are dropped."""

    documents: Iterator[tuple[int, str]]
    codec: TextCodec
    seq_len: int
    start: Position = field(default_factory=Position)
    _doc: int = -1
    _tokens: list[int] = field(default_factory=list)
    _used: int = 0
    _sample: int = -1
    _tokens_out: int = 0

    def __post_init__(self) -> None:
        self._eos = separator_token(self.codec)
        self._doc, self._tokens_out = self.start.doc - 1, self.start.tokens
        if self._advance():
            self._used = min(self.start.offset, len(self._tokens))

    def _advance(self) -> bool:
        """Move to the next document; False at the end of the shard."""
        found = next(self.documents, None)
        if found is None:
            return False
        self._sample, text = found
        self._doc += 1
        self._tokens = self.codec.encode(text) + [self._eos] if text.strip() else []
        self._used = 0
        return True

    def next(self) -> Packed | None:
        """The next sequence, or None when the shard has fewer than ``seq_len`` tokens left."""
        tokens: list[int] = []
        samples: list[int] = []
        while len(tokens) < self.seq_len:
            if self._used >= len(self._tokens) and not self._next_document():
                return None
            take = min(self.seq_len - len(tokens), len(self._tokens) - self._used)
            tokens += self._tokens[self._used:self._used + take]
            self._used += take
            if not samples or samples[-1] != self._sample:
                samples.append(self._sample)
        self._tokens_out += len(tokens)
        return Packed(tokens, samples, self.position)

    def _next_document(self) -> bool:
        while self._advance():
            if self._tokens:
                return True
        return False

    @property
    def position(self) -> Position:
        """Where the reading stands: documents fully behind, tokens of the next one used, tokens out."""
        if self._doc < self.start.doc:  # the shard had no document left at the start
            return Position(doc=self.start.doc, offset=0, tokens=self._tokens_out)
        if self._used >= len(self._tokens):
            return Position(doc=self._doc + 1, offset=0, tokens=self._tokens_out)
        return Position(doc=self._doc, offset=self._used, tokens=self._tokens_out)


def sample_ids(shard: int, num_shards: int, start: Position, end: Position) -> list[int]:
    """The sample ids of shard ``shard`` read between two positions (a document begun counts)."""
    last = end.doc + (1 if end.offset else 0)
    return [shard + doc * num_shards for doc in range(start.doc, last)]
