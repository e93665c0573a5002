#!/usr/bin/env python3
"""Benchmark: `apply --stop auto` with a SURE configuration on a noisy photo whose sigma
is not the config's, with the sigma estimated (`--sigma auto`, the default) against the
same run given the true sigma (issue 23's done-when: estimate within 20 %, restoration
within 0.5 dB).

The photo is a bundled colour image (chelsea by default) resized to --size, with
y = clip(x + sigma eps, 0, 1) written as an 8-bit PNG, as a user's photo would be. The
config is the honest-answer SURE run (ddpm t = 25, skip 3 x 32, lr 0.01; its sigma
25/255 is what a study exported, and is replaced by the estimate or the given value).

    python bench/sigma_apply.py                        # sigma 15 and 40, 64 px; ~15 min on one core
    python bench/sigma_apply.py --out bench/results/sigma_apply_cpu_64px.md
"""
from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from study.config import TrialConfig  # noqa: E402
from study.engine.apply import ApplyOptions, apply, read_picture  # noqa: E402
from study.engine.images import load_image, save_png  # noqa: E402
from study.engine.metrics import psnr  # noqa: E402
from benchutil import emit

CONFIG = TrialConfig(noise_mode="ddpm", timestep=25, loss="sure", size=64, device="cpu")


def one(image: str, size: int, sigma255: float, opts: dict, work: Path) -> list[str]:
    x = load_image(image, size)
    g = torch.Generator().manual_seed(0)
    noisy = work / f"{image}_{sigma255:g}.png"
    save_png((x + sigma255 / 255 * torch.randn(x.shape, generator=g)).clamp(0, 1), noisy)
    obs = read_picture(noisy).x
    rows = []
    for given in (None, str(sigma255 / 255)):
        out = work / f"r_{sigma255:g}_{'given' if given else 'auto'}.png"
        info = apply(CONFIG, str(noisy), out, ApplyOptions(stop="auto", sigma=given, **opts), progress=lambda s: None)
        p = psnr(read_picture(out).x, x)
        err = info["sigma"] * 255 / sigma255 - 1
        rows.append((info["sigma_source"], info["sigma"] * 255, err, p, info["stop_iteration"], info["iterations_run"]))
    d = rows[0][3] - rows[1][3]
    return [f"| {image} {size} px | {sigma255:g} | {psnr(obs, x):.2f} | {s} | {v:.2f} | {100 * e:+.1f} % | {p:.2f} | "
            f"{it} ({ran}) | {d:+.2f} |" for s, v, e, p, it, ran in rows]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--image", default="chelsea")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--sigmas", type=float, nargs="+", default=[15, 40])
    ap.add_argument("--patience", type=int, default=300)
    ap.add_argument("--max-iterations", type=int, default=1500)
    ap.add_argument("--out", help="also write the table here (Markdown)")
    ns = ap.parse_args()
    torch.set_num_threads(1)
    opts = {"patience": ns.patience, "max_iterations": ns.max_iterations}
    lines = [f"# apply --stop auto, SURE, sigma estimated against given ({ns.image}, {ns.size} px)",
             f"\n`{shlex.join(['python', *sys.argv])}` (CPU, 1 thread; config: ddpm t = 25, sure, "
             f"skip 3 x 32, lr 0.01, seed 0; ES-WMV window 100, patience {ns.patience})\n",
             "| photo | true sigma (/255) | observation PSNR | sigma | used (/255) | error | restored PSNR | "
             "stop it (ran) | estimated - given (dB) |",
             "| --- |" + " --- |" * 8]
    with tempfile.TemporaryDirectory() as d:
        for s in ns.sigmas:
            lines += one(ns.image, ns.size, s, opts, Path(d))
            print("\n".join(lines[-2:]), flush=True)
    text = "\n".join(lines) + "\n"
    return emit(text, ns.out)


if __name__ == "__main__":
    sys.exit(main())
