"""The stream transport's framing: tensors of every dtype the data plane sends survive the trip
bit for bit, big ones split into chunks, and a chunk that lies about its size is a BadRequest."""

from __future__ import annotations

import asyncio

import pytest
import torch
from hivemind.compression import serialize_torch_tensor
from hivemind.proto import runtime_pb2
from hivemind.utils.streaming import split_for_streaming

from net.transport import CHUNK_BYTES, _frames, _receive
from core.errors import BadRequest


async def _aiter(items: list):
    for item in items:
        yield item


def _trip(message, tensors, frame_type=runtime_pb2.ExpertRequest):
    frames = [frame_type.FromString(f.SerializeToString()) for f in _frames(message, tensors, frame_type)]
    return asyncio.run(_receive(_aiter(frames), lambda why: RuntimeError(why)))


@pytest.mark.parametrize("tensor", [
    torch.randn(2, 3, 8),
    torch.randn(2, 3, 8).to(torch.bfloat16),
    torch.randn(2, 3, 8).half(),
    torch.randint(-127, 127, (2, 3, 8), dtype=torch.int8),
    torch.arange(12).reshape(3, 4),
    torch.tensor([[True, False], [False, True]]),
    torch.zeros(0, 4),
    torch.randn(3, 3 * CHUNK_BYTES // 4 + 5)[:, 7:],  # several chunks, and not contiguous
], ids=["float32", "bfloat16", "float16", "int8", "int64", "bool", "empty", "chunked-view"])
def test_tensors_survive_the_trip_exactly(tensor):
    message, (got,) = _trip({"hello": [1, 2]}, [tensor])
    assert message == {"hello": [1, 2]}
    assert got.dtype == tensor.dtype and got.shape == tensor.shape and torch.equal(got, tensor)


def test_several_tensors_and_hivemind_serialized_chunks_are_read_alike():
    ours = [torch.randn(4, 5), torch.arange(3)]
    _, got = _trip("m", ours)
    assert all(torch.equal(a, b) for a, b in zip(got, ours))
    # a sender using hivemind's own serializer (other tools) is understood too
    frame = runtime_pb2.ExpertRequest(metadata=__import__("msgpack").packb(["m", 1]))
    frame.tensors.extend(split_for_streaming(serialize_torch_tensor(ours[0]), CHUNK_BYTES))
    _, (theirs,) = asyncio.run(_receive(_aiter([frame]), lambda why: RuntimeError(why)))
    assert torch.equal(theirs, ours[0])


@pytest.mark.parametrize("size, dtype, message", [
    ([4, 4], "float32", r"tensor #0 cannot be decoded: ValueError: 60 bytes for a float32 tensor of shape \[4, 4\]"),
    ([2], "complex_thing", r"tensor #0 cannot be decoded: ValueError: unknown dtype 'complex_thing'"),
])
def test_a_chunk_that_does_not_match_its_header_is_a_bad_request(size, dtype, message):
    frame = runtime_pb2.ExpertRequest(metadata=__import__("msgpack").packb(["m", 1]))
    frame.tensors.add(buffer=b"\0" * 60, size=size, dtype=dtype, chunks=1)
    with pytest.raises(BadRequest, match=message):
        asyncio.run(_receive(_aiter([frame]), lambda why: RuntimeError(why)))
