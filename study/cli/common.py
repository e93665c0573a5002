"""What every command shares: the one error printer, the root rule, the check of a number
of trials to add, and how a study's images are named for the nodes that read them."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from study.cli.flags import build_config, study_dest, study_overrides
from study.config import BUNDLED_IMAGES, StudyConfig

PROJECT = Path(__file__).resolve().parents[2]


def user_error(e: Exception, code: int = 2) -> int:
    """User errors: one sentence on stderr, no traceback."""
    print(f"error: {e}", file=sys.stderr)
    return code


def default_root() -> str:
    return str(Path.cwd() / "studies")


def root(ns: argparse.Namespace) -> str:
    """--root, made absolute against the current folder (a study's folder must mean the
    same on every node, and study.json keeps it), else ./studies. `submit` alone refuses a
    relative root: it names a folder on the cluster's head, not here."""
    if getattr(ns, "root", None) is None:
        return default_root()
    return os.path.abspath(ns.root)


def add_threads_flag(p: argparse.ArgumentParser) -> None:
    """--threads of every command that trains here (train, apply): one default, one rule."""
    p.add_argument("--threads", type=int, default=1, metavar="N",
                   help="torch CPU threads [1: as a study's trial with --cpus-per-trial 1, so a "
                   "replay computes as the trial did (oneDNN splits work by thread count), and "
                   "two threads on a busy machine do not spin against each other]")


def set_threads(n: int) -> None:
    """Refuse a bad --threads, then give torch that many (imported here: torch is slow)."""
    if n < 1:
        raise ValueError(f"--threads {n} is not allowed; allowed: an integer >= 1")
    import torch

    torch.set_num_threads(n)


def check_added(n: int) -> None:
    if n <= 0:
        raise ValueError(f"--num-samples {n} is not a number of trials to add; allowed: 1 or more")


def worker_path(image: str) -> str:
    """How a trial on any node finds an image file: inside the project (which travels to
    every node as Ray's working_dir, the trials' working folder), relative to it; else
    absolute, which only this node (or a shared mount) can read."""
    if image in BUNDLED_IMAGES:
        return image
    path = os.path.abspath(image)
    rel = os.path.relpath(path, PROJECT)
    inside = not rel.startswith("..") and Path.cwd().resolve() == PROJECT.resolve()
    return rel if inside else path


def build_study(ns: argparse.Namespace) -> StudyConfig:
    seed = getattr(ns, study_dest("seed"))
    base = {"seed": seed} if seed is not None else {}
    trial = build_config(ns, base)
    trial = trial.replace(images=tuple(worker_path(i) for i in trial.images))
    d = {**study_overrides(ns), "root": root(ns)}
    if d.get("objectives") and "metric" not in d:  # --metric is the first objective's
        d["metric"] = d["objectives"][0].partition(":")[0]
    d.setdefault("name", f"demo-{time.strftime('%Y%m%d-%H%M%S')}")
    return StudyConfig(trial=trial, **d)
