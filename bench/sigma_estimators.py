#!/usr/bin/env python3
"""Benchmark: noise-level estimators on the bundled images, observed as the study
observes them, y = clip(x + sigma * eps, 0, 1) (issue 23).

Compares scikit-image's `estimate_sigma` (wavelet MAD, Donoho and Johnstone 1994, per
channel, averaged), the patch-PCA estimator of Chen et al. (ICCV 2015) on every patch,
and the same with the clipping correction (noise/sigma.py `estimate_sigma`). Prints, per
estimator, the relative error (estimate / truth - 1) per image, size and sigma (mean over
seeds), and summaries.

    python bench/sigma_estimators.py                  # ~1 min on one core
    python bench/sigma_estimators.py --out bench/results/sigma_estimators_cpu.md
"""
from __future__ import annotations

import argparse
import shlex
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from skimage.restoration import estimate_sigma as wavelet  # noqa: E402

from noise.sigma import estimate_sigma, pca_sigma  # noqa: E402
from study.engine.images import load_image  # noqa: E402
from benchutil import emit

GRAY = ("camera", "moon", "coins", "text", "page", "brick", "grass", "gravel", "horse", "clock")
COLOUR = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "retina",
          "immunohistochemistry")
SIGMAS = (10, 15, 25, 40, 50)


def wavelet_sigma(y: torch.Tensor) -> float:
    a = y[0].permute(1, 2, 0).numpy().astype(np.float64)
    return float(wavelet(a, channel_axis=-1, average_sigmas=True))


ESTIMATORS = {
    "wavelet (skimage)": wavelet_sigma,
    "pca (Chen 2015)": pca_sigma,
    "pca, clip-aware": estimate_sigma,
}


def observe(x: torch.Tensor, sigma: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (x + sigma * torch.randn(x.shape, generator=g)).clamp(0, 1)


def fitting(size: int) -> tuple[str, ...]:
    """The images at least `size` px on their short side (text is 172 px high, page 191)."""
    small = {"text": 172, "page": 191}
    return tuple(n for n in GRAY + COLOUR if size <= small.get(n, size))


def measure(sizes: list[int], seeds: int) -> dict[tuple[str, str, int, int], float]:
    """(estimator, image, size, sigma of 255) -> mean relative error over seeds."""
    out = {}
    for size in sizes:
        for name in fitting(size):
            x = load_image(name, size)
            for s in SIGMAS:
                ys = [observe(x, s / 255, seed) for seed in range(seeds)]
                for est, f in ESTIMATORS.items():
                    out[est, name, size, s] = statistics.mean(f(y) / (s / 255) - 1 for y in ys)
    return out


def table(err: dict, sizes: list[int]) -> list[str]:
    lines = []
    for size in sizes:
        lines += [f"\n### {size} px: relative error, % (mean over seeds)\n",
                  "| image | " + " | ".join(f"{e} @{s}" for e in ESTIMATORS for s in (10, 25, 50)) + " |",
                  "| --- |" + " --- |" * (3 * len(ESTIMATORS))]
        for name in fitting(size):
            cells = [f"{100 * err[e, name, size, s]:+.0f}" for e in ESTIMATORS for s in (10, 25, 50)]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["\n### Summary over images: median (max |.|) of the relative error, %\n",
              "| estimator | size | " + " | ".join(f"sigma {s}" for s in SIGMAS) + " |",
              "| --- | --- |" + " --- |" * len(SIGMAS)]
    for e in ESTIMATORS:
        for size in sizes:
            cells = []
            for s in SIGMAS:
                v = [err[e, n, size, s] for n in fitting(size)]
                cells.append(f"{100 * statistics.median(v):+.1f} ({100 * max(map(abs, v)):.0f})")
            lines.append(f"| {e} | {size} | " + " | ".join(cells) + " |")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", help="also write the table here (Markdown)")
    ns = ap.parse_args()
    torch.set_num_threads(1)
    err = measure(ns.sizes, ns.seeds)
    lines = [f"# Noise-level estimators, y = clip(x + sigma eps, 0, 1), {ns.seeds} seeds",
             f"\n`{shlex.join(['python', *sys.argv])}` (CPU, 1 thread; deterministic: "
             "torch's CPU generator, float64 eigenvalues)"] + table(err, ns.sizes)
    text = "\n".join(lines) + "\n"
    return emit(text, ns.out)


if __name__ == "__main__":
    sys.exit(main())
