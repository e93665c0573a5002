"""System metrics of one trial, sampled in its own worker by a small daemon thread.

MLflow's `log_system_metrics` samples the whole machine, so trials sharing a GPU would all
log every GPU of the node. This sampler logs, under MLflow's own names (so the run page's
System Metrics tab shows them; mlflow/system_metrics/metrics/{cpu,gpu}_monitor.py):
- `system/cpu_utilization_percentage`, `system/system_memory_usage_megabytes`: the machine;
- `system/gpu_0_utilization_percentage`, `system/gpu_0_memory_usage_megabytes`: the GPU the
  trial holds (its cuda:0), found in NVML through CUDA_VISIBLE_DEVICES;
and the trial's own share: `trial/process_rss_megabytes` (this process) and
`trial/gpu_max_allocated_megabytes` (torch's peak allocation, with CUDA only).

The thread only appends to a list; the training thread takes the samples (`drain`) when it
reports, so a training step never waits on a sample. torch, psutil and pynvml only.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import psutil
import torch

MB = 1e6  # MLflow's megabytes (memory.used / 1e6)
DEFAULT_EVERY = 5.0  # seconds between samples
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sample:
    step: int                  # the sample's count in this attempt (MLflow's system-metrics step)
    ts: int                    # when it was taken, ms since the epoch
    values: dict[str, float]


def physical_gpu(visible: str | None, index: int) -> int | str:
    """The NVML key (index or UUID) of the process's cuda:`index`: the index-th entry of
    CUDA_VISIBLE_DEVICES, or `index` itself where that is unset."""
    if not visible:
        return index
    entries = [e.strip() for e in visible.split(",") if e.strip()]
    if index >= len(entries):
        raise ValueError(f"cuda:{index} is not among CUDA_VISIBLE_DEVICES={visible!r}")
    return int(entries[index]) if entries[index].isdigit() else entries[index]


def nvml_handle(device: torch.device, visible: str | None) -> Any | None:
    """The NVML handle of `device`'s physical GPU; None off CUDA or without NVML."""
    if device.type != "cuda":
        return None
    try:
        import pynvml

        pynvml.nvmlInit()
        key = physical_gpu(visible, device.index or 0)
        if isinstance(key, int):
            return pynvml.nvmlDeviceGetHandleByIndex(key)
        return pynvml.nvmlDeviceGetHandleByUUID(key)
    except Exception as e:  # noqa: BLE001 - no NVML library, no driver, a MIG UUID...
        log.warning("no GPU system metrics for %s: %s", device, e)
        return None


def gpu_values(handle: Any) -> dict[str, float]:
    import pynvml

    out = {}
    try:
        out["system/gpu_0_memory_usage_megabytes"] = pynvml.nvmlDeviceGetMemoryInfo(handle).used / MB
        out["system/gpu_0_utilization_percentage"] = float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
    except pynvml.NVMLError as e:  # e.g. utilization is not supported on a MIG slice
        log.debug("NVML: %s", e)
    return out


class SystemSampler:
    """Samples every `every` seconds from `start` (the first sample) to `stop` (the last);
    `every` = 0 samples nothing (the overhead benchmark's baseline). Steps count from
    `first`: a retried attempt goes on from the count its checkpoint saved (`taken`)."""

    def __init__(self, device: torch.device, every: float = DEFAULT_EVERY, visible: str | None = None,
                 first: int = 0):
        if every < 0:
            raise ValueError(f"the system-metrics interval is seconds >= 0 (0: off), not {every}")
        self.device, self.every = device, every
        self.gpu = nvml_handle(device, visible) if every else None
        self.process = psutil.Process()
        self._samples: list[Sample] = []
        self._count = first
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._thread = threading.Thread(target=self._loop, name="dip-sysmetrics", daemon=True)
        psutil.cpu_percent(None)  # the first call only starts psutil's interval

    def values(self) -> dict[str, float]:
        v = {"system/cpu_utilization_percentage": psutil.cpu_percent(None),
             "system/system_memory_usage_megabytes": psutil.virtual_memory().used / MB,
             "trial/process_rss_megabytes": self.process.memory_info().rss / MB}
        if self.gpu is not None:
            v.update(gpu_values(self.gpu))
        if self.device.type == "cuda":
            v["trial/gpu_max_allocated_megabytes"] = torch.cuda.max_memory_allocated(self.device) / MB
        return v

    def sample(self) -> None:
        values, ts = self.values(), int(time.time() * 1000)
        with self._lock:
            self._samples.append(Sample(self._count, ts, values))
            self._count += 1

    def mark(self) -> None:
        """A sample now (none when sampling is off): at a report, so a trial that ends right
        after it without `stop` (ASHA ends it inside tune.report) still has its last state."""
        if self.every:
            self.sample()

    def start(self) -> "SystemSampler":
        if self.every == 0:
            self._stop.set()
            return self
        self.sample()
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self.sample()
            except Exception as e:  # noqa: BLE001 - a failed sample must not end training
                log.warning("system metrics sample failed: %s", e)

    @property
    def taken(self) -> int:
        """The step the next sample gets."""
        with self._lock:
            return self._count

    def drain(self) -> list[Sample]:
        """The samples taken since the last drain (called from the training thread)."""
        with self._lock:
            out, self._samples = self._samples, []
        return out

    def stop(self) -> list[Sample]:
        """Ends the thread, takes the last sample, and returns what was not drained."""
        if self._stop.is_set():
            return self.drain()
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join(timeout=max(5.0, 2 * self.every))
        self.sample()
        if self.gpu is not None:
            import pynvml

            pynvml.nvmlShutdown()
        return self.drain()
