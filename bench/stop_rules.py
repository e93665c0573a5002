#!/usr/bin/env python3
"""Benchmark: ES-WMV against held-out pixels as the no-reference stop (issue 22).

Trains, with the trial loop of `run_study.py train` (one multi-image trial per row: the
gray images in one pack, the colour ones in another), the laptop network (TrialConfig
defaults) at 64 px on 8 bundled images that are not the presets' four (camera,
astronaut, cell, hubble_deep_field), for each stop rule, sigma and input, and appends one
JSON line per image and run to --out:
- final `psnr_ema`, the oracle `psnr_best` (with its iteration), `psnr_autostop` (with
  its iteration: the rule's pick), and with holdout `psnr_estimate`, the estimate from
  held-out pixels with the clipped-noise correction, and `psnr_estimate_plain`, the same
  with sigma^2 subtracted (no correction, no ceiling; 100 where the difference is <= 0);
- the image's mean and its observation's clipped fraction (values at exactly 0 or 1).

    nice -n 10 env OMP_NUM_THREADS=1 python bench/stop_rules.py --rules eswmv --out X.jsonl
    python bench/stop_rules.py --table X.jsonl [Y.jsonl ...]   # the markdown table

The recovered share of a row is (psnr_autostop - final) / (oracle - final): 1 is the
oracle's stop, 0 no better than the budget, negative worse.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from study.config import TrialConfig  # noqa: E402
from study.engine.trial import Trial, run_trial  # noqa: E402

IMAGES = ("moon", "coins", "text", "brick", "coffee", "chelsea", "rocket", "retina")
INPUTS = {"uniform": dict(noise_mode="uniform", loss="mse"),
          "ddpm25_sure": dict(noise_mode="ddpm", timestep=25, loss="sure")}


def run(rule: str, inp: str, sigma: int, iterations: int, fraction: float) -> list[dict]:
    cfg = TrialConfig(images=IMAGES, size=64, device="cpu", report_every=50, iterations=iterations,
                      sigma=sigma / 255, stop_rule=rule, holdout_fraction=fraction, **INPUTS[inp])
    trial = Trial(cfg)
    t0 = time.perf_counter()
    r = run_trial(cfg, lambda m, t: None, trial=trial)
    seconds = time.perf_counter() - t0
    rows = []
    for n, net in zip(trial.networks, r["networks"], strict=True):
        m, y = net["metrics"], n.data.observation
        row = {"rule": rule, "input": inp, "sigma": sigma, "iterations": iterations, "image": n.label,
               "channels": y.shape[1], "mean": float(n.data.clean.mean()),
               "clipped": float(((y == 0) | (y == 1)).float().mean()), "seconds": seconds,
               **{k: m[k] for k in ("psnr_ema", "psnr_best", "best_iteration", "psnr_autostop",
                                    "autostop_iteration", "autostop_fired", "psnr_observation")}}
        if rule == "holdout":
            row |= true_split(trial, n)
            plain = m["holdout_mse"] - (sigma / 255) ** 2
            row |= {"fraction": fraction, "psnr_estimate": m["psnr_estimate"], "holdout_mse": m["holdout_mse"],
                    "psnr_estimate_plain": 10 * math.log10(1 / plain) if plain > 0 else 100.0}
        rows.append(row)
    return rows


def true_split(trial: Trial, net) -> dict:
    """The true MSE of the output the held-out rule picks, on the held-out pixels, on the
    kept ones and on all: what the estimate measures (held-out) against what it is compared
    with (all pixels)."""
    for pack in trial.packs:
        if net in pack.networks:
            k = pack.networks.index(net)
            stop = pack.autostop
            pick = stop.ema[k] if int(stop.iteration[k]) else None
            if pick is None:
                return {}
            d = (pick.float() - pack.data.clean[k].float()).square().mean(0)  # (H, W)
            held = stop.held[k, 0] > 0
            return {"mse_true_held": float(d[held].mean()), "mse_true_kept": float(d[~held].mean()),
                    "mse_true": float(d.mean())}
    return {}


def estimate(h: dict) -> float:
    """`psnr_estimate` with the ceiling of study/engine/holdout.py (no MSE below the held-out
    noise power's sampling error), for rows run before the ceiling existed: m is taken as
    its expectation, fraction x 64 x 64 x C, and the power as sigma^2 (an upper bound)."""
    m = h["fraction"] * 64 * 64 * h["channels"]
    return min(h["psnr_estimate"], 10 * math.log10(1 / ((h["sigma"] / 255) ** 2 * math.sqrt(2 / m))))


def table(paths: list[str]) -> str:
    rows = [json.loads(line) for p in paths for line in Path(p).read_text().splitlines() if line]
    by = {(r["input"], r["sigma"], r["image"], r["rule"]): r for r in rows}
    out = ["| input | sigma | image | C | mean | clipped | final | oracle @ it | ES-WMV @ it | rec. "
           "| holdout final | holdout oracle | holdout @ it | rec. | estimate (plain) | est. - true |",
           "| --- " * 16 + "|"]
    share = {"eswmv": [], "holdout": []}
    for key in sorted({k[:3] for k in by}):
        e, h = by.get((*key, "eswmv")), by.get((*key, "holdout"))
        if e is None or h is None:
            continue
        final, oracle = e["psnr_ema"], e["psnr_best"]
        gap = oracle - final

        def rec(x: dict) -> str:
            if gap < 0.5:
                return "-"
            share[x["rule"]].append((x["psnr_autostop"] - final) / gap)
            return f"{share[x['rule']][-1]:.2f}"

        out.append(
            f"| {key[0]} | {key[1]} | {key[2]} | {e['channels']} | {e['mean']:.2f} | {e['clipped']:.3f} "
            f"| {final:.2f} | {oracle:.2f} @ {int(e['best_iteration'])} | {e['psnr_autostop']:.2f} @ "
            f"{int(e['autostop_iteration'])} | {rec(e)} | {h['psnr_ema']:.2f} | {h['psnr_best']:.2f} | "
            f"{h['psnr_autostop']:.2f} @ {int(h['autostop_iteration'])} | {rec(h)} | "
            f"{estimate(h):.2f} ({h['psnr_estimate_plain']:.2f}) | "
            f"{estimate(h) - h['psnr_autostop']:+.2f} |")
    for (inp, sigma) in sorted({k[:2] for k in by}):
        pairs = [(by[k], by[(*k[:3], "holdout")]) for k in by
                 if k[:2] == (inp, sigma) and k[3] == "eswmv" and (*k[:3], "holdout") in by]
        if not pairs:
            continue
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        out.append(
            f"\n{inp} sigma {sigma}: holding out costs {mean([e['psnr_best'] - h['psnr_best'] for e, h in pairs]):.2f} dB "
            f"at the oracle and {mean([e['psnr_ema'] - h['psnr_ema'] for e, h in pairs]):.2f} dB at the final value (mean over "
            f"{len(pairs)} images); pick below its own run's oracle: ES-WMV "
            f"{mean([e['psnr_best'] - e['psnr_autostop'] for e, _ in pairs]):.2f} dB (max "
            f"{max(e['psnr_best'] - e['psnr_autostop'] for e, _ in pairs):.2f}), holdout "
            f"{mean([h['psnr_best'] - h['psnr_autostop'] for _, h in pairs]):.2f} dB (max "
            f"{max(h['psnr_best'] - h['psnr_autostop'] for _, h in pairs):.2f}); estimate - true: mean "
            f"{mean([estimate(h) - h['psnr_autostop'] for _, h in pairs]):+.2f}, mean |.| "
            f"{mean([abs(estimate(h) - h['psnr_autostop']) for _, h in pairs]):.2f} dB")
    for rule, xs in share.items():
        if xs:
            xs.sort()
            out.append(f"\n{rule}: recovered share median {statistics.median(xs):.2f}, mean "
                       f"{statistics.fmean(xs):.2f} over {len(xs)} rows with a gap of 0.5 dB or more "
                       f"(min {xs[0]:.2f}, max {xs[-1]:.2f})")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rules", nargs="+", default=["eswmv", "holdout"])
    p.add_argument("--runs", nargs="+", default=["uniform:25:1000", "ddpm25_sure:25:1000",
                                                 "uniform:50:800", "uniform:15:1000"],
                   metavar="INPUT:SIGMA:ITERATIONS")
    p.add_argument("--fraction", type=float, default=0.2, help="holdout_fraction [0.2]")
    p.add_argument("--out", default="bench/results/stop_rules.jsonl")
    p.add_argument("--table", nargs="+", metavar="JSONL", help="print the table of these results")
    a = p.parse_args()
    if a.table:
        print(table(a.table))
        return
    torch.set_num_threads(1)
    for spec in a.runs:
        inp, sigma, iterations = spec.split(":")
        for rule in a.rules:
            rows = run(rule, inp, int(sigma), int(iterations), a.fraction)
            with open(a.out, "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
            print(f"{rule} {spec}: {rows[0]['seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
