#!/usr/bin/env python3
"""Benchmark: the bias-corrected output EMA against the DIP reference's EMA (issue 8, 3).

The reference average starts at the first output o_1, so early in a trial it is mostly
the untrained network's output and an early-stopping scheduler ranks trials on it. The
trial's average is bias-corrected: raw_n = sum_i (1 - w) w^(n-i) o_i divided by
1 - w^n, weights that sum to one at every iteration. Since the reference's is
ref_n = raw_n + w^n o_1, one run gives both: this prints psnr_ema of each definition at
the iterations a study reports, to show the early numbers become meaningful and the
final ones (1500+ iterations) do not change.

    python bench/ema_bias.py                 # 64 px, the default trial network, ~3 min on 2 cores
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from study.config import TrialConfig  # noqa: E402
from study.engine.metrics import psnr_batch  # noqa: E402
from study.engine.trial import Trial  # noqa: E402

AT = (10, 25, 50, 75, 150, 300, 600, 1000, 1500, 2000)


def run(cfg: TrialConfig) -> list[str]:
    trial, rows, w = Trial(cfg), [], cfg.ema_weight
    trial.step()
    first = [p.ema / trial.ema_norm for p in trial.packs]  # o_1 of every network
    while trial.iteration < cfg.iterations:
        trial.step()
        if trial.iteration in AT:
            m = trial.evaluate()
            ref = torch.cat([psnr_batch(p.ema + w**trial.iteration * o, p.data.clean)
                             for p, o in zip(trial.packs, first, strict=True)]).mean().item()
            rows.append(f"| {cfg.noise_mode} | {trial.iteration} | {m['psnr']:.2f} | {ref:.2f} | "
                        f"{m['psnr_ema']:.2f} | {m['psnr_ema'] - ref:+.4f} |")
            print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=64, help="image side [64]")
    p.add_argument("--iterations", type=int, default=2000, help="steps [2000]")
    p.add_argument("--repeats", type=int, default=2, help="networks (seeds) averaged [2]")
    p.add_argument("--modes", nargs="+", default=["uniform", "ddpm"], help="input modes [uniform ddpm]")
    p.add_argument("--threads", type=int, help="CPU threads for torch")
    p.add_argument("--out", type=Path, help="also write the table to this markdown file")
    ns = p.parse_args(argv)
    if ns.threads:
        torch.set_num_threads(ns.threads)
    cmd = shlex.join(["python", "bench/ema_bias.py", *(sys.argv[1:] if argv is None else argv)])
    head = [f"Command: `{cmd}`", "",
            f"Camera {ns.size} px gray, denoise sigma 25/255, the default trial network "
            f"(skip 3 x 32), lr 0.01, EMA weight 0.99; means over {ns.repeats} seeds.", "",
            "| mode | iteration | psnr (output) | psnr_ema reference (starts at o_1) | "
            "psnr_ema bias-corrected | difference (dB) |", "| --- | --- | --- | --- | --- | --- |"]
    print("\n".join(head), flush=True)
    rows = []
    for mode in ns.modes:
        cfg = TrialConfig(size=ns.size, color="gray", noise_mode=mode, iterations=ns.iterations,
                          repeats=ns.repeats, device="cpu")
        rows += run(cfg)
    if ns.out:
        ns.out.write_text("# Output EMA: reference vs bias-corrected\n\n" + "\n".join(head + rows) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
