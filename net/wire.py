"""How activations and gradients travel: the run's wire format (``Manifest.wire``).

An encoded tensor is one or more plain tensors, which any transport then carries as it carries any
tensor: ``float32`` (no compression) sends the tensor as it is, in the run's compute dtype, ``float16`` / ``bfloat16`` a cast (half the bytes),
``int8`` a blockwise absmax quantization (our own codec: hivemind's 8-bit quantizers fail to
deserialize on numpy >= 2.4): the last dimension is cut into blocks of ``BLOCK`` values, each block
stored as int8 codes ``round(x / scale)`` with ``scale = max|x| / 127`` kept in float32, so a
tensor takes ``1 + 4 / BLOCK`` bytes a value (3.8x smaller than float32) and no block's outliers
spoil another block's precision. Rounding is to nearest and deterministic, so a replayed
microbatch is encoded exactly as the first time. The receiver decodes into the dtype it computes in.

Only the hidden states of a forward and the gradients of a backward are encoded; masks, positions,
stage states and checkpoints always travel exactly.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from core.errors import BadRequest

__all__ = ["WIRE_FORMATS", "WIRE_PATTERN", "BLOCK", "encode", "decode", "width", "encoded_bytes"]

WIRE_FORMATS = ("float32", "float16", "bfloat16", "int8")
WIRE_PATTERN = "^(" + "|".join(WIRE_FORMATS) + ")$"
BLOCK = 64

_CASTS = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def width(wire: str) -> int:
    """How many tensors one encoded tensor takes on the wire."""
    return 2 if wire == "int8" else 1


def encode(tensor: torch.Tensor, wire: str) -> list[torch.Tensor]:
    """``tensor`` as the tensors that carry it in ``wire`` format (``width(wire)`` of them)."""
    tensor = tensor.detach()
    if wire == "float32":
        return [tensor]
    if wire in _CASTS:
        return [tensor.to(_CASTS[wire])]
    if wire == "int8":
        return list(_quantize(tensor))
    raise ValueError(f"unknown wire format {wire!r}; expected one of {', '.join(WIRE_FORMATS)}")


def decode(tensors: Sequence[torch.Tensor], wire: str, dtype: torch.dtype, name: str) -> torch.Tensor:
    """The tensor that ``encode(x, wire)`` carried, in ``dtype``. Parts that cannot be what that
    format sends are a ``BadRequest`` naming ``name``."""
    if len(tensors) != width(wire):
        raise BadRequest(f"{name} in {wire} takes {width(wire)} tensor(s), got {len(tensors)}")
    if wire == "float32":  # uncompressed: as it was sent, the receiver checks its dtype
        return tensors[0]
    if wire in _CASTS:
        if tensors[0].dtype != _CASTS[wire]:
            raise BadRequest(f"{name} in {wire} must be a {wire} tensor, got {tensors[0].dtype}")
        return tensors[0].to(dtype)
    codes, scales = tensors
    expected = list(codes.shape[:-1]) + [-(-codes.shape[-1] // BLOCK)] if codes.ndim else None
    if codes.dtype != torch.int8 or scales.dtype != torch.float32 or list(scales.shape) != expected:
        raise BadRequest(f"{name} in int8 must be int8 codes [..., n] and float32 scales [..., ceil(n / {BLOCK})], "
                         f"got {codes.dtype} {list(codes.shape)} and {scales.dtype} {list(scales.shape)}")
    return _dequantize(codes, scales).to(dtype)


def encoded_bytes(tensors: Sequence[torch.Tensor]) -> int:
    """Bytes of tensor data the parts put on the wire."""
    return sum(t.numel() * t.element_size() for t in tensors)


def _blocks(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as float32 ``[..., blocks, BLOCK]``, its last dimension zero-padded to whole blocks."""
    size = tensor.shape[-1]
    padded = F.pad(tensor.float(), (0, -size % BLOCK))
    return padded.reshape(*tensor.shape[:-1], -1, BLOCK)


def _quantize(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if tensor.ndim == 0 or tensor.shape[-1] == 0:
        raise ValueError(f"int8 wire format needs a tensor with a last dimension, got shape {list(tensor.shape)}")
    blocks = _blocks(tensor)
    scales = blocks.abs().amax(dim=-1) / 127.0
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    codes = torch.round(blocks / safe.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    codes = codes.reshape(*tensor.shape[:-1], -1)[..., : tensor.shape[-1]].contiguous()
    return codes, scales.contiguous()


def _dequantize(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    values = _blocks(codes) * scales.unsqueeze(-1)
    return values.reshape(*codes.shape[:-1], -1)[..., : codes.shape[-1]]
