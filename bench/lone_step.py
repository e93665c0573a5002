#!/usr/bin/env python3
"""Benchmark: what one training step of a lone network costs on the `train`/study path
against `apply`'s unpacked path (issue 24), and packs of K run with split and grouped
convs (models/packed.py `set_convs`), measured in one run, interleaved.

Camera 64 px gray, the laptop network (TrialConfig's defaults: skip 3 x 32), one torch
thread by default, ddpm_resample t = 80. Each variant is a `Trial` stepped with
`Trial.step` (forward, backward, Adam, the device-side bookkeeping), as `train` and a
study's trial step it; `apply` runs the same Trial loop with pack=False.

- apply: one network, StepOptions(pack=False): the plain network, the reference cost.
- lone: one network as `train` and a study run it (StepOptions.auto: split convs).
- lone, grouped + phantom: the same network computed as network 0 of a pack of two
  (main before issue 24).
- pack K, split / grouped: K repeats in one pack; the time is per network-iteration.

Times are CPU seconds of this process per iteration (time.process_time, which a shared
machine's other load does not inflate as much as wall time), the median over --rounds
rounds of --steps steps; wall seconds beside them. With one thread they depend on the
CPU's ISA (AVX2 or AVX-512: oneDNN and ATen pick kernels by it) and clock.

    python bench/lone_step.py                    # ~1 min on a free core
    python bench/lone_step.py --ks 2 4 8 --threads 2
"""
from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from models.step import StepOptions  # noqa: E402
from study.config import TrialConfig  # noqa: E402
from study.engine.machine import machine_record  # noqa: E402
from study.engine.trial import Trial  # noqa: E402

CFG = TrialConfig(images=("camera",), size=64, noise_mode="ddpm_resample", timestep=80,
                  device="cpu", iterations=10**6)


def variants(ks: list[int]) -> dict[str, tuple[int, StepOptions]]:
    v = {"apply (pack=False)": (1, StepOptions(pack=False)),
         "lone (train/study: split)": (1, StepOptions.auto(torch.device("cpu"))),
         "lone, grouped + phantom (before)": (1, StepOptions(conv="grouped"))}
    for k in ks:
        v[f"pack {k}, split"] = (k, StepOptions(conv="split"))
        v[f"pack {k}, grouped"] = (k, StepOptions(conv="grouped"))
    return v


def timed(trial: Trial, steps: int) -> tuple[float, float]:
    """(CPU s, wall s) per step over `steps` steps."""
    c0, w0 = time.process_time(), time.perf_counter()
    for _ in range(steps):
        trial.step()
    return (time.process_time() - c0) / steps, (time.perf_counter() - w0) / steps


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1, help="torch threads [1]")
    p.add_argument("--steps", type=int, default=10, help="timed steps per round [10]")
    p.add_argument("--rounds", type=int, default=7, help="rounds, interleaved [7]")
    p.add_argument("--ks", type=int, nargs="*", default=[2, 4], help="pack sizes [2 4]")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    trials = {name: (k, Trial(CFG.replace(repeats=k), options=o))
              for name, (k, o) in variants(a.ks).items()}
    for _, t in trials.values():
        timed(t, 3)  # warm-up: first-call allocations and kernel selection
    got: dict[str, list[tuple[float, float]]] = {name: [] for name in trials}
    for _ in range(a.rounds):
        for name, (_, t) in trials.items():
            got[name].append(timed(t, a.steps))
    print(f"# command: python {shlex.join(sys.argv)}")
    print(f"# {machine_record(torch.device('cpu'))}, {a.threads} thread(s); camera 64 px, "
          f"skip {CFG.scales} x {CFG.channels}; median of {a.rounds} x {a.steps} steps\n")
    print("| path | K | CPU s per network-iteration | wall s | vs apply |")
    print("| --- | --- | --- | --- | --- |")
    base = statistics.median(c for c, _ in got["apply (pack=False)"])
    for name, (k, _) in trials.items():
        cpu = statistics.median(c for c, _ in got[name]) / k
        wall = statistics.median(w for _, w in got[name]) / k
        print(f"| {name} | {k} | {cpu:.4f} | {wall:.4f} | {cpu / base:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
