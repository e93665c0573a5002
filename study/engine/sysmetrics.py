"""System metrics of one trial, sampled in its own worker by a small daemon thread.

MLflow's `log_system_metrics` samples the whole machine, so trials sharing a GPU would all
log every GPU of the node. This sampler logs, under MLflow's own names (so the run page's
System Metrics tab shows them; mlflow/system_metrics/metrics/{cpu,gpu}_monitor.py):
- `system/cpu_utilization_percentage`, `system/system_memory_usage_megabytes`: the machine;
- `system/gpu_0_utilization_percentage`, `system/gpu_0_memory_usage_megabytes`: the GPU the
  trial holds (its cuda:0, the device Ray assigned), found in NVML as study/engine/nvml.py
  maps it (its NVML index and UUID go in the run's tags: `device_tags`);
and the trial's own share: `trial/process_rss_megabytes` (this process),
`trial/gpu_process_memory_megabytes` (what NVML lists for this process on its GPU: two
trials may share it) and `trial/gpu_max_allocated_megabytes` (torch's peak allocation).

The thread only appends to a list; the training thread takes the samples (`drain`) when it
reports, so a training step never waits on a sample. torch, psutil and NVML only.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import psutil
import torch

from study.engine.nvml import MB, TrialGpu, open_gpu

DEFAULT_EVERY = 5.0  # seconds between samples
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sample:
    step: int                  # the sample's count in this attempt (MLflow's system-metrics step)
    ts: int                    # when it was taken, ms since the epoch
    values: dict[str, float]


def cuda_uuid(device: torch.device) -> str:
    """The UUID CUDA reports for `device`, as NVML writes it ('' without CUDA)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return ""
    try:
        u = str(torch.cuda.get_device_properties(device).uuid)
    except (RuntimeError, AssertionError, AttributeError):  # torch asserts on a bad index
        return ""
    return u if u.startswith(("GPU-", "MIG-")) else f"GPU-{u}"


def trial_gpu(device: torch.device, visible: str | None, nvml: Any = None) -> TrialGpu | None:
    """The trial's GPU in NVML (study/engine/nvml.py); None off CUDA or without NVML."""
    if device.type != "cuda":
        return None
    try:
        return open_gpu(visible, device.index or 0, cuda_uuid(device), nvml)
    except Exception as e:  # noqa: BLE001 - no NVML library, no driver, an unknown UUID...
        log.warning("no GPU system metrics for %s: %s", device, e)
        return None


class SystemSampler:
    """Samples every `every` seconds from `start` (the first sample) to `stop` (the last);
    `every` = 0 samples nothing (the overhead benchmark's baseline). Steps count from
    `first`: a retried attempt goes on from the count its checkpoint saved (`taken`)."""

    def __init__(self, device: torch.device, every: float = DEFAULT_EVERY, visible: str | None = None,
                 first: int = 0, nvml: Any = None):
        if every < 0:
            raise ValueError(f"the system-metrics interval is seconds >= 0 (0: off), not {every}")
        self.device, self.every = device, every
        self.gpu = trial_gpu(device, visible, nvml) if every else None
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
            v.update(self.gpu.values(self.process.pid))
        if self.device.type == "cuda" and torch.cuda.is_available():
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
            self.gpu.close()
        return self.drain()

    def device_tags(self) -> dict[str, str]:
        """Which GPU the samples are of (none off CUDA or without NVML)."""
        return self.gpu.tags() if self.gpu is not None else {}
