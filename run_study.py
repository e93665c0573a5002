#!/usr/bin/env python3
"""DIP study service: the command line. Parse, then call study.*.

    python run_study.py                  a small study on this machine (embedded defaults)
    python run_study.py train ...        one trial, no Ray, no MLflow
    python run_study.py run|resume|export|ui ...   a study on this machine or a cluster
    python run_study.py report|apply ...           the answer: a report, a restored image
    python run_study.py submit|status|logs|stop|list|extend ...   a study on a cluster, by name
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from study.cliargs import add_config_flags, add_study_flags, build_config, study_overrides
from study.config import BUNDLED_IMAGES, StudyConfig
from study.cli_answer import add_answer_parsers, apply_preset, study_links
from study.cli_jobs import add_parsers as add_job_parsers
from study.paths import check_writable


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
    # torch is imported only when a command needs it
    from study.images import preflight
    from study.local import train
    from study.trial import TrialDiverged, resolve_device

    try:
        cfg = build_config(ns)
        resolve_device(cfg.device)
        preflight(cfg)
        out = Path(ns.out or f"runs/train-{time.strftime('%Y%m%d-%H%M%S')}").absolute()
        check_writable(out, "--out")
    except ValueError as e:
        return _user_error(e)
    try:
        train(cfg, out, quiet=ns.quiet)
    except TrialDiverged as e:
        return _user_error(e, code=1)
    return 0


def _study_flags(p: argparse.ArgumentParser) -> None:
    add_study_flags(p)
    p.add_argument("--config", metavar="FILE.json", help="base trial config (or an export); flags override it")
    add_config_flags(p, skip=("seed",))


PROJECT = str(Path(__file__).resolve().parent)


def default_root() -> str:
    return str(Path.cwd() / "studies")


def _root(ns: argparse.Namespace) -> str:
    if ns.root is None:
        return default_root()
    if not os.path.isabs(ns.root):
        raise ValueError(f"--root {ns.root!r} must be an absolute path (e.g. {Path(ns.root).absolute()})")
    return os.path.normpath(ns.root)


def _worker_path(image: str) -> str:
    """How a trial on any node finds an image file: inside the project (which travels to
    every node as Ray's working_dir, the trials' working folder), relative to it; else
    absolute, which only this node (or a shared mount) can read."""
    if image in BUNDLED_IMAGES:
        return image
    path = os.path.abspath(image)
    rel = os.path.relpath(path, PROJECT)
    inside = not rel.startswith("..") and Path.cwd().resolve() == Path(PROJECT).resolve()
    return rel if inside else path


def build_study(ns: argparse.Namespace) -> StudyConfig:
    base = {"seed": ns.study_seed} if ns.study_seed is not None else {}
    trial = build_config(ns, base)
    trial = trial.replace(images=tuple(_worker_path(i) for i in trial.images))
    d = {**study_overrides(ns), "root": _root(ns)}
    d.setdefault("name", f"demo-{time.strftime('%Y%m%d-%H%M%S')}")
    return StudyConfig(trial=trial, **d)


def cmd_run(ns: argparse.Namespace) -> int:
    from study import service

    try:
        s = build_study(apply_preset(ns))
        print(f"study {s.name!r}: {s.num_samples} trials of {s.trial.iterations} iterations on "
              f"{', '.join(s.trial.images)} ({s.trial.task}, {s.trial.size}px), metric {s.metric}; "
              f"data under {s.root}", flush=True)
        return service.run(s)
    except ValueError as e:
        return _user_error(e)


def cmd_resume(ns: argparse.Namespace) -> int:
    from study import service

    try:
        return service.resume(_root(ns), ns.study, ns.address or "")
    except ValueError as e:
        return _user_error(e)


def cmd_export(ns: argparse.Namespace) -> int:
    from study import service

    try:
        out = Path(ns.out).absolute()
        check_writable(out.parent, "--out folder")
        best = service.export_study(_root(ns), ns.study, out)
    except ValueError as e:
        return _user_error(e)
    print(f"exported trial {best.trial_id} ({best.metric} = {best.value:.4f}, "
          f"MLflow run {best.mlflow_run_id}) to {out}")
    return 0


def cmd_ui(ns: argparse.Namespace) -> int:
    from study import service

    try:
        cmd = service.ui_command(_root(ns), ns.host, ns.port)
    except ValueError as e:
        return _user_error(e)
    print(f"MLflow UI at http://{ns.host}:{ns.port}  (Ctrl-C stops it)", flush=True)
    print("\n".join(["each study's trial runs, best first:", *study_links(_root(ns), ns.host, ns.port)]), flush=True)
    os.execv(cmd[0], cmd)


def _user_error(e: Exception, code: int = 2) -> int:
    """User errors: one sentence on stderr, no traceback."""
    print(f"error: {e}", file=sys.stderr)
    return code


def _service_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run a study: Ray Tune + Optuna, recorded in MLflow")
    _study_flags(p)
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("resume", help="continue an interrupted study")
    p.add_argument("study", metavar="NAME")
    p.add_argument("--root", help="the study's root [./studies]")
    p.add_argument("--address", help="Ray cluster address [the study's own]")
    p.set_defaults(func=cmd_resume)
    p = sub.add_parser("export", help="write the best configuration of a study as JSON")
    p.add_argument("study", metavar="NAME")
    p.add_argument("--root", help="the study's root [./studies]")
    p.add_argument("--out", required=True, metavar="FILE.json", help="where to write it")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("ui", help="open the MLflow UI on a root's store")
    p.add_argument("--root", help="the root [./studies]")
    p.add_argument("--host", default="127.0.0.1", help="[127.0.0.1]")
    p.add_argument("--port", type=int, default=5000, help="[5000]")
    p.set_defaults(func=cmd_ui)


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="run_study.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command")
    _train_parser(sub)
    _service_parsers(sub)
    add_answer_parsers(sub)  # report, apply, run --preset (study/cli_answer.py)
    add_job_parsers(sub)  # submit, status, logs, stop, list, extend (study/cli_jobs.py)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    ns = parser.parse_args(argv)
    if ns.command is None:  # the bare command: a small study with the embedded defaults
        ns = parser.parse_args(["run", *(argv or [])])
    return ns.func(ns)


if __name__ == "__main__":
    sys.exit(main())
