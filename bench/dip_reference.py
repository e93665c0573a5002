#!/usr/bin/env python3
"""Benchmark: the DIP reference denoising setup, one row per input mode and seed.

The setup of DmitryUlyanov/deep-image-prior's denoising notebook (see docs/science.md):
camera in gray, y = clip(x + N(0, (25/255)^2), 0, 1); the `skip` net with 5 scales of
128 channels, skips of 4, bilinear upsampling; 32 input channels of U(0, 0.1) perturbed
by N(0, (1/30)^2) each step (uniform mode); Adam, lr 0.01, MSE, output EMA 0.99.
The DDPM modes replace only the input (the noisy observation, noised to --timestep).

    python bench/dip_reference.py                        # 3000 its; 128 px CPU, 512 px GPU
    python bench/dip_reference.py --size 64 --iterations 1500 --modes uniform ddpm

Writes bench/results/dip_reference_<device>_<date>.json and .md (with the command line);
the JSON is rewritten after every run, so an interrupted benchmark keeps what it did.
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from study.config import NOISE_MODES, TrialConfig  # noqa: E402
from study.engine.trial import Trial, TrialDiverged, resolve_device, run_trial  # noqa: E402
from study.paths import JsonObject  # noqa: E402

DEFAULT_MODES = ("uniform", "ddpm", "ddpm_resample", "ddpm_random_t")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, help="image side in px [128 on CPU, 512 on GPU]")
    p.add_argument("--iterations", type=int, default=3000, help="steps per run [3000]")
    p.add_argument("--modes", nargs="+", default=list(DEFAULT_MODES), choices=NOISE_MODES,
                   help=f"input modes [{' '.join(DEFAULT_MODES)}]")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="seeds [0]")
    p.add_argument("--timestep", type=int, default=100, help="DDPM t [100]")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N [auto]")
    p.add_argument("--threads", type=int,
                   help="CPU threads for torch [torch's default]; 1 avoids oversubscribing "
                   "a machine that other jobs share")
    p.add_argument("--report-every", type=int, default=100,
                   help="iterations between evaluations kept in the JSON curve [100]")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results",
                   help="folder for the JSON and markdown [bench/results]")
    return p.parse_args(argv)


def reference_config(ns: argparse.Namespace, size: int, mode: str, seed: int) -> TrialConfig:
    return TrialConfig(
        images=("camera",), size=size, color="gray", task="denoise", sigma=25 / 255,
        noise_mode=mode, timestep=ns.timestep, input_depth=32, reg_noise_std=1 / 30,
        net="skip", scales=5, channels=128, skip_channels=4, upsample="bilinear",
        lr=0.01, loss="mse", iterations=ns.iterations, ema_weight=0.99,
        report_every=ns.report_every, seed=seed, device=ns.device,
    )


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def run_one(cfg: TrialConfig) -> JsonObject:
    """One run: the final metrics, plus the curve of every report."""
    curve: list[dict[str, float]] = []

    def report(m: dict[str, float], _trial: Trial) -> None:
        curve.append({k: m[k] for k in ("iteration", "loss", "psnr", "psnr_ema", "ssim_ema")})
        print(f"  it {int(m['iteration']):>5}  psnr {m['psnr']:6.2f}  ema {m['psnr_ema']:6.2f}  "
              f"best {m['psnr_best']:6.2f}@{int(m['best_iteration'])}  "
              f"{m['seconds_per_iteration']:.3f} s/it", flush=True)

    t0 = time.perf_counter()
    try:
        result = run_trial(cfg, report)
    except TrialDiverged as e:
        return {"mode": cfg.noise_mode, "seed": cfg.seed, "diverged": str(e), "curve": curve}
    keep = ("psnr", "ssim", "psnr_ema", "ssim_ema", "psnr_best", "best_iteration",
            "psnr_observation", "ssim_observation", "iterations", "seconds_per_iteration")
    return {"mode": cfg.noise_mode, "seed": cfg.seed, **{k: result[k] for k in keep},
            "wall_seconds": time.perf_counter() - t0, "curve": curve}


def markdown(meta: JsonObject, rows: list[JsonObject]) -> str:
    lines = [
        f"# DIP reference denoising benchmark ({meta['date']})", "",
        f"Command: `{meta['command']}`", "",
        f"Device: {meta['device']}; torch {meta['torch']}. Camera {meta['size']}x{meta['size']} "
        f"gray, sigma 25/255, skip 5x128 (skip 4, bilinear), Adam lr 0.01, MSE, EMA 0.99, "
        f"{meta['iterations']} iterations, DDPM t = {meta['timestep']} (linear schedule).", "",
        "PSNR in dB against the clean image. final: the output after the last step (mean of "
        "4 input draws for stochastic inputs); EMA: the running average of outputs; "
        "best: the oracle maximum of the EMA over all steps (needs the clean image). "
        "s/it: training time per step, evaluation excluded.", "",
        "| mode | seed | PSNR final | PSNR EMA | best (oracle) @ it | SSIM EMA | s/it |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        if "diverged" in r:
            lines.append(f"| {r['mode']} | {r['seed']} | diverged | | | | |")
            continue
        lines.append(
            f"| {r['mode']} | {r['seed']} | {r['psnr']:.2f} | {r['psnr_ema']:.2f} | "
            f"{r['psnr_best']:.2f} @ {int(r['best_iteration'])} | {r['ssim_ema']:.3f} | "
            f"{r['seconds_per_iteration']:.3f} |")
    ok = [r for r in rows if "diverged" not in r]
    if ok:
        lines += ["", f"Observation (noisy input): PSNR {ok[0]['psnr_observation']:.2f} dB, "
                  f"SSIM {ok[0]['ssim_observation']:.3f}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    if ns.threads:
        torch.set_num_threads(ns.threads)
    device = resolve_device(ns.device)
    size = ns.size or (512 if device.type == "cuda" else 128)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    tag = re.sub(r"[^A-Za-z0-9]+", "-", device.type if device.type == "cpu"
                 else torch.cuda.get_device_name(device)).strip("-").lower()
    ns.out.mkdir(parents=True, exist_ok=True)
    stem = ns.out / f"dip_reference_{tag}_{size}px_{stamp}"
    meta = {"command": shlex.join([sys.executable, *sys.argv]) if argv is None
            else shlex.join(["python", "bench/dip_reference.py", *argv]),
            "date": stamp, "device": device_name(device), "torch": torch.__version__,
            "size": size, "iterations": ns.iterations, "timestep": ns.timestep,
            "modes": ns.modes, "seeds": ns.seeds}
    print(f"{meta['command']}\n{meta['device']}, camera {size}px, {ns.iterations} its", flush=True)
    rows: list[JsonObject] = []
    for mode in ns.modes:
        for seed in ns.seeds:
            cfg = reference_config(ns, size, mode, seed)
            print(f"{mode} seed {seed}", flush=True)
            rows.append({**run_one(cfg), "config": cfg.to_dict()})
            stem.with_suffix(".json").write_text(json.dumps({**meta, "runs": rows}, indent=2) + "\n")
            stem.with_suffix(".md").write_text(markdown(meta, rows))
    print(markdown(meta, rows))
    print(f"wrote {stem}.json and {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
