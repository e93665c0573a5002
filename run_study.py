#!/usr/bin/env python3
"""DIP study service: the command line. Parse, then call study.*.

    python run_study.py                  a small study on this machine (embedded defaults)
    python run_study.py train ...        one trial, no Ray, no MLflow
    python run_study.py run|resume|export|ui ...   see --help
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from study.cliargs import add_config_flags, build_config


def _train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train one configuration here, without Ray or MLflow",
                       description="Train one DIP configuration on this machine and write "
                       "result.json, observation.png, input.png and output.png to --out.")
    p.add_argument("--config", metavar="FILE.json",
                   help="a config (or a study export); flags override it")
    p.add_argument("--out", metavar="DIR", help="output folder [runs/train-TIMESTAMP]")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    add_config_flags(p)
    p.set_defaults(func=cmd_train)


def cmd_train(ns: argparse.Namespace) -> int:
    from study.local import train  # torch is imported only when a command needs it

    from study.images import preflight
    from study.trial import TrialDiverged

    try:
        cfg = build_config(ns)
        preflight(cfg)
        out = Path(ns.out or f"runs/train-{time.strftime('%Y%m%d-%H%M%S')}").absolute()
        check_writable(out)
    except ValueError as e:  # user errors: one sentence, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        train(cfg, out, quiet=ns.quiet)
    except TrialDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def check_writable(path: Path) -> None:
    """Refuse a folder that cannot be created or written, before any work starts."""
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK):
        raise ValueError(f"cannot write to {str(path)!r}: {str(probe)!r} is not a writable folder")


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="run_study.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command")
    _train_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    ns = parser.parse_args(argv)
    if ns.command is None:
        parser.print_help()
        return 0
    return ns.func(ns)


if __name__ == "__main__":
    sys.exit(main())
