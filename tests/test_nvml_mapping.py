"""The trial's own GPU in NVML (study/engine/nvml.py), with NVML faked at its boundary: a
node of four GPUs behind the few pynvml calls the code makes, and nothing else replaced.
The same path runs against the real NVML in test_sysmetrics.py when a GPU is there."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import torch

from study.engine.nvml import PROCESS_MEMORY, nvml_keys, open_gpu
from study.engine.sysmetrics import SystemSampler, trial_gpu

ME = os.getpid()


@dataclass
class FakeGpu:
    uuid: str
    used: int                                   # bytes in use on the device
    utilization: int | None = 50                # None: not supported (a MIG slice)
    processes: dict[int, int | None] = field(default_factory=dict)  # pid -> bytes (None: unknown)


class FakeNvml:
    """pynvml's calls over `gpus`, in NVML's (PCI bus) order; counts open sessions."""

    class NVMLError(Exception):
        pass

    def __init__(self, gpus: list[FakeGpu]):
        self.gpus, self.sessions = gpus, 0

    def nvmlInit(self) -> None:
        self.sessions += 1

    def nvmlShutdown(self) -> None:
        self.sessions -= 1

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        if not 0 <= i < len(self.gpus):
            raise self.NVMLError("Invalid Argument")
        return i

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> int:
        for i, g in enumerate(self.gpus):
            if g.uuid == uuid:
                return i
        raise self.NVMLError("Not Found")

    def nvmlDeviceGetIndex(self, h: int) -> int:
        return h

    def nvmlDeviceGetUUID(self, h: int) -> str:
        return self.gpus[h].uuid

    def nvmlDeviceGetName(self, h: int) -> bytes:
        return b"NVIDIA Fake"  # older pynvml answers bytes

    def nvmlDeviceGetMemoryInfo(self, h: int) -> SimpleNamespace:
        return SimpleNamespace(used=self.gpus[h].used)

    def nvmlDeviceGetUtilizationRates(self, h: int) -> SimpleNamespace:
        if self.gpus[h].utilization is None:
            raise self.NVMLError("Not Supported")
        return SimpleNamespace(gpu=self.gpus[h].utilization)

    def nvmlDeviceGetComputeRunningProcesses(self, h: int) -> list[SimpleNamespace]:
        return [SimpleNamespace(pid=p, usedGpuMemory=b) for p, b in self.gpus[h].processes.items()]


def node() -> FakeNvml:
    """Two trials share GPU 3: this process (300 MB) and another (500 MB)."""
    return FakeNvml([FakeGpu("GPU-a", 1 * 10**9), FakeGpu("GPU-b", 2 * 10**9), FakeGpu("GPU-c", 3 * 10**9),
                     FakeGpu("GPU-d", 9 * 10**8, 70, {ME: 300 * 10**6, ME + 1: 500 * 10**6})])


def test_rays_ids_are_nvml_indices_not_positions_in_cuda_visible_devices():
    """Ray gave the trial GPUs 2 and 3 (CUDA_VISIBLE_DEVICES=2,3): its cuda:1 is NVML's 3."""
    nvml = node()
    gpu = open_gpu("2,3", 1, nvml=nvml)
    assert gpu.tags() == {"dip.gpu_nvml_index": "3", "dip.gpu_uuid": "GPU-d", "dip.gpu_name": "NVIDIA Fake"}
    assert gpu.values(ME) == {"system/gpu_0_memory_usage_megabytes": 900.0,
                              "system/gpu_0_utilization_percentage": 70.0,
                              PROCESS_MEMORY: 300.0}  # its own, not the other trial's 500
    gpu.close()
    assert nvml.sessions == 0
    assert open_gpu("2,3", 0, nvml=nvml).index == 2 and open_gpu(None, 1, nvml=nvml).index == 1


def test_uuids_name_the_device_whatever_the_orders():
    nvml = node()
    # Kubernetes' device plugin (and MIG) write UUIDs into CUDA_VISIBLE_DEVICES.
    assert open_gpu("GPU-c,GPU-a", 0, nvml=nvml).index == 2
    assert open_gpu("GPU-c,GPU-a", 1, nvml=nvml).index == 0
    # CUDA's default order (fastest first) may put NVML's GPU 3 at CUDA index 1: the UUID
    # CUDA reports for the device wins over the index; an unknown one falls back to it.
    assert open_gpu("1", 0, uuid="GPU-d", nvml=nvml).index == 3
    assert open_gpu("1", 0, uuid="GPU-zz", nvml=nvml).index == 1
    assert nvml_keys("GPU-c", 0, uuid="GPU-d") == ["GPU-c"] and nvml_keys("4", 0) == [4]


def test_what_nvml_cannot_tell_is_left_out_and_a_missing_device_opens_nothing():
    nvml = FakeNvml([FakeGpu("MIG-x", 10**9, utilization=None, processes={ME + 7: 10**8, ME: None})])
    gpu = open_gpu("MIG-x", 0, nvml=nvml)
    # No utilization on a MIG slice; this process listed without its memory (or not at all,
    # in a container whose PIDs are not the host's): no process value rather than a guess.
    assert gpu.values(ME) == {"system/gpu_0_memory_usage_megabytes": 1000.0}
    gpu.close()
    with pytest.raises(FakeNvml.NVMLError):
        open_gpu("5", 0, nvml=nvml)
    assert nvml.sessions == 0, "a failed open must shut NVML down again"
    assert trial_gpu(torch.device("cuda", 0), "5", nvml) is None  # the sampler goes on without


def test_the_sampler_samples_the_trials_gpu_and_names_it():
    nvml = node()
    s = SystemSampler(torch.device("cuda", 0), every=60, visible="3", nvml=nvml).start()
    assert s.device_tags()["dip.gpu_nvml_index"] == "3"
    (first,), last = s.drain(), s.stop()
    for v in (first.values, last[-1].values):
        assert v["system/gpu_0_memory_usage_megabytes"] == 900.0 and v[PROCESS_MEMORY] == 300.0
    assert nvml.sessions == 0, "stop must shut NVML down"
    assert SystemSampler(torch.device("cpu"), every=60, nvml=nvml).device_tags() == {}
