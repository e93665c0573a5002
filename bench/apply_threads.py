#!/usr/bin/env python3
"""Benchmark: `apply` on a 61 x 45 colour photo (the issue's), with one CPU core kept busy
by a spinning process, at `--threads 1` (the default, train's rule) and `--threads 2`
(torch's default on a 2-core machine, what apply used before), and at `--threads 1`
without the spinner. Wall seconds of the whole command (interpreter start included).

    python bench/apply_threads.py [--iterations 100] [--repeats 2]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _photo(d: Path) -> Path:
    clean = np.ascontiguousarray(skimage.data.astronaut()[100:280:4, 120:364:4][:45, :61]) / 255
    noisy = np.clip(clean + np.random.default_rng(0).normal(0, 25 / 255, clean.shape), 0, 1)
    Image.fromarray((noisy * 255).round().astype(np.uint8)).save(d / "noisy.png")
    return d / "noisy.png"


def _apply(d: Path, photo: Path, iterations: int, threads: int) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    t = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "run_study.py"), "apply", "--config", str(d / "c.json"),
                    "--image", str(photo), "--out", str(d / "r.png"), "--iterations", str(iterations),
                    "--threads", str(threads), "--quiet"], check=True, env=env, cwd=ROOT)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        photo = _photo(d)
        (d / "c.json").write_text(json.dumps({"noise_mode": "ddpm_resample", "timestep": 100, "scales": 3,
                                              "channels": 16, "device": "cpu"}))
        rows = [("threads 1, no spinner", [_apply(d, photo, a.iterations, 1) for _ in range(a.repeats)])]
        spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            for n in (1, 2):
                rows.append((f"threads {n}, one core spinning", [_apply(d, photo, a.iterations, n)
                                                                  for _ in range(a.repeats)]))
        finally:
            spin.kill()
    print(f"apply, 61x45 RGB, {a.iterations} iterations, {os.cpu_count()} CPUs; wall s per run")
    for name, ts in rows:
        print(f"  {name:<32} " + "  ".join(f"{t:.1f}" for t in ts))


if __name__ == "__main__":
    main()
