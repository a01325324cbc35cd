"""What a peer runs on (CPU count, RAM, GPU via NVML when there is one) and how fast its stage is."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

import psutil
import torch

from dht.schemas import HardwareSummary
from peers.joining.measure import measure_throughput  # moved to peers.joining.measure; re-exported

__all__ = ["probe_hardware", "measure_throughput", "compute_threads", "release_free_memory"]

logger = logging.getLogger(__name__)


def compute_threads(requested: int | None) -> int:
    """Torch threads for a peer's compute: ``requested``, else the cores this process may run on
    (its CPU affinity, which containers and ``taskset`` narrow; torch's own default counts the
    machine's physical cores and oversubscribes a pinned process)."""
    if requested:
        return requested
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def release_free_memory() -> None:
    """Hand memory that is free but still held by the C allocator back to the system (glibc's
    ``malloc_trim``): the throughput measurement and the stage load free hundreds of MiB that glibc
    otherwise keeps in the peer's resident set for good. A no-op where there is no glibc."""
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        trim = None
    if trim is not None:
        trim(0)


def probe_hardware() -> HardwareSummary:
    """CPU and RAM from psutil; the first GPU's name and memory from NVML if a driver is present."""
    gpu_name, gpu_memory = None, None
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            if pynvml.nvmlDeviceGetCount() > 0:
                handle = pynvml.nvmlDeviceGetHandleByIndex(0)
                name = pynvml.nvmlDeviceGetName(handle)
                gpu_name = name.decode() if isinstance(name, bytes) else name
                gpu_memory = round(pynvml.nvmlDeviceGetMemoryInfo(handle).total / 2**30, 2)
        finally:
            pynvml.nvmlShutdown()
    except Exception as e:  # no NVIDIA driver is the normal case on CPU machines
        logger.debug("no GPU found through NVML: %s", e)
    return HardwareSummary(
        device="cuda" if torch.cuda.is_available() else "cpu",
        cpu_count=psutil.cpu_count(logical=True) or 1,
        ram_gib=round(psutil.virtual_memory().total / 2**30, 2),
        gpu_name=gpu_name,
        gpu_memory_gib=gpu_memory,
        torch_threads=torch.get_num_threads(),
    )

