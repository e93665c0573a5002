"""What a trial's numbers depend on besides its config: the torch version, the device, the
kernels' instruction set (CPU) or the GPU, and the thread count (issue 24).

A seeded trial replays bit for bit only where all of these agree: oneDNN and ATen pick
their kernels by the CPU's ISA (`ONEDNN_MAX_CPU_ISA` and `ATEN_CPU_CAPABILITY` cap it),
each rounds differently, and DIP training amplifies rounding. A trial records this
(`record`, MLflow tags `dip.machine.*`), best.json carries it, and `train --config`
compares it with the machine it runs on (`replay_notice`).
"""
from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

LEVELS = ("DEFAULT", "AVX2", "AVX512")  # ATen's CPU capabilities on x86-64, lowest first
# What replaying on another CPU ISA moved, measured (README, "Reproducibility"): camera and
# astronaut 64 px, ddpm_resample t = 80, 300 iterations, AVX2 against AVX-512 kernels.
EXPECTED = "up to ~0.03 dB in psnr_ema and ~0.1 dB in psnr_autostop (README: Reproducibility)"
COMPARED = ("torch", "device", "cpu_isa", "gpu", "threads")


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
    aten = torch.backends.cpu.get_cpu_capability()
    dnn = _onednn_level()
    if dnn is None or aten not in LEVELS or LEVELS.index(dnn) >= LEVELS.index(aten):
        return aten
    return f"{aten}, oneDNN {dnn}"


def cpu_model() -> str:
    """The CPU's model name (informational: two CPUs of one ISA may still round apart)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def record(device: torch.device) -> dict[str, str]:
    """This process's machine, as strings (MLflow tags, best.json's `machine`)."""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return {"torch": torch.__version__, "device": device.type, "cpu_isa": cpu_isa(),
            "cpu": cpu_model(), "gpu": gpu, "threads": str(torch.get_num_threads())}


def machine_record(device: torch.device) -> str:
    """One line for a benchmark's header."""
    r = record(device)
    where = f"GPU {r['gpu']}" if r["gpu"] else f"CPU {r['cpu']} ({r['cpu_isa']})"
    return f"torch {r['torch']}, {where}"


def replay_notice(then: dict[str, str], now: dict[str, str]) -> str | None:
    """One line when a replay runs on another machine than the trial did; None when every
    compared field agrees, or the export predates the record (nothing to compare)."""
    diff = [f"{k} {then[k] or '-'} -> {now.get(k) or '-'}" for k in COMPARED
            if k in then and str(then[k]) != str(now.get(k, ""))]
    if not diff:
        return None
    return (f"notice: this replay runs on another machine than the trial did ({'; '.join(diff)}), "
            f"so its numbers will differ by rounding, {EXPECTED}")
