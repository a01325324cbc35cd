"""Where a stage computes and in what precision: device names, the GPUs of a machine, autocast, the
gradient scale of float16, and copies between host and device.

Device names are what people type: ``auto`` (the first GPU when CUDA is present, else the CPU),
``cpu``, ``cuda`` or ``cuda:N``. ``swarm join --devices 0,1`` lists GPUs by index (``cpu`` items are
accepted too: a machine without a GPU can run the same fan-out). Precision is the run's ``dtype``:
master weights and optimizer state stay float32 whatever it is, and the matmuls of a forward and
backward run in ``dtype`` under ``torch.autocast`` (``compute_context``); float16's narrow exponent
needs gradient scaling (``HopScaler``), bfloat16's does not.
"""

from __future__ import annotations

import contextlib
import re
from typing import ContextManager

import torch

from core.errors import BadRequest, ConfigError

__all__ = [
    "DTYPES",
    "resolve_device",
    "device_list",
    "compute_dtype",
    "compute_context",
    "local_precision",
    "HopScaler",
    "to_device",
    "to_host",
]

DTYPES = ("float32", "bfloat16", "float16")
"""The run's precisions (``--dtype``), the first the default."""

_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def resolve_device(spec: str) -> torch.device:
    """The device ``spec`` names (``auto | cpu | cuda | cuda:N``); ``ConfigError`` naming the value
    when it is malformed or names a GPU this machine does not have."""
    text = str(spec).strip().lower()
    if not _DEVICE.fullmatch(text):
        raise ConfigError(f"device {spec!r} is not one of auto, cpu, cuda, cuda:N")
    if text == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    index = int(text.partition(":")[2] or 0)
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if index >= count:
        have = f"{count} GPU(s)" if count else "no CUDA GPU"
        raise ConfigError(f"device {spec!r}: this machine has {have}")
    return torch.device("cuda", index)


def device_list(spec: str | None, device: str = "auto") -> list[str]:
    """The devices ``swarm join`` serves, one peer each: ``spec`` as ``0,1,3`` or ``cuda:0,cpu``
    (each checked by ``resolve_device``), else every visible GPU when ``device`` is ``auto``, else
    ``device`` alone. Names come back as ``resolve_device`` would print them (``cuda:1``, ``cpu``)."""
    if spec is None or not str(spec).strip():
        if str(device).strip().lower() == "auto" and torch.cuda.is_available():
            return [f"cuda:{index}" for index in range(torch.cuda.device_count())]
        return [str(resolve_device(device))]
    items = [item.strip() for item in str(spec).split(",")]
    if any(not item for item in items):
        raise ConfigError(f"devices {spec!r}: expected a comma-separated list like 0,1,2 or cuda:0,cuda:1")
    named = [f"cuda:{item}" if item.isdigit() else item for item in items]
    devices = [str(resolve_device(item)) for item in named]
    repeated = sorted({d for d in devices if devices.count(d) > 1 and d != "cpu"})
    if repeated:
        raise ConfigError(f"devices {spec!r} lists {', '.join(repeated)} more than once")
    return devices


def compute_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """The torch dtype of the run's ``dtype`` setting; ``ConfigError`` naming any other value."""
    if isinstance(dtype, torch.dtype):
        if str(dtype).removeprefix("torch.") in DTYPES:
            return dtype
        raise ConfigError(f"dtype {dtype} is not one of {', '.join(DTYPES)}")
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return getattr(torch, dtype)


def local_precision(dtype: str | torch.dtype) -> torch.dtype:
    """The precision a trainer's local parts compute in for the run's ``dtype``: the same, except
    float16 (the head's backward runs in the caller's ``loss.backward()``, where no hop scales its
    gradient), which keeps them in float32. The head is one matmul of the model's many."""
    dtype = compute_dtype(dtype)
    return torch.float32 if dtype == torch.float16 else dtype


def compute_context(device: torch.device, dtype: torch.dtype) -> ContextManager:
    """Autocast to ``dtype`` on ``device`` (float32: plain float32, no autocast). The weights stay
    float32: autocast casts them per op, so the optimizer updates float32 masters."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


class HopScaler:
    """Dynamic gradient scaling for one hop of a float16 pipeline (a stage).

    float16 gradients underflow below 6e-8; the hop multiplies the gradient it receives by ``scale``
    before its backward and divides what comes out (parameter and input gradients, in float32) by it.
    A backward that overflows (inf or NaN) is redone with half the scale, at most ``retries`` times
    (then ``BadRequest``: no scale fits the gradient sent); after ``growth_interval`` clean backwards
    the scale doubles. Every hop scales on its own, so no step needs the whole pipeline to agree on
    one scale (torch's ``GradScaler`` needs one loss). For bfloat16 and float32 ``enabled`` is false
    and the scale stays 1.
    """

    def __init__(self, enabled: bool, *, scale: float = 2.0 ** 16, growth_interval: int = 200, retries: int = 24):
        self.enabled = enabled
        self.scale = scale if enabled else 1.0
        self.growth_interval, self.retries = growth_interval, retries
        self.overflows = 0
        self._clean = 0

    def backward(self, outputs: torch.Tensor, grad_output: torch.Tensor,
                 inputs: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """The gradients of ``outputs`` with respect to ``inputs`` (parameters included), for
        ``grad_output``, unscaled; every try but the last keeps the graph."""
        if not self.enabled:
            return list(torch.autograd.grad(outputs, inputs, grad_output, allow_unused=True))
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            grads = torch.autograd.grad(outputs, inputs, grad_output * self.scale, allow_unused=True,
                                        retain_graph=not last)
            if all(g is None or bool(torch.isfinite(g).all()) for g in grads):
                break
            self.overflows += 1
            self._clean = 0
            if last:
                raise BadRequest(f"the backward overflows float16 at every scale down to {self.scale:g}: the "
                                 "gradient sent is out of float16's range")
            self.scale /= 2.0
        unscaled = [None if g is None else g.float() / self.scale for g in grads]
        self._clean += 1
        if self._clean >= self.growth_interval:
            self.scale, self._clean = self.scale * 2.0, 0
        return unscaled


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``: from host to a GPU through pinned memory, without blocking the host."""
    if tensor.device == device:
        return tensor
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in host memory: a GPU tensor is copied into a pinned buffer (torch's caching host
    allocator reuses them), then the copy is waited for, once."""
    if tensor.device.type == "cpu":
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    torch.cuda.current_stream(tensor.device).synchronize()
    return host
