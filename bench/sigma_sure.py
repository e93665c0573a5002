#!/usr/bin/env python3
"""Science (issue 23): what estimating sigma costs SURE. The SURE variants of the
compare-modes study (ddpm, ddpm_random_t, ddpm_resample), each trained twice on the same
observations, seeds and probes: SURE given the true sigma, and SURE with the sigma
estimated from each observation (`--sigma-estimate`). Scaled to a shared 2-core CPU:
camera (bright) and hubble_deep_field (the darkest, where the estimator is worst), 64 px,
1000 iterations, one seed, one fixed t per mode.

    python bench/sigma_sure.py --runs /tmp/sigma_sure          # ~90 min on one shared core
    python bench/sigma_sure.py --runs /tmp/sigma_sure --summarize --out bench/results/sigma_sure_cpu_64px.md

Prints, per variant and image, psnr_ema (final), psnr_autostop (ES-WMV's pick) and
psnr_best (oracle) with each sigma, and the paired difference estimated - given (dB).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from benchutil import emit

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = (("ddpm", 25), ("ddpm_random_t", 100), ("ddpm_resample", 50))
IMAGES = ("camera", "hubble_deep_field")
METRICS = ("psnr_ema", "psnr_autostop", "psnr_best")
TRAIN = ["run_study.py", "train", "--image", *IMAGES, "--size", "64", "--iterations", "1000",
         "--report-every", "50", "--loss", "sure"]


def run_dir(runs: Path, mode: str, t: int, source: str) -> Path:
    return runs / f"{mode}_t{t}_{source}"


def run_all(runs: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for mode, t in VARIANTS:
        for source in ("given", "estimated"):
            out = run_dir(runs, mode, t, source)
            if (out / "result.json").is_file():
                continue
            cmd = [sys.executable, *TRAIN, "--noise-mode", mode, "--timestep", str(t), "--out", str(out),
                   *(["--sigma-estimate"] if source == "estimated" else [])]
            subprocess.run(["nice", "-n", "10", *cmd], cwd=ROOT, env=env, check=True)


def per_image(result: dict, label: str, key: str) -> float:
    return result[f"{key}/{label}"]


def summarize(runs: Path) -> list[str]:
    lines = ["| variant | image | sigma est. (/255, true 25) | " +
             " | ".join(f"{m} given / estimated (diff)" for m in METRICS) + " |",
             "| --- | --- | --- |" + " --- |" * len(METRICS)]
    diffs: dict[str, list[float]] = {m: [] for m in METRICS}
    for mode, t in VARIANTS:
        paths = [run_dir(runs, mode, t, s) / "result.json" for s in ("given", "estimated")]
        if not all(p.is_file() for p in paths):
            continue
        given, est = (json.loads(p.read_text()) for p in paths)
        for label in IMAGES:
            cells = []
            for m in METRICS:
                a, b = per_image(given, label, m), per_image(est, label, m)
                diffs[m].append(b - a)
                cells.append(f"{a:.2f} / {b:.2f} ({b - a:+.2f})")
            sig = 255 * per_image(est, label, "sigma_estimated")
            lines.append(f"| {mode} t = {t} | {label} | {sig:.1f} | " + " | ".join(cells) + " |")
    n = len(diffs[METRICS[0]])
    if n:
        lines.append(f"| mean over {n} | | | " + " | ".join(
            f"({sum(v) / n:+.2f})" for v in diffs.values()) + " |")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", required=True, help="folder of the train runs (kept; reruns skip done ones)")
    ap.add_argument("--summarize", action="store_true", help="only summarize the runs there")
    ap.add_argument("--out", help="also write the table here (Markdown)")
    ns = ap.parse_args()
    runs = Path(ns.runs)
    if not ns.summarize:
        run_all(runs)
    cmd = shlex.join(["OMP_NUM_THREADS=1", "nice", "-n", "10", "python", *TRAIN, "--noise-mode", "MODE",
                      "--timestep", "T", "[--sigma-estimate]"])
    text = "\n".join(["# SURE given the true sigma against the estimated sigma (issue 23)",
                      f"\nEach run: `{cmd}` (CPU, 1 thread, seed 0; the pair shares observations, "
                      "inputs and probes, so the difference is paired). Summary: "
                      f"`{shlex.join(['python', *sys.argv])}`\n", *summarize(runs)]) + "\n"
    return emit(text, ns.out)


if __name__ == "__main__":
    sys.exit(main())
