"""The wire formats of activations and gradients: sizes, errors bounded per format, bad parts refused."""

from __future__ import annotations

import pytest
import torch

from net.wire import BLOCK, decode, encode, encoded_bytes, width
from core.errors import BadRequest


def _activations(shape=(2, 5, 100), seed=0) -> torch.Tensor:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    x[0, 0, 3] = 40.0  # an outlier: only its own block may lose precision to it
    return x


@pytest.mark.parametrize("wire, bytes_per_value, max_relative_error", [
    ("float32", 4.0, 0.0),
    ("float16", 2.0, 1e-3),
    ("bfloat16", 2.0, 8e-3),
    ("int8", 1.0 + 4.0 * 2 / 100, 1 / 127),  # 100 values a row = 2 blocks of 64 (one padded), one scale each
])
def test_round_trip_size_and_error(wire, bytes_per_value, max_relative_error):
    x = _activations()
    parts = encode(x, wire)
    assert len(parts) == width(wire)
    assert encoded_bytes(parts) == pytest.approx(bytes_per_value * x.numel())
    y = decode(parts, wire, torch.float32, "hidden_states")
    assert y.dtype == torch.float32 and y.shape == x.shape
    # per block, the error is bounded relative to the block's largest value
    blocks = torch.nn.functional.pad(x, (0, -x.shape[-1] % BLOCK)).reshape(2, 5, -1, BLOCK)
    error = torch.nn.functional.pad((y - x).abs(), (0, -x.shape[-1] % BLOCK)).reshape(2, 5, -1, BLOCK)
    bound = blocks.abs().amax(-1, keepdim=True) * max_relative_error + 1e-12
    assert bool((error <= bound).all())
    if wire == "int8":  # the outlier did not cost the other rows their precision
        assert (y[1] - x[1]).abs().max().item() <= x[1].abs().max().item() / 127


def test_int8_is_deterministic_and_zero_blocks_stay_zero():
    x = _activations()
    x[1] = 0.0
    first, second = encode(x, "int8"), encode(x.clone(), "int8")
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert torch.equal(decode(first, "int8", torch.float32, "x")[1], torch.zeros(5, 100))


@pytest.mark.parametrize("wire, parts, message", [
    ("float16", [torch.zeros(1, 2, 8)], "hidden_states in float16 must be a float16 tensor, got torch.float32"),
    ("int8", [torch.zeros(1, 2, 8)], r"hidden_states in int8 takes 2 tensor\(s\), got 1"),
    ("int8", [torch.zeros(1, 2, 8, dtype=torch.int8), torch.zeros(1, 2, 2)],
     r"hidden_states in int8 must be int8 codes \[..., n\] and float32 scales \[..., ceil\(n / 64\)\], got "
     r"torch.int8 \[1, 2, 8\] and torch.float32 \[1, 2, 2\]"),
    ("int8", [torch.zeros(1, 2, 8), torch.zeros(1, 2, 1)], "must be int8 codes"),
])
def test_malformed_parts_are_a_bad_request_naming_the_tensor(wire, parts, message):
    with pytest.raises(BadRequest, match=message):
        decode(parts, wire, torch.float32, "hidden_states")


def test_an_unknown_format_is_refused():
    with pytest.raises(ValueError, match="unknown wire format 'int4'"):
        encode(torch.zeros(2, 2), "int4")
