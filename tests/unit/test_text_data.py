"""Datasets through Hugging Face ``datasets`` (files the test writes: jsonl, parquet, txt, a directory
with splits), cut into shards by sample index and packed into sequences with a separator between
documents; a packer started at a committed position goes on exactly as the first one did."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dht.schemas import DatasetSpec
from peers.data.protocol import Position
from core.config import DataSettings
from core.errors import ConfigError
from peers.data.spec import spec_from_settings
from swarm.evaluation import eval_batches, evaluate
from swarm.text import ByteCodec
from swarm.text_data import Packer, open_split, sample_ids, separator_token, shard_texts

TEXTS = [f"document {i} " + "ab" * (i % 5) for i in range(23)]


def _write(directory: Path, kind: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    if kind == "jsonl":
        path = directory / "train.jsonl"
        path.write_text("".join(json.dumps({"text": t, "n": i}) + "\n" for i, t in enumerate(TEXTS)))
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = directory / "train.parquet"
        pq.write_table(pa.table({"text": TEXTS, "n": list(range(len(TEXTS)))}), path)
    else:
        path = directory / "train.txt"
        path.write_text("\n".join(TEXTS) + "\n")
    return path


def _packed(spec: DatasetSpec, shard: int, seq_len: int, start: Position = Position()) -> list:
    packer = Packer(shard_texts(open_split(spec), spec, shard, start.doc), ByteCodec(), seq_len, start=start)
    out = []
    while (packed := packer.next()) is not None:
        out.append(packed)
    return out


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "txt"])
def test_each_file_kind_is_read_and_cut_into_shards_by_sample_index(tmp_path: Path, kind: str):
    spec = DatasetSpec(source=str(_write(tmp_path, kind)), num_shards=4)
    data = open_split(spec)
    for shard in range(4):
        assert list(shard_texts(data, spec, shard)) == [(i, TEXTS[i]) for i in range(shard, len(TEXTS), 4)]
    assert list(shard_texts(data, spec, 1, start=3)) == [(13, TEXTS[13]), (17, TEXTS[17]), (21, TEXTS[21])]
    streamed = spec.model_copy(update={"streaming": True})
    assert list(shard_texts(open_split(streamed), streamed, 2, start=1)) == list(shard_texts(data, spec, 2, start=1))


def test_packing_puts_a_separator_after_every_document_and_resumes_exactly(tmp_path: Path):
    spec = DatasetSpec(source=str(_write(tmp_path, "jsonl")), num_shards=2)
    sequences = _packed(spec, 1, 16)
    stream = [t for p in sequences for t in p.tokens]
    expected = [t for i in range(1, len(TEXTS), 2) for t in [*TEXTS[i].encode(), 0]]
    assert stream == expected[:len(stream)] and len(expected) - len(stream) < 16  # the tail is dropped
    assert sequences[0].samples == [1, 3]
    assert sequences[1].position.tokens == 32
    for cut in (1, 4):  # resume after the cut: the rest comes out the same, positions included
        assert [(p.tokens, p.position) for p in _packed(spec, 1, 16, sequences[cut].position)] == \
            [(p.tokens, p.position) for p in sequences[cut + 1:]]
    assert sequences[1].position == Position(doc=2, offset=0, tokens=32)  # 14 + 18 tokens: docs 1 and 3 exactly
    assert sample_ids(1, 2, Position(), sequences[1].position) == [1, 3]
    assert sample_ids(1, 2, sequences[1].position, sequences[2].position) == sequences[2].samples == [5, 7]


def test_a_directory_has_its_splits_and_the_text_column_is_checked(tmp_path: Path):
    _write(tmp_path / "set", "jsonl")
    (tmp_path / "set" / "test.jsonl").write_text(json.dumps({"text": "held out"}) + "\n")
    spec = DatasetSpec(source=str(tmp_path / "set"), split="test")
    assert list(shard_texts(open_split(spec), spec, 0, num_shards=1)) == [(0, "held out")]
    with pytest.raises(ConfigError, match="no column 'body'.*it has text"):
        open_split(spec.model_copy(update={"text_column": "body"}))
    with pytest.raises(ConfigError, match="cannot load split 'validation'"):
        open_split(spec.model_copy(update={"split": "validation"}))


@pytest.mark.parametrize("name, split, message", [
    ("train.jsonl", "test", "only split is 'train'"),
    ("train.xml", "train", "a file must be one of"),
])
def test_bad_files_are_refused_with_the_reason(tmp_path: Path, name: str, split: str, message: str):
    (tmp_path / name).write_text("{}\n")
    with pytest.raises(ConfigError, match=message):
        open_split(DatasetSpec(source=str(tmp_path / name), split=split))


def test_settings_make_the_spec_with_an_absolute_path(tmp_path: Path, monkeypatch):
    _write(tmp_path, "jsonl")
    monkeypatch.chdir(tmp_path)
    spec = spec_from_settings(DataSettings(source="train.jsonl", num_shards=3))
    assert (spec.source, spec.num_shards, spec.split) == (str(tmp_path / "train.jsonl"), 3, "train")
    assert spec_from_settings(DataSettings(source="org/name"), split="test").source == "org/name"
    assert spec_from_settings(DataSettings()) is None
    assert spec.dataset_id != spec.model_copy(update={"num_shards": 4}).dataset_id
    assert spec.dataset_id == spec.model_copy(update={"streaming": True}).dataset_id


def test_eval_batches_are_fixed_and_the_loss_is_weighted_by_tokens(tmp_path: Path):
    spec = DatasetSpec(source=str(_write(tmp_path, "txt")))
    batches = eval_batches(spec, ByteCodec(), batch_size=3, seq_len=8, batches=2)
    assert [b.shape for b in batches] == [torch.Size([3, 8])] * 2
    assert torch.equal(torch.cat(batches), torch.cat(eval_batches(spec, ByteCodec(), batch_size=3, seq_len=8,
                                                                  batches=2)))

    class Constant(torch.nn.Module):  # a model whose loss is known: the mean over rows of the first token
        def forward(self, ids, labels):
            return type("Out", (), {"loss": ids[:, 0].float().mean()})()

    found = evaluate(Constant(), batches)
    assert found.tokens == 2 * 3 * 7
    assert found.loss == pytest.approx(float(torch.cat(batches)[:, 0].float().mean()))
    with pytest.raises(ConfigError, match="no sequence of 4096 tokens"):
        eval_batches(spec, ByteCodec(), batch_size=1, seq_len=4096, batches=1)


def test_the_separator_is_the_eos_token_or_nul_for_bytes():
    assert separator_token(ByteCodec()) == 0

    class WithEos(ByteCodec):
        eos_token_id = 50256

    assert separator_token(WithEos()) == 50256
