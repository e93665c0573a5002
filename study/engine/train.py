"""`run_study.py train`: one trial on this machine, no Ray and no MLflow."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from study.engine import images as img
from study.engine.machine import record
from study.config import TrialConfig
from study.engine.trial import Trial, run_trial


def progress_line(m: dict[str, float], total: int) -> str:
    return (
        f"it {int(m['iteration']):>6}/{total}  loss {m['loss']:.5f}  psnr {m['psnr']:6.2f}  "
        f"ema {m['psnr_ema']:6.2f}  ssim_ema {m['ssim_ema']:.3f}  "
        f"autostop {m['psnr_autostop']:6.2f}@{int(m['autostop_iteration'])}"
        f"{'' if m['autostop_fired'] >= 1 else '?'}  "
        + (f"estimate {'~' if m.get('estimate_at_ceiling', 0) > 0 else ''}{m['psnr_estimate']:.2f}  "
           if "psnr_estimate" in m else "")
        + f"best(oracle) {m['psnr_best']:6.2f}@{int(m['best_iteration'])}  "
        f"{m['seconds_per_iteration']:.3f} s/it"
    )


def save_images(trial: Trial, out: Path) -> None:
    """observation.png, input.png, output.png and output_ema.png, as a study logs them
    (`Trial.report_images`); `<image>_` prefixed when a trial has several images."""
    for name, image, _ in trial.report_images(setup=True, final=True):
        img.save_png(image, out / f"{name.replace('/', '_')}.png")


def train(cfg: TrialConfig, out: Path, quiet: bool = False) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    trial = Trial(cfg)
    obs = trial.observation_metrics()
    if not quiet:
        labels = ", ".join(trial.image_labels)
        if cfg.repeats > 1:
            labels += f" x {cfg.repeats} repeats (seeds {cfg.seed}..{cfg.seed + cfg.repeats - 1})"
        print(f"training {cfg.net} on {labels} ({cfg.task}, {cfg.size}px, {cfg.noise_mode}"
              f"{f' t={cfg.timestep}' if cfg.is_ddpm else ''}, lr {cfg.lr}) on {trial.device}; "
              f"observation psnr {obs['psnr_observation']:.2f} ssim {obs['ssim_observation']:.3f}",
              flush=True)
        if "sigma_estimated" in obs:  # sigma_estimate: the sigma SURE uses, per network
            est = ", ".join(f"{255 * n.sigma:.1f}" for n in trial.networks)
            print(f"sigma for SURE estimated from each observation: {est} (of 255; true "
                  f"{255 * cfg.sigma:.1f})", flush=True)

    def report(m: dict[str, float], _trial: Trial) -> None:
        if not quiet:
            print(progress_line(m, cfg.iterations), flush=True)

    result = run_trial(cfg, report, trial=trial)
    result["wall_seconds"] = time.perf_counter() - t0
    result["machine"] = record(trial.device)  # what its numbers depend on (study/engine/machine.py)
    save_images(trial, out)
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    if not quiet:
        print(f"done: psnr {result['psnr']:.2f}, ema {result['psnr_ema']:.2f}, "
              f"ssim {result['ssim']:.3f}, autostop {result['psnr_autostop']:.2f} at iteration "
              f"{int(result['autostop_iteration'])} (observation {result['psnr_observation']:.2f}); "
              f"wrote {out}/result.json", file=sys.stdout, flush=True)
    return result
