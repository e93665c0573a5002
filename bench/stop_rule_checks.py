#!/usr/bin/env python3
"""Benchmark: issue 22's done-when checks of a stop rule, on camera (gray) and astronaut
(RGB) at 64 px, sigma 25, the uniform input, 2000 iterations (issue 22's table), each image
its own `train` run as in the issue:

- `psnr_autostop` within 1.5 dB of the oracle best of training on every pixel;
- at least 1.5 dB above the final value wherever that is 2 dB or more below the oracle;
- with holdout, `psnr_estimate` within 1 dB of the true PSNR at the stop.

    nice -n 10 env OMP_NUM_THREADS=1 python bench/stop_rule_checks.py   # ~2 x 25 min here

The `eswmv` run trains on every pixel: its final and oracle are the reference the holdout
rule, which fits fewer pixels, must recover; so holding out costs
(eswmv oracle - holdout oracle) and (eswmv final - holdout final).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from study.config import TrialConfig  # noqa: E402
from study.engine.trial import run_trial  # noqa: E402

KEYS = ("psnr_ema", "psnr_best", "best_iteration", "psnr_autostop", "autostop_iteration",
        "autostop_fired", "psnr_estimate")


def run(image: str, rule: str, iterations: int, fraction: float, size: int = 64) -> dict:
    cfg = TrialConfig(images=(image,), size=size, noise_mode="uniform", iterations=iterations,
                      report_every=100, device="cpu", stop_rule=rule, holdout_fraction=fraction)
    r = run_trial(cfg, lambda m, t: None)
    return {"image": image, "rule": rule, "iterations": iterations, "fraction": fraction, "size": size,
            **{k: r[k] for k in KEYS if k in r}}


def checks(ref: dict, x: dict) -> list[str]:
    """The issue's checks of rule run `x` against the all-pixel run `ref`."""
    final, oracle, auto = ref["psnr_ema"], ref["psnr_best"], x["psnr_autostop"]
    out = [f"within 1.5 dB of the oracle {oracle:.2f}: {auto:.2f} "
           f"{'PASS' if auto >= oracle - 1.5 else 'FAIL'}"]
    if final <= oracle - 2:
        out.append(f"1.5 dB above the final {final:.2f}: {'PASS' if auto >= final + 1.5 else 'FAIL'}")
    if "psnr_estimate" in x:
        d = x["psnr_estimate"] - auto
        out.append(f"estimate {x['psnr_estimate']:.2f} within 1 dB of {auto:.2f}: {d:+.2f} "
                   f"{'PASS' if abs(d) <= 1 else 'FAIL'}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", nargs="+", default=["camera", "astronaut"])
    p.add_argument("--rules", nargs="+", default=["eswmv", "holdout"])
    p.add_argument("--iterations", type=int, default=2000)
    p.add_argument("--fraction", type=float, default=0.2)
    p.add_argument("--size", type=int, default=64, help="the image side (the issue: 64)")
    p.add_argument("--out", default="bench/results/stop_rule_checks.jsonl")
    p.add_argument("--table", metavar="JSONL", help="print the checks of these results")
    a = p.parse_args()
    if not a.table:
        torch.set_num_threads(1)
        for image in a.images:
            for rule in a.rules:
                row = run(image, rule, a.iterations, a.fraction, a.size)
                with open(a.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
                print(json.dumps(row), flush=True)
    rows = [json.loads(line) for line in Path(a.table or a.out).read_text().splitlines() if line]
    for image in dict.fromkeys(r["image"] for r in rows):
        ref = next((r for r in rows if r["image"] == image and r["rule"] == "eswmv"), None)
        for x in (r for r in rows if r["image"] == image):
            print(f"{image} {x['rule']}: final {x['psnr_ema']:.2f}, oracle {x['psnr_best']:.2f} @ "
                  f"{x['best_iteration']:.0f}, autostop {x['psnr_autostop']:.2f} @ {x['autostop_iteration']:.0f}"
                  + ("" if ref is None else "; " + "; ".join(checks(ref, x))))


if __name__ == "__main__":
    main()
