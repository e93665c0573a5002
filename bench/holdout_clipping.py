#!/usr/bin/env python3
"""Benchmark: the clipping bias of the held-out PSNR estimate, apart from its sampling noise
(issue 22). No training: for a bundled image at 256 px, the observation is
clip(x + n, 0, 1) and the "output" is a stand-in with a known error, x + N(0, 0.03^2)
clipped; the estimate from 20 % held-out pixels is computed (a) subtracting sigma^2 and
(b) subtracting the clipped noise power of study/engine/holdout.py, over 20 seeds, against
the true PSNR of the output. 256 px gives m ~ 13,000 held-out values per channel, so the
sampling error (~ sqrt(2 / m) sigma^2) is small next to the clipping bias on a dark image.

    python bench/holdout_clipping.py    # seconds
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from study.engine.holdout import HoldOutStop, keep_mask, psnr_from_mse  # noqa: E402
from study.engine.images import load_image  # noqa: E402

IMAGES = ("hubble_deep_field", "retina", "coffee", "rocket", "moon", "camera")


def one(clean: torch.Tensor, sigma: float, seed: int) -> tuple[float, float, float, float]:
    g = torch.Generator().manual_seed(seed)
    y = (clean + sigma * torch.randn(clean.shape, generator=g)).clamp(0, 1)
    out = (clean + 0.03 * torch.randn(clean.shape, generator=g)).clamp(0, 1)
    held = 1 - keep_mask(tuple(clean.shape[-2:]), 0.2, seed + 1000)  # not the noise's seed
    rule = HoldOutStop(1, y, held, sigma)
    rule.track(out, out, torch.tensor(1))
    plain = float(psnr_from_mse(rule.error(out) - sigma**2)[0])
    corrected = rule.estimates(out)[0]["psnr_estimate"]
    true = float(10 * torch.log10(1 / (out - clean).square().mean()))
    clipped = float(((y == 0) | (y == 1)).float().mean())
    return plain - true, corrected - true, clipped, true


def main() -> None:
    torch.set_num_threads(1)
    print("| image | sigma | mean | clipped | true PSNR | estimate - true, sigma^2 subtracted | "
          "estimate - true, clipped power subtracted |\n" + "| --- " * 7 + "|")
    for name in IMAGES:
        clean = load_image(name, 256, "gray")
        for s in (15, 25, 50):
            rows = [one(clean, s / 255, seed) for seed in range(20)]
            cols = list(zip(*rows))
            f = lambda xs: f"{statistics.fmean(xs):+.2f} ± {statistics.stdev(xs):.2f}"  # noqa: E731
            print(f"| {name} | {s} | {float(clean.mean()):.2f} | {statistics.fmean(cols[2]):.3f} | "
                  f"{statistics.fmean(cols[3]):.2f} | {f(cols[0])} | {f(cols[1])} |")


if __name__ == "__main__":
    main()
