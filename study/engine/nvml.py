"""The trial's own GPU as NVML numbers it: which device Ray gave the trial, and what it
holds there.

Ray gives a trial GPU ids (`ray.get_gpu_ids()`) and sets CUDA_VISIBLE_DEVICES to them, so
the trial's cuda:i is the i-th entry there (Ray's id). NVML ignores CUDA_VISIBLE_DEVICES and
numbers every GPU of the node in PCI bus order; CUDA numbers them fastest first unless
CUDA_DEVICE_ORDER=PCI_BUS_ID. So an entry that is an index is NVML's device of that index
only where the two orders agree (identical GPUs, or PCI_BUS_ID). A UUID names the same device
in both: an entry that is a UUID (Kubernetes' device plugin, MIG slices) is looked up as
one, and so is the UUID CUDA reports for the device (torch's), when there is one.

NVML is passed in (`nvml`: the pynvml module of nvidia-ml-py by default), so the mapping is
tested with a fake of the calls made here. Process memory: NVML lists the compute processes
of a device with their memory; a trial finds itself by its PID, which fails in a container
whose PID namespace is not the host's (then the value is left out, not guessed).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MB = 1e6  # MLflow's megabytes (memory.used / 1e6)
PROCESS_MEMORY = "trial/gpu_process_memory_megabytes"


def visible_entry(visible: str | None, index: int) -> int | str:
    """The CUDA_VISIBLE_DEVICES entry (index or UUID) of the process's cuda:`index`, or
    `index` itself where that is unset."""
    if not visible:
        return index
    entries = [e.strip() for e in visible.split(",") if e.strip()]
    if index >= len(entries):
        raise ValueError(f"cuda:{index} is not among CUDA_VISIBLE_DEVICES={visible!r}")
    return int(entries[index]) if entries[index].isdigit() else entries[index]


def nvml_keys(visible: str | None, index: int, uuid: str = "") -> list[int | str]:
    """What to look the device up by in NVML, the first that NVML finds: the entry's own
    UUID; else CUDA's `uuid` of the device, then the entry as NVML's index."""
    entry = visible_entry(visible, index)
    return [entry] if isinstance(entry, str) else [k for k in (uuid, entry) if k != ""]


def _text(v: str | bytes) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)  # older pynvml answers bytes


@dataclass
class TrialGpu:
    """An open NVML handle on the trial's device, and which device it is."""

    nvml: Any
    handle: Any
    index: int               # NVML's index of the device on its node
    uuid: str
    name: str

    def tags(self) -> dict[str, str]:
        """Which device the trial's GPU metrics sampled (tags of its run)."""
        return {"dip.gpu_nvml_index": str(self.index), "dip.gpu_uuid": self.uuid, "dip.gpu_name": self.name}

    def values(self, pid: int) -> dict[str, float]:
        """The device's memory and utilization (MLflow's names) and this process's memory
        on it; what NVML does not support (utilization on a MIG slice) is left out."""
        out: dict[str, float] = {}
        for name, read in (("system/gpu_0_memory_usage_megabytes", self._used),
                           ("system/gpu_0_utilization_percentage", self._utilization),
                           (PROCESS_MEMORY, lambda: self._process_memory(pid))):
            try:
                v = read()
            except self.nvml.NVMLError:
                continue
            if v is not None:
                out[name] = v
        return out

    def _used(self) -> float:
        return self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used / MB

    def _utilization(self) -> float:
        return float(self.nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu)

    def _process_memory(self, pid: int) -> float | None:
        used = [p.usedGpuMemory for p in self.nvml.nvmlDeviceGetComputeRunningProcesses(self.handle)
                if p.pid == pid and p.usedGpuMemory is not None]
        return sum(used) / MB if used else None

    def close(self) -> None:
        self.nvml.nvmlShutdown()


def _index(nvml: Any, handle: Any) -> int:
    try:
        return int(nvml.nvmlDeviceGetIndex(handle))
    except nvml.NVMLError:  # a MIG slice's handle has no index of its own: -1
        return -1


def _handle(nvml: Any, keys: list[int | str]) -> Any:
    for i, key in enumerate(keys):
        try:
            return (nvml.nvmlDeviceGetHandleByIndex(key) if isinstance(key, int)
                    else nvml.nvmlDeviceGetHandleByUUID(key))
        except nvml.NVMLError:
            if i == len(keys) - 1:
                raise


def open_gpu(visible: str | None, index: int, uuid: str = "", nvml: Any = None) -> TrialGpu:
    """The trial's cuda:`index` in NVML; raises what NVML raises (no library, no driver)."""
    if nvml is None:
        import pynvml as nvml
    keys = nvml_keys(visible, index, uuid)
    nvml.nvmlInit()
    try:
        handle = _handle(nvml, keys)
        return TrialGpu(nvml, handle, _index(nvml, handle), _text(nvml.nvmlDeviceGetUUID(handle)),
                        _text(nvml.nvmlDeviceGetName(handle)))
    except BaseException:
        nvml.nvmlShutdown()
        raise
