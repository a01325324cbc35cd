"""Hardware monitoring: the no-GPU path for real, the NVML path through pynvml's interface."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import psutil
import pynvml
import pytest

from dht.schemas import GpuStats, HardwareSummary, PeerRecord
from peers.telemetry.hardware import probe_hardware
from peers.telemetry.monitor import GpuSample, HardwareMonitor, HardwareSample, NvmlReader, summarize
from core.types import LayerRange


class FakeNvml:
    """pynvml's functions as a two-GPU machine answers them; GPU 1 does not report power."""

    NVML_TEMPERATURE_GPU = pynvml.NVML_TEMPERATURE_GPU

    def __init__(self, init_error: Exception | None = None):
        self.init_error = init_error
        self.shutdowns = 0

    def nvmlInit(self):
        if self.init_error:
            raise self.init_error

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlDeviceGetCount(self):
        return 2

    def nvmlDeviceGetHandleByIndex(self, index):
        return ("handle", index)

    def nvmlDeviceGetName(self, handle):
        return b"NVIDIA H100" if handle[1] == 0 else "NVIDIA L4"

    def nvmlDeviceGetMemoryInfo(self, handle):
        used = [40, 10][handle[1]] * 2**30
        return SimpleNamespace(total=80 * 2**30, used=used, free=80 * 2**30 - used)

    def nvmlDeviceGetUtilizationRates(self, handle):
        return SimpleNamespace(gpu=[90, 30][handle[1]], memory=0)

    def nvmlDeviceGetTemperature(self, handle, sensor):
        assert sensor == pynvml.NVML_TEMPERATURE_GPU
        return [70, 50][handle[1]]

    def nvmlDeviceGetPowerUsage(self, handle):
        if handle[1] == 1:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return 350_000  # milliwatts


def test_no_gpu_for_real_samples_cpu_and_ram_only():
    """This machine has no NVIDIA driver: pynvml itself raises, and that is a normal case."""
    with pytest.raises(pynvml.NVMLError):
        pynvml.nvmlInit()
    monitor = HardwareMonitor(history=3)
    assert not monitor.has_gpu
    samples = [monitor.sample() for _ in range(5)]
    assert len(monitor.history) == 3 and list(monitor.history) == samples[2:]
    last = samples[-1]
    assert last.gpus == ()
    assert 0.0 <= last.cpu_percent <= 100.0
    assert last.ram_total_gib == pytest.approx(psutil.virtual_memory().total / 2**30, rel=1e-3)
    assert 0 < last.ram_used_gib <= last.ram_total_gib
    summary = monitor.summary(probe_hardware())
    assert summary.gpu_count == 0 and summary.gpu_util_percent is None and summary.gpu_power_w is None
    assert summary.ram_used_gib > 0 and summary.cpu_count == psutil.cpu_count()


def test_nvml_path_reads_every_gpu_through_the_library_interface():
    fake = FakeNvml()
    monitor = HardwareMonitor(nvml=fake)
    assert monitor.has_gpu
    sample = monitor.sample()
    assert sample.gpus == (
        GpuSample(0, "NVIDIA H100", 90.0, 40.0, 80.0, 70.0, 350.0),
        GpuSample(1, "NVIDIA L4", 30.0, 10.0, 80.0, 50.0, None),
    )
    summary = monitor.summary(HardwareSummary(gpu_name="NVIDIA H100", gpu_memory_gib=80.0))
    assert (summary.gpu_count, summary.gpu_util_percent, summary.gpu_memory_used_gib) == (2, 60.0, 50.0)
    assert (summary.gpu_temperature_c, summary.gpu_power_w) == (60.0, 350.0)
    asyncio.run(monitor.stop())
    assert fake.shutdowns == 1


def test_nvml_init_failure_means_no_gpu():
    reader = NvmlReader(FakeNvml(init_error=pynvml.NVMLError(pynvml.NVML_ERROR_DRIVER_NOT_LOADED)))
    assert not reader.open() and reader.read() == ()
    assert "Driver Not Loaded" in reader.reason


def _sample(t, cpu, ram, *gpus):
    return HardwareSample(time=t, cpu_percent=cpu, ram_used_gib=ram, ram_total_gib=16.0, gpus=tuple(gpus))


def _gpu(util, used, temp=None, power=None):
    return GpuSample(0, "g", util, used, 24.0, temp, power)


@pytest.mark.parametrize("samples, expected", [
    ([], {}),
    ([_sample(0, 10, 4), _sample(5, 30, 6)], {"cpu_percent": 20.0, "ram_used_gib": 5.0, "gpu_count": 0}),
    ([_sample(0, 50, 8, _gpu(80, 10, 60, 200)), _sample(5, 50, 8, _gpu(100, 12, 70, None))],
     {"cpu_percent": 50.0, "ram_used_gib": 8.0, "gpu_count": 1, "gpu_util_percent": 90.0,
      "gpu_memory_used_gib": 11.0, "gpu_temperature_c": 65.0, "gpu_power_w": 200.0}),
    ([_sample(0, 0, 1, _gpu(None, 2))],
     {"cpu_percent": 0.0, "ram_used_gib": 1.0, "gpu_count": 1, "gpu_util_percent": None,
      "gpu_memory_used_gib": 2.0, "gpu_temperature_c": None, "gpu_power_w": None}),
])
def test_summarize(samples, expected):
    assert summarize(samples) == expected


def test_summary_uses_only_the_recent_window():
    clock = iter([0.0, 100.0, 105.0])
    monitor = HardwareMonitor(clock=lambda: next(clock))
    monitor.history.extend([_sample(0, 90, 1), _sample(100, 10, 1), _sample(105, 20, 1)])
    assert monitor.summary(HardwareSummary(), window=60).cpu_percent == 15.0


def test_peer_record_with_hardware_stays_small():
    import msgpack

    summary = HardwareMonitor(nvml=FakeNvml()).summary(HardwareSummary(gpu_name="NVIDIA H100", gpu_memory_gib=80))
    record = PeerRecord(peer_id="Qm" + "x" * 44, maddrs=["/ip4/203.0.113.7/tcp/31337/p2p/Qm" + "x" * 44],
                        stage=3, layers=LayerRange(start=6, end=8), hardware=summary, updated=1.7e9, load=2)
    assert len(msgpack.packb(record.model_dump(mode="json"))) < 700


def test_summarize_gives_each_served_gpu_its_own_means():
    """A peer on GPU 1 of a two-GPU machine publishes that GPU's figures on their own (``gpus``),
    beside the machine-wide means; a GPU it does not serve is left out."""
    def pair(util_a, util_b, used_b, temp_b, power_b):
        return GpuSample(0, "NVIDIA A", util_a, 1, 24.0, 40, 50), GpuSample(1, "NVIDIA B", util_b, used_b, 24.0,
                                                                              temp_b, power_b)

    samples = [_sample(0, 5, 1, *pair(10, 80, 20, 70, 300)), _sample(5, 5, 1, *pair(30, 100, 22, 72, None))]
    summary = summarize(samples, served=[1])
    assert summary["gpu_util_percent"] == 55.0  # all GPUs
    assert summary["gpus"] == [GpuStats(index=1, name="NVIDIA B", util_percent=90.0, memory_used_gib=21.0,
                                        memory_total_gib=24.0, temperature_c=71.0, power_w=300.0)]
    assert "gpus" not in summarize(samples)  # a CPU peer (nothing served) publishes none
