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

__all__ = ["probe_hardware", "nvml_index", "measure_throughput", "compute_threads", "release_free_memory"]

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


def nvml_index(device: torch.device) -> int | None:
    """NVML's index of CUDA device ``device`` (None for the CPU): NVML counts every GPU of the machine,
    CUDA only those ``CUDA_VISIBLE_DEVICES`` lists, in its order."""
    if device.type != "cuda":
        return None
    index = device.index or 0
    visible = [item.strip() for item in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if item.strip()]
    if visible and index < len(visible) and visible[index].isdigit():
        return int(visible[index])
    return index


def probe_hardware(device: torch.device | None = None) -> HardwareSummary:
    """CPU and RAM from psutil; the name and memory of the GPU ``device`` names (default: the first)
    from NVML if a driver is present. ``device`` is the summary's device (where this peer computes)."""
    gpu = nvml_index(device) if device is not None else 0
    gpu_name, gpu_memory = None, None
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            if gpu is not None and pynvml.nvmlDeviceGetCount() > gpu:
                handle = pynvml.nvmlDeviceGetHandleByIndex(gpu)
                name = pynvml.nvmlDeviceGetName(handle)
                gpu_name = name.decode() if isinstance(name, bytes) else name
                gpu_memory = round(pynvml.nvmlDeviceGetMemoryInfo(handle).total / 2**30, 2)
        finally:
            pynvml.nvmlShutdown()
    except Exception as e:  # no NVIDIA driver is the normal case on CPU machines
        logger.debug("no GPU found through NVML: %s", e)
    default = "cuda" if torch.cuda.is_available() else "cpu"
    return HardwareSummary(
        device=str(device) if device is not None else default,
        cpu_count=psutil.cpu_count(logical=True) or 1,
        ram_gib=round(psutil.virtual_memory().total / 2**30, 2),
        gpu_name=gpu_name,
        gpu_memory_gib=gpu_memory,
        torch_threads=torch.get_num_threads(),
    )
