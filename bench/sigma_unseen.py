#!/usr/bin/env python3
"""Benchmark: the noise estimators once more, on images and seeds that the choice in
bench/sigma_estimators.py never saw (issue 23's check against tuning on what you measure).

    python bench/sigma_unseen.py [--out bench/results/sigma_unseen_cpu.md]

Relative error in % of noise/sigma.py `estimate_sigma` (clip-aware patch PCA) and, in
brackets, scikit-image's wavelet estimator, on clip(x + sigma eps, 0, 1), mean of seeds
100-102.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sigma_estimators as se  # noqa: E402
from benchutil import emit  # noqa: E402
from study.engine.images import load_image  # noqa: E402

UNSEEN = (("cell", (64, 256)), ("microaneurysms", (64,)), ("shepp_logan_phantom", (64, 256)),
          ("colorwheel", (64, 256)))  # microaneurysms is 102 px
SEEDS = (100, 101, 102)


def cell(x, sigma: int) -> str:
    ys = [se.observe(x, sigma / 255, seed) for seed in SEEDS]
    pca = statistics.mean(100 * (se.estimate_sigma(y) * 255 / sigma - 1) for y in ys)
    wav = statistics.mean(100 * (se.wavelet_sigma(y) * 255 / sigma - 1) for y in ys)
    return f"{pca:+.1f} ({wav:+.1f})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out")
    ns = ap.parse_args()
    lines = ["| image | size | sigma 10 | sigma 25 | sigma 50 |", "| --- | --- | --- | --- | --- |"]
    for name, sizes in UNSEEN:
        for size in sizes:
            x = load_image(name, size)
            lines.append(f"| {name} | {size} | " + " | ".join(cell(x, s) for s in (10, 25, 50)) + " |")
    return emit("\n".join(lines) + "\n", ns.out)


if __name__ == "__main__":
    sys.exit(main())
