#!/usr/bin/env python3
"""Benchmark: how far one seeded `train` moves between CPU kernel ISAs (issue 24).

Runs `run_study.py train` (one thread, its default) once with oneDNN and ATen capped at
AVX2 (ONEDNN_MAX_CPU_ISA=AVX2, ATEN_CPU_CAPABILITY=avx2) and once at this CPU's own ISA,
each in its own process (the caps are read when torch loads), for each image and seed,
and prints psnr_ema, psnr_autostop and psnr_best of both and their differences. On a
CPU without AVX-512 both runs use AVX2 and the differences are 0.

    python bench/isa_replay.py                                  # camera, astronaut; seeds 0 1 2
    python bench/isa_replay.py --images camera --seeds 0 --iterations 300
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
AVX2 = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
KEYS = ("psnr_ema", "psnr_autostop", "psnr_best")


def train(image: str, seed: int, iterations: int, env: dict[str, str]) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "run_study.py", "train", "--image", image, "--size", "64",
               "--noise-mode", "ddpm_resample", "--timestep", "80", "--iterations", str(iterations),
               "--seed", str(seed), "--quiet", "--out", out]
        clean = {k: v for k, v in os.environ.items() if k not in AVX2}
        subprocess.run(cmd, cwd=ROOT, env={**clean, **env}, check=True)
        return json.loads((Path(out) / "result.json").read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", nargs="+", default=["camera", "astronaut"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--iterations", type=int, default=300)
    a = p.parse_args(argv)
    print(f"# command: python {shlex.join(sys.argv)}")
    print("# run_study.py train --image IMAGE --size 64 --noise-mode ddpm_resample --timestep 80 "
          f"--iterations {a.iterations} --seed SEED (one thread)\n")
    print("| image | seed | native ISA | " + " | ".join(f"{k} AVX2 / native / diff" for k in KEYS) + " |")
    print("| --- " * (3 + len(KEYS)) + "|")
    worst = dict.fromkeys(KEYS, 0.0)
    for image in a.images:
        for seed in a.seeds:
            capped, native = train(image, seed, a.iterations, AVX2), train(image, seed, a.iterations, {})
            cells = []
            for k in KEYS:
                d = native[k] - capped[k]
                worst[k] = max(worst[k], abs(d))
                cells.append(f"{capped[k]:.4f} / {native[k]:.4f} / {d:+.4f}")
            print(f"| {image} | {seed} | {native['machine']['cpu_isa']} | " + " | ".join(cells) + " |",
                  flush=True)
    print("\nlargest |diff| (dB): " + ", ".join(f"{k} {v:.4f}" for k, v in worst.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
