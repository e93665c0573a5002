"""What a trial's numbers depend on besides its config: the torch version, the device, the
kernels' instruction set (CPU) or the GPU, and the thread count (issue 24).

A seeded trial replays bit for bit only where all of these agree: oneDNN and ATen pick
their kernels by the CPU's ISA (`ONEDNN_MAX_CPU_ISA` and `ATEN_CPU_CAPABILITY` cap it),
each rounds differently, and DIP training amplifies rounding. MKL, which most CPU
convolutions here go through (im2col + SGEMM), picks its kernels by the CPU's vendor and
model whatever the caps say: an Intel and an AMD CPU round apart at the same ISA
(tests/test_pinned.py), so the vendor is compared too. A trial records this
(`record`, MLflow tags `dip.machine.*`), best.json carries it, and `train --config`
compares it with the machine it runs on (`replay_notice`).
"""
from __future__ import annotations

import functools
import json
import os
import platform
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch loads lazily: export and the tag readers do not need it
    import torch

LEVELS = ("DEFAULT", "AVX2", "AVX512")  # ATen's CPU capabilities on x86-64, lowest first
# What replaying on another CPU ISA moved, measured (bench/isa_replay.py, README
# "Reproducibility"): camera and astronaut 64 px, ddpm_resample t = 80, 300 iterations,
# seeds 0-2, AVX2 against AVX-512 kernels: |diff| 0.0002-0.077 dB, mean 0.036 in psnr_ema.
EXPECTED = ("typically ~0.04 dB and up to ~0.08 dB in psnr_ema, psnr_autostop and psnr_best "
            "(measured across CPU ISAs at 64 px, 300 iterations; README: Reproducibility)")
COMPARED = ("torch", "device", "cpu_isa", "cpu_vendor", "gpu", "threads")
CPU_ONLY = ("cpu_isa", "cpu_vendor")  # not compared between two GPU runs: the GPU's kernels
TAG = "dip.machine."  # MLflow tag prefix of a trial's record: dip.machine.torch, ...


def _onednn_level() -> str | None:
    """The level oneDNN is capped at by ONEDNN_MAX_CPU_ISA (or DNNL_), None if not capped."""
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").upper()
    if not cap or cap == "ALL":
        return None
    if "AVX512" in cap or "AMX" in cap or "AVX10" in cap:
        return "AVX512"
    return "AVX2" if "AVX2" in cap else "DEFAULT"


def cpu_isa() -> str:
    """The ISA the CPU kernels use: ATen's capability ('AVX512', 'AVX2', ...), and oneDNN's
    cap beside it when it is lower ('AVX512, oneDNN AVX2')."""
    import torch

    aten = torch.backends.cpu.get_cpu_capability()
    dnn = _onednn_level()
    if dnn is None or aten not in LEVELS or LEVELS.index(dnn) >= LEVELS.index(aten):
        return aten
    return f"{aten}, oneDNN {dnn}"


@functools.lru_cache(maxsize=1)
def _cpuinfo_lines() -> tuple[str, ...]:
    """/proc/cpuinfo, read once per process (every trial records its machine)."""
    try:
        return tuple(Path("/proc/cpuinfo").read_text().splitlines())
    except OSError:
        return ()


def _cpuinfo(field: str) -> str:
    return next((line.split(":", 1)[1].strip() for line in _cpuinfo_lines() if line.startswith(field)), "")


def cpu_model() -> str:
    """The CPU's model name (informational: two CPUs of one ISA and vendor may still round
    apart, not seen so far)."""
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def cpu_vendor() -> str:
    """GenuineIntel, AuthenticAMD, ... ('' where /proc/cpuinfo does not say): MKL dispatches by it."""
    return _cpuinfo("vendor_id")


def record(device: torch.device) -> dict[str, str]:
    """This process's machine, as strings (MLflow tags, best.json's `machine`)."""
    import torch

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return {"torch": torch.__version__, "device": device.type, "cpu_isa": cpu_isa(),
            "cpu_vendor": cpu_vendor(), "cpu": cpu_model(), "gpu": gpu, "threads": str(torch.get_num_threads())}


def machine_record(device: torch.device) -> str:
    """One line for a benchmark's header."""
    r = record(device)
    where = f"GPU {r['gpu']}" if r["gpu"] else f"CPU {r['cpu']} ({r['cpu_isa']})"
    return f"torch {r['torch']}, {where}"


def replay_notice(then: dict[str, str], now: dict[str, str]) -> str | None:
    """One line when a replay runs on another machine than the trial did; None when every
    compared field agrees, or the export predates the record (nothing to compare)."""
    on_gpus = then.get("device") == now.get("device") == "cuda"  # the GPU's kernels, not the CPU's
    keys = [k for k in COMPARED if not (on_gpus and k in CPU_ONLY)]
    diff = [f"{k} {then[k] or '-'} -> {now.get(k) or '-'}" for k in keys
            if k in then and str(then[k]) != str(now.get(k, ""))]
    if not diff:
        return None
    size = EXPECTED
    if any(then.get(k, now.get(k)) != now.get(k) for k in ("device", "gpu")):
        size = "by an amount not measured across devices (across CPU ISAs: " + EXPECTED + ")"
    return (f"notice: this replay runs on another machine than the trial did ({'; '.join(diff)}), "
            f"so its numbers will differ by rounding, {size}")


def tags(device: torch.device) -> dict[str, str]:
    """`record` as a trial run's MLflow tags."""
    return {TAG + k: v for k, v in record(device).items()}


def from_tags(run_tags: dict[str, str]) -> dict[str, str]:
    """A trial run's record back from its tags ({} for a run older than the record)."""
    return {k[len(TAG):]: v for k, v in run_tags.items() if k.startswith(TAG)}


def exported(path: str | os.PathLike) -> dict[str, str]:
    """The `machine` record of a config file that is a study export ({} for a bare config
    or an export older than the record); the file was read and checked as a config."""
    data = json.loads(Path(path).read_text())
    found = data.get("machine") if isinstance(data, dict) else None
    return {str(k): str(v) for k, v in found.items()} if isinstance(found, dict) else {}
