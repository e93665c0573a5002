"""`train`: one configuration on this machine, without Ray or MLflow."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from study.cli.common import add_threads_flag, set_threads, user_error
from study.cli.flags import add_config_flags, build_config
from study.paths import check_writable


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train one configuration here, without Ray or MLflow",
                       description="Train one DIP configuration on this machine and write "
                       "result.json, observation.png, input.png and output.png to --out.")
    p.add_argument("--config", metavar="FILE.json",
                   help="a config (or a study export); flags override it")
    p.add_argument("--out", metavar="DIR", help="output folder [runs/train-TIMESTAMP]")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    add_threads_flag(p)
    add_config_flags(p)
    p.set_defaults(func=cmd_train)


def cmd_train(ns: argparse.Namespace) -> int:
    # torch is imported only when a command needs it
    from study.engine.images import preflight
    from study.engine.machine import exported, record, replay_notice
    from study.engine.train import train
    from study.engine.trial import TrialDiverged, resolve_device

    try:
        set_threads(ns.threads)
        cfg = build_config(ns)
        device = resolve_device(cfg.device)
        preflight(cfg)
        out = Path(ns.out or f"runs/train-{time.strftime('%Y%m%d-%H%M%S')}").absolute()
        check_writable(out, "--out")
    except ValueError as e:
        return user_error(e)
    if ns.config:  # a study's export: say when this machine will not give its numbers
        notice = replay_notice(exported(ns.config), record(device))
        if notice:
            print(notice, file=sys.stderr, flush=True)
    try:
        train(cfg, out, quiet=ns.quiet)
    except TrialDiverged as e:
        return user_error(e, code=1)
    return 0
