#!/usr/bin/env python3
"""Does TPE + ASHA find a configuration within 0.2 dB of a small grid's best for at most a
quarter of the grid's iterations?

1. The grid: every configuration of a small space (input mode x timestep x lr), each
   trained to --iterations with study.engine.trial.run_trial (no Ray), objective psnr_ema.
2. The search: a real study (`run_study.py run`: Ray Tune, OptunaSearch's TPE, ASHA)
   over the same values, --num-samples trials; its cost is the sum of the iterations its
   trials ran (read back from MLflow through the tracking room).
3. The found configuration is the study's best; its grid value is compared with the grid's
   best (same seed, same config: the same numbers).

    python bench/search_vs_grid.py --size 32 --iterations 200 --num-samples 12

Writes bench/results/search_vs_grid_<device>_<size>px_<time>.{json,md}.
"""
from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from study.config import DDPM_MODES, TrialConfig  # noqa: E402

MODES = ("uniform", "ddpm", "ddpm_resample")
TIMESTEPS = (25, 100, 200)
LRS = (0.003, 0.01, 0.03)


def grid_points() -> list[dict]:
    pts = []
    for mode, lr in itertools.product(MODES, LRS):
        for t in (TIMESTEPS if mode in DDPM_MODES else (None,)):
            pts.append({"noise_mode": mode, "lr": lr, **({"timestep": t} if t is not None else {})})
    return pts


def key(p: dict) -> tuple:
    return (p["noise_mode"], p.get("timestep") if p["noise_mode"] in DDPM_MODES else None, round(float(p["lr"]), 6))


def run_grid(base: TrialConfig) -> dict[tuple, float]:
    from study.engine.trial import run_trial

    out = {}
    for p in grid_points():
        r = run_trial(base.replace(**p), lambda m, t: None)
        out[key(p)] = r["psnr_ema"]
        print(f"grid {key(p)}: psnr_ema {r['psnr_ema']:.3f}", flush=True)
    return out


def run_search(args: argparse.Namespace, root: Path) -> list[dict]:
    from study.tracking import store as tracking

    space = root / "space.yaml"
    space.write_text(f"noise_mode: {list(MODES)}\ntimestep: {list(TIMESTEPS)}\nlr: {list(LRS)}\n")
    cmd = [sys.executable, str(ROOT / "run_study.py"), "run", "--name", "svg", "--root", str(root),
           "--num-samples", str(args.num_samples), "--space", str(space), "--max-concurrent", "2",
           "--seed", str(args.seed), *base_flags(args)]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"the search study failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    runs = tracking.study_runs(f"sqlite:///{root}/mlflow.db", "svg")
    return [{"params": t.params, "iterations": int(t.metrics.get("iteration", 0)),
             "psnr_ema": t.metrics.get("psnr_ema"), "completed": t.completed} for t in runs]


def base_flags(args: argparse.Namespace) -> list[str]:
    return ["--image", args.image, "--size", str(args.size), "--scales", str(args.scales),
            "--channels", str(args.channels), "--iterations", str(args.iterations),
            "--report-every", str(args.report_every), "--image-every", str(args.iterations)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image", default="camera")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--scales", type=int, default=2)
    ap.add_argument("--channels", type=int, default=16)
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--report-every", type=int, default=25)
    ap.add_argument("--num-samples", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--grid-from", metavar="RESULT.json", help="reuse the grid of an earlier result (same settings)")
    args = ap.parse_args()
    base = TrialConfig(images=(args.image,), size=args.size, scales=args.scales, channels=args.channels,
                       iterations=args.iterations, report_every=args.report_every, seed=args.seed, device="cpu")
    t0 = time.time()
    if args.grid_from:
        old = json.loads(Path(args.grid_from).read_text())
        if {k: v for k, v in old["args"].items() if k not in ("num_samples", "grid_from")} != \
                {k: v for k, v in vars(args).items() if k not in ("num_samples", "grid_from")}:
            raise SystemExit(f"{args.grid_from} was made with other settings: {old['args']}")
        grid = {tuple(k): v for k, v in old["grid"]}
    else:
        grid = run_grid(base)
    t_grid = time.time() - t0
    with tempfile.TemporaryDirectory() as d:
        trials = run_search(args, Path(d))
    t_search = time.time() - t0 - t_grid
    done = [t for t in trials if t["completed"] and t["psnr_ema"] is not None] or trials
    found = max(done, key=lambda t: t["psnr_ema"])
    fkey = key({k: (float(v) if k == "lr" else int(v) if k == "timestep" else v) for k, v in found["params"].items()
                if k in ("noise_mode", "lr", "timestep")})
    best_key = max(grid, key=grid.get)
    grid_iters, search_iters = len(grid) * args.iterations, sum(t["iterations"] for t in trials)
    res = {"command": "python bench/search_vs_grid.py " + " ".join(sys.argv[1:]), "args": vars(args),
           "grid": [[list(k), v] for k, v in grid.items()], "grid_points": len(grid), "grid_best": [list(best_key), grid[best_key]],
           "found": [list(fkey), grid.get(fkey)], "gap_db": grid[best_key] - grid.get(fkey, float("nan")),
           "grid_iterations": grid_iters, "search_iterations": search_iters,
           "iteration_ratio": search_iters / grid_iters, "grid_seconds": t_grid, "search_seconds": t_search,
           "trials": trials}
    res["pass"] = res["gap_db"] <= 0.2 and res["iteration_ratio"] <= 0.25
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = ROOT / "bench" / "results" / f"search_vs_grid_cpu_{args.size}px_{stamp}"
    out.with_suffix(".json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    md = (f"# TPE + ASHA against a grid ({stamp})\n\n`{res['command']}` on this project's 2-core CPU "
          f"(shared with other work; timings are indicative).\n\n"
          f"| | value |\n| --- | --- |\n| grid | {len(grid)} configs x {args.iterations} it = {grid_iters} it |\n"
          f"| grid best | {best_key}: {grid[best_key]:.3f} dB |\n"
          f"| search | {len(trials)} trials, {search_iters} it ({res['iteration_ratio']:.2f} of the grid) |\n"
          f"| search found | {fkey}: grid value {grid.get(fkey, float('nan')):.3f} dB (gap {res['gap_db']:.3f} dB) |\n"
          f"| goal (gap <= 0.2 dB, <= 0.25 of the iterations) | {'met' if res['pass'] else 'not met'} |\n")
    out.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
