#!/usr/bin/env python3
"""Benchmark: the honest answer against the iteration budget (issue 13).

Trains, with `run_study.py train`'s loop, camera 64 px gray, sigma 25, the laptop
network (the TrialConfig defaults), and prints per run the final `psnr_ema` (what a
study ranked by), `psnr_autostop` (where ES-WMV stops, no clean image) and the oracle
`psnr_best`, each with its iteration:
- uniform input (the DIP reference), 2000 iterations: does ES-WMV recover the peak?
- the fixed DDPM input at t = 25, 1000 iterations, with MSE and with SURE: does SURE stop
  the network from copying the noise the input already holds?
- a pack of one against the same network in a pack (repeat r of `--repeats 3 --seed 5`
  replayed alone with `--seed 5 + r`), at the default network.

    python bench/honest_answer.py            # ~15 min on 2 free cores
    python bench/honest_answer.py --quick    # 300 / 150 iterations: a smoke run
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from study.config import TrialConfig  # noqa: E402
from study.engine.trial import run_trial  # noqa: E402

BASE = TrialConfig(images=("camera",), color="gray", size=64, report_every=50, device="cpu")


def row(name: str, cfg: TrialConfig) -> str:
    t0 = time.perf_counter()
    r = run_trial(cfg, lambda m, t: None)
    s = time.perf_counter() - t0
    return (f"| {name} | {cfg.iterations} | {r['psnr_ema']:.2f} | {r['psnr_autostop']:.2f} @ "
            f"{int(r['autostop_iteration'])}{'' if r['autostop_fired'] >= 1 else ' (not fired)'} | "
            f"{r['psnr_best']:.2f} @ {int(r['best_iteration'])} | {r['psnr_observation']:.2f} | {s:.0f} |")


def pack_of_one(iterations: int) -> list[str]:
    cfg = TrialConfig(images=("camera",), size=64, noise_mode="ddpm_resample", timestep=80,
                      iterations=iterations, report_every=iterations, device="cpu")
    packed = run_trial(cfg.replace(repeats=3, seed=5), lambda m, t: None)["networks"]
    out = []
    for r in range(3):
        alone = run_trial(cfg.replace(seed=5 + r), lambda m, t: None)["networks"][0]["metrics"]
        mine = packed[r]["metrics"]
        out.append(f"| repeat {r} of --repeats 3 --seed 5 | {mine['psnr_ema']:.3f} | --seed {5 + r} alone | "
                   f"{alone['psnr_ema']:.3f} | {abs(mine['psnr_ema'] - alone['psnr_ema']):.4f} |")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="short runs (smoke test)")
    p.add_argument("--threads", type=int, default=2, help="torch threads [2]")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    long, mid = (300, 150) if a.quick else (2000, 1000)
    print(f"# command: python {shlex.join(sys.argv)}")
    print(f"# torch {torch.__version__}, {a.threads} threads, CPU; camera 64 px gray, sigma 25/255, "
          f"skip {BASE.scales} scales x {BASE.channels} channels; ES-WMV window {BASE.window}, "
          f"patience {BASE.patience}\n")
    print("| run | iterations | final psnr_ema | psnr_autostop @ it | psnr_best (oracle) @ it | observation | s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, cfg in (("uniform (DIP reference)", BASE.replace(noise_mode="uniform", iterations=long)),
                      ("ddpm t = 25, mse", BASE.replace(noise_mode="ddpm", timestep=25, iterations=mid)),
                      ("ddpm t = 25, sure", BASE.replace(noise_mode="ddpm", timestep=25, iterations=mid,
                                                          loss="sure"))):
        print(row(name, cfg), flush=True)
    print("\n| packed | psnr_ema | alone | psnr_ema | gap (dB) |\n| --- | --- | --- | --- | --- |")
    for line in pack_of_one(60 if not a.quick else 20):
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
