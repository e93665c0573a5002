#!/usr/bin/env python3
"""Benchmark: what a study costs beyond training (Ray, MLflow, images, checkpoints).

Runs the real CLI (`run_study.py run`, a local Ray with its own temp dir, the sqlite MLflow
store) on N tiny trials, C at a time, FIFO (no early stopping), then reads MLflow's run
times and Tune's result files and prints:

- time_to_first_trial_s: from the command to the first trial's MLflow run;
- overhead_per_trial_s = (wall x C - sum of training seconds) / N, the slot time a trial
  costs beyond its own training (issue 7's definition: 211 s x 2 / 60 = 7 s);
- where the time goes: inside a trial's run (run start to end, minus training), between
  runs in a slot (worker start, Tune scheduling), start-up and tear-down; worker reuse
  (distinct worker pids); and probes measured here: fresh-process imports, the trial's
  own compute (setup, steps, evaluations, images, a checkpoint).

    python bench/study_overhead.py                 # 60 trials, 2 at a time: ~4 min here
    python bench/study_overhead.py --trials 10     # a quick look
    python bench/study_overhead.py --trials 10 --sysmetrics 0   # system metrics off
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import mean, median

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TINY = ["--size", "32", "--scales", "2", "--channels", "8", "--input-depth", "8",
        "--iterations", "40", "--report-every", "10", "--image-every", "20"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=60, help="trials in the study [60]")
    p.add_argument("--concurrent", type=int, default=2, help="trials at once [2]")
    p.add_argument("--keep", action="store_true", help="keep the study folder (printed)")
    p.add_argument("--no-probes", action="store_true", help="skip the in-process probes")
    p.add_argument("--sysmetrics", type=float, default=5.0,
                   help="seconds between a trial's system-metrics samples, 0 for none [5]")
    return p.parse_args(argv)


def run_study(ns: argparse.Namespace, root: Path) -> tuple[float, float, subprocess.CompletedProcess]:
    cmd = [sys.executable, str(ROOT / "run_study.py"), "run", "--name", "ovh", "--root", str(root),
           "--num-samples", str(ns.trials), "--max-concurrent", str(ns.concurrent),
           "--cpus-per-trial", "1", "--scheduler", "fifo", *TINY]
    env = {**os.environ, "RAY_TMPDIR": str(root / "rt"), "RAY_USAGE_STATS_ENABLED": "0",
           "OMP_NUM_THREADS": "1", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
           "DIP_SYSMETRICS_EVERY": str(ns.sysmetrics)}
    (root / "rt").mkdir()
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    return t0, time.time(), proc


def mlflow_runs(root: Path) -> list[dict[str, float]]:
    """Each trial run's start, end (s since the epoch) and training seconds."""
    from study.tracking.store import StudyTracker

    tracker = StudyTracker(f"sqlite:///{root / 'mlflow.db'}", "ovh")
    return [{"start": t.start, "end": t.end, "train": t.metrics.get("seconds", 0.0), "status": t.status}
            for t in tracker.trial_summaries()]


def tune_results(root: Path) -> list[list[dict]]:
    out = []
    for f in sorted((root / "ovh" / "ray" / "tune").glob("*/result.json")):
        out.append([json.loads(line) for line in f.read_text().splitlines() if line.strip()])
    return out


def import_seconds(module: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"import {module}"], cwd=ROOT, check=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    return time.perf_counter() - t0


def probes() -> dict[str, float]:
    """The tiny trial's own costs, in this process (1 thread)."""
    import torch

    from study.engine import images as img
    from study.config import TrialConfig
    from study.engine.trial import Trial

    torch.set_num_threads(1)
    cfg = TrialConfig(size=32, scales=2, channels=8, input_depth=8, iterations=40,
                      report_every=10, device="cpu")
    t = {}
    t0 = time.perf_counter()
    trial = Trial(cfg)
    trial.observation_metrics()
    t["trial_setup_s"] = time.perf_counter() - t0
    steps = evals = 0.0
    for _ in range(4):
        t0 = time.perf_counter()
        for _ in range(10):
            trial.step()
        steps += time.perf_counter() - t0
        t0 = time.perf_counter()
        trial.evaluate()
        evals += time.perf_counter() - t0
    t["steps_40_s"], t["evaluations_4_s"] = steps, evals
    t.update(sampled_steps(trial))
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        for i, (_, image, _) in enumerate(trial.report_images(setup=True, final=True)):
            img.save_png(image, Path(d) / f"{i}.png")
        t["images_encode_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        torch.save(trial.state_dict(), Path(d) / "trial.pt")
        t["checkpoint_save_s"] = time.perf_counter() - t0
    return t


def sampled_steps(trial, n: int = 200) -> dict[str, float]:
    """Seconds per step without and with a system-metrics sampler in the process, sampling
    every 10 ms (500 times its default pace), interleaved so the load moves both alike."""
    from study.engine.sysmetrics import SystemSampler

    def per_step() -> float:
        t0 = time.perf_counter()
        for _ in range(n // 4):
            trial.step()
        return (time.perf_counter() - t0) / (n // 4)

    off, on, samples = [], [], 0
    for _ in range(2):
        off.append(per_step())
        sampler = SystemSampler(trial.device, every=0.01).start()
        on.append(per_step())
        samples += len(sampler.stop())
    return {"step_ms_sampler_off": 1e3 * median(off), "step_ms_sampler_on_10ms": 1e3 * median(on),
            "sampler_samples_taken": float(samples)}


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    cmd = shlex.join(["python", "bench/study_overhead.py", *(sys.argv[1:] if argv is None else argv)])
    print(f"# {cmd}\n# {ns.trials} trials of 40 iterations at 32 px, {ns.concurrent} at a time, "
          f"FIFO; load average before: {os.getloadavg()[0]:.1f}", flush=True)
    root = Path(tempfile.mkdtemp(prefix="ovh-", dir="/tmp"))
    t0, t1, proc = run_study(ns, root)
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n", file=sys.stderr)
        print(f"error: the study failed (exit {proc.returncode}); folder {root}", file=sys.stderr)
        return 1
    runs = sorted(mlflow_runs(root), key=lambda r: r["start"])
    wall, n, c = t1 - t0, len(runs), ns.concurrent
    train = sum(r["train"] for r in runs)
    in_run = [r["end"] - r["start"] - r["train"] for r in runs if r["end"]]
    first, last = runs[0]["start"], max(r["end"] for r in runs)
    print(f"trials: {n} ({sum(r['status'] == 'FINISHED' for r in runs)} finished)")
    print(f"wall_s: {wall:.1f}")
    print(f"training_s_per_trial: {train / n:.3f}")
    print(f"training_ms_per_iteration: {1e3 * train / n / int(TINY[TINY.index('--iterations') + 1]):.2f} "
          f"(system metrics every {ns.sysmetrics:g} s; 0: off)")
    print(f"in_run_overhead_s_per_trial: {mean(in_run):.2f} (median {median(in_run):.2f}): "
          "MLflow run start to end, minus training")
    busy = (last - first) * c - sum(r["end"] - r["start"] for r in runs)
    print(f"between_runs_s_per_trial: {busy / n:.2f}: slot time outside any run "
          "(worker start, Tune scheduling, run creation before the first record)")
    print(f"startup_s: {first - t0:.1f}  teardown_s: {t1 - last:.1f}")
    results = tune_results(root)
    pids = {r.get("pid") for rs in results for r in rs}
    firsts = [rs[0].get("time_total_s", 0.0) for rs in results if rs]
    print(f"tune_trials: {len(results)}  distinct_worker_pids: {len(pids)}  "
          f"mean_time_to_first_report_s: {mean(firsts) if firsts else float('nan'):.2f}")
    if not ns.no_probes:
        for k, v in probes().items():
            print(f"probe {k}: {v:.3f}")
        for module in ("torch", "mlflow", "ray", "study.engine.trial", "study.cluster.tune"):
            print(f"probe import_{module}_s: {import_seconds(module):.2f}")
    print(f"# study folder: {root}" + ("" if ns.keep else " (removed)"))
    if not ns.keep:
        subprocess.run(["rm", "-rf", str(root)], check=False)
    print(f"time_to_first_trial_s: {first - t0:.1f}")
    print(f"overhead_per_trial_s: {(wall * c - train) / n:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
