"""Hardware monitoring of a peer: CPU and RAM (psutil) and every GPU (NVML), sampled periodically.

    monitor = HardwareMonitor(interval=5.0, history=720)
    monitor.start()                       # a task on the running loop; stop() ends it
    record.hardware = monitor.summary(probe_hardware())

No GPU (no NVIDIA driver, no ``libnvidia-ml``) is the normal case on CPU machines: the monitor then
samples CPU and RAM only and the summary's GPU fields stay ``None``. ``NvmlReader`` talks to NVML
only through the ``pynvml`` module it is given, so tests can hand it a substitute of that interface.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable, Collection, Iterable, Sequence

import psutil

from dht.schemas import GpuStats, HardwareSummary
from core.loop import cancel_and_wait

__all__ = ["GpuSample", "HardwareSample", "NvmlReader", "HardwareMonitor", "summarize"]

logger = logging.getLogger(__name__)

SUMMARY_WINDOW = 60.0
"""Seconds of samples averaged into the summary a peer publishes."""


@dataclass(frozen=True)
class GpuSample:
    """One GPU at one moment. Figures a GPU does not report (power on some boards) are ``None``."""

    index: int
    name: str
    util_percent: float | None
    memory_used_gib: float
    memory_total_gib: float
    temperature_c: float | None
    power_w: float | None


@dataclass(frozen=True)
class HardwareSample:
    """The whole machine at one moment (``time`` is wall-clock seconds)."""

    time: float
    cpu_percent: float
    ram_used_gib: float
    ram_total_gib: float
    gpus: tuple[GpuSample, ...] = ()


class NvmlReader:
    """Reads every GPU through NVML; ``available`` is False (and ``read`` returns ``()``) without one."""

    def __init__(self, nvml: ModuleType | Any | None = None):
        self._nvml = nvml
        self.available = False
        self.reason = ""

    def open(self) -> bool:
        try:
            if self._nvml is None:
                import pynvml

                self._nvml = pynvml
            self._nvml.nvmlInit()
            self.available = True
        except Exception as e:  # ImportError, NVMLError_LibraryNotFound, NVMLError_DriverNotLoaded ...
            self.available, self.reason = False, f"{type(e).__name__}: {e}"
            logger.debug("no GPU monitoring: %s", self.reason)
        return self.available

    def read(self) -> tuple[GpuSample, ...]:
        if not self.available:
            return ()
        nvml = self._nvml
        try:
            return tuple(self._read_one(nvml, i) for i in range(nvml.nvmlDeviceGetCount()))
        except Exception as e:  # a GPU that fell off the bus: report none this round, try again next
            logger.warning("reading the GPUs through NVML failed: %s", e)
            return ()

    @staticmethod
    def _read_one(nvml: Any, index: int) -> GpuSample:
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        name = nvml.nvmlDeviceGetName(handle)
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        util = _optional(lambda: float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu))
        temperature = _optional(lambda: float(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)))
        power = _optional(lambda: nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0)  # NVML reports milliwatts
        return GpuSample(
            index=index,
            name=name.decode() if isinstance(name, bytes) else str(name),
            util_percent=util,
            memory_used_gib=round(memory.used / 2**30, 3),
            memory_total_gib=round(memory.total / 2**30, 3),
            temperature_c=temperature,
            power_w=power,
        )

    def close(self) -> None:
        if self.available:
            with contextlib.suppress(Exception):  # shutting down a driver that went away: nothing to do
                self._nvml.nvmlShutdown()
            self.available = False


def _optional(read: Callable[[], float]) -> float | None:
    """A figure the GPU may not support (NVML raises NVMLError_NotSupported): None instead."""
    try:
        return read()
    except Exception:
        return None


def summarize(samples: Sequence[HardwareSample], served: Collection[int] = ()) -> dict[str, Any]:
    """Mean figures over ``samples`` as ``HardwareSummary`` fields (GPU ones over all GPUs), with
    ``gpus``: each GPU of ``served`` (NVML indices: those this peer computes on) on its own."""
    if not samples:
        return {}
    gpus = [gpu for sample in samples for gpu in sample.gpus]
    summary: dict[str, Any] = {
        "cpu_percent": round(_mean(s.cpu_percent for s in samples), 1),
        "ram_used_gib": round(_mean(s.ram_used_gib for s in samples), 2),
        "gpu_count": len(samples[-1].gpus),
    }
    if gpus:
        per_sample_used = [sum(g.memory_used_gib for g in s.gpus) for s in samples if s.gpus]
        summary |= {
            "gpu_util_percent": _rounded_mean(g.util_percent for g in gpus),
            "gpu_memory_used_gib": round(_mean(per_sample_used), 2),
            "gpu_temperature_c": _rounded_mean(g.temperature_c for g in gpus),
            "gpu_power_w": _rounded_mean(g.power_w for g in gpus),
        }
    if gpus and served:
        summary["gpus"] = [_one_gpu([g for g in gpus if g.index == index]) for index in sorted(served)
                           if any(g.index == index for g in gpus)]
    return summary


def _one_gpu(samples: list[GpuSample]) -> GpuStats:
    """The means of one GPU's ``samples`` (its newest name and total memory)."""
    newest = samples[-1]
    return GpuStats(index=newest.index, name=newest.name[:128],
                    util_percent=_rounded_mean(g.util_percent for g in samples),
                    memory_used_gib=round(_mean(g.memory_used_gib for g in samples), 2),
                    memory_total_gib=round(newest.memory_total_gib, 2),
                    temperature_c=_rounded_mean(g.temperature_c for g in samples),
                    power_w=_rounded_mean(g.power_w for g in samples))


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def _rounded_mean(values: Iterable[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return round(_mean(known), 1) if known else None


class HardwareMonitor:
    """Samples the machine every ``interval`` s into a history of at most ``history`` samples.

    ``listeners`` are called with each new sample (the Prometheus gauges, for one).
    """

    def __init__(self, *, interval: float = 5.0, history: int = 720, nvml: Any | None = None,
                 clock: Callable[[], float] = time.time, served: Collection[int] = ()):
        """``served``: NVML indices of the GPUs this process computes on (its summary's ``gpus``)."""
        self.interval = interval
        self.served = tuple(served)
        self.history: deque[HardwareSample] = deque(maxlen=history)
        self.listeners: list[Callable[[HardwareSample], None]] = []
        self._clock = clock
        self._nvml = NvmlReader(nvml)
        self._nvml.open()
        psutil.cpu_percent(interval=None)  # the first call only sets the reference point
        self._task: asyncio.Task | None = None

    @property
    def has_gpu(self) -> bool:
        return self._nvml.available

    def sample(self) -> HardwareSample:
        """Take one sample now, keep it in the history and hand it to the listeners."""
        memory = psutil.virtual_memory()
        sample = HardwareSample(
            time=self._clock(),
            cpu_percent=psutil.cpu_percent(interval=None),
            ram_used_gib=round((memory.total - memory.available) / 2**30, 3),
            ram_total_gib=round(memory.total / 2**30, 3),
            gpus=self._nvml.read(),
        )
        self.history.append(sample)
        for listener in self.listeners:
            listener(sample)
        return sample

    def recent(self, window: float = SUMMARY_WINDOW) -> list[HardwareSample]:
        if not self.history:
            return []
        newest = self.history[-1].time
        return [s for s in self.history if s.time >= newest - window]

    def summary(self, static: HardwareSummary, window: float = SUMMARY_WINDOW) -> HardwareSummary:
        """``static`` (what the machine is) with the live means of the last ``window`` seconds."""
        return static.model_copy(update=summarize(self.recent(window), self.served))

    def start(self) -> None:
        """Sample now and then every ``interval`` s on the running event loop. Idempotent."""
        if self._task is None:
            self.sample()
            self._task = asyncio.create_task(self._run(), name="hardware-monitor")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await asyncio.to_thread(self.sample)  # NVML calls can take milliseconds each
            except Exception as e:  # a failed sample must not stop the peer; the next one may work
                logger.warning("hardware sample failed: %s", e)

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        self.close()

    def close(self) -> None:
        """Release NVML (for a monitor sampled by hand, never ``start``-ed). Idempotent."""
        self._nvml.close()
