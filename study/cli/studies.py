"""`run`, `resume`, `confirm`, `export` and `ui`: a study on this machine or a cluster."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from study.cli.answer import study_links
from study.cli.common import build_study, root, user_error, worker_path
from study.cli.flags import add_config_flags, add_study_flags
from study.cli.presets import apply_preset
from study.paths import check_writable


def _study_flags(p: argparse.ArgumentParser) -> None:
    add_study_flags(p)
    p.add_argument("--config", metavar="FILE.json", help="base trial config (or an export); flags override it")
    add_config_flags(p, skip=("seed",))


def cmd_run(ns: argparse.Namespace) -> int:
    from study import service

    try:
        s = build_study(apply_preset(ns))
        print(f"study {s.name!r}: {s.num_samples} trials of {s.trial.iterations} iterations on "
              f"{', '.join(s.trial.images)} ({s.trial.task}, {s.trial.size}px), metric {s.metric}; "
              f"data under {s.root}", flush=True)
        return service.run(s)
    except ValueError as e:
        return user_error(e)


def cmd_resume(ns: argparse.Namespace) -> int:
    from study import service

    try:
        return service.resume(root(ns), ns.study, ns.address or "")
    except ValueError as e:
        return user_error(e)


def cmd_export(ns: argparse.Namespace) -> int:
    from study import service

    try:
        out = Path(ns.out).absolute()
        check_writable(out.parent, "--out folder")
        if ns.stage == "confirm" and ns.pick:
            raise ValueError(f"--pick {ns.pick} chooses among the search's trials; allowed with --from confirm: none")
        best = service.export_study(root(ns), ns.study, out, ns.pick, ns.stage)
    except ValueError as e:
        return user_error(e)
    print(f"exported trial {best.trial} ({best.metric} = {best.value:.4f}, Ray trial id {best.trial_id}, "
          f"MLflow run {best.mlflow_run_id}) to {out}" + (f": {best.picked}" if best.picked else ""))
    return 0


def cmd_confirm(ns: argparse.Namespace) -> int:
    from study import confirm

    try:
        return confirm.confirm(root(ns), ns.study, top=ns.top, seeds=ns.seeds,
                               images=[worker_path(i) for i in ns.images or ()],
                               equal_compute=ns.equal_compute, address=ns.address or "")
    except ValueError as e:
        return user_error(e)


def _confirm_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("confirm", help="re-run a study's finalists on fresh seeds (and other images), "
                       "paired, with intervals: NAME/confirm.json and the report's Confirmed section",
                       description="Re-run the best configuration of each variant (input mode, and loss where "
                       "the space searched it), or the --top K trials, on --seeds N fresh seeds no trial used "
                       "and on --images (the study's by default), every variant on the same observations. "
                       "Writes NAME/confirm.json with bootstrap intervals and paired Wilcoxon tests against "
                       "the uniform input and BM3D; running it again finishes an interrupted confirmation.")
    p.add_argument("study", metavar="NAME")
    p.add_argument("--root", help="the study's root [./studies]")
    p.add_argument("--address", help="Ray cluster address [the study's own]")
    p.add_argument("--top", type=int, metavar="K", help="re-run the K best completed trials "
                   "[the best completed trial of each variant: input mode, and loss where searched]")
    p.add_argument("--seeds", type=int, default=5, metavar="N",
                   help="fresh seeds, none of which the search used [5]")
    p.add_argument("--images", nargs="+", metavar="NAME_OR_PATH",
                   help="bundled image names or PNG/JPEG files or folders [the study's images]")
    p.add_argument("--equal-compute", action="store_true", help="the same network forward passes "
                   "for every variant: a SURE variant (two per step) runs half the iterations")
    p.set_defaults(func=cmd_confirm)


def cmd_ui(ns: argparse.Namespace) -> int:
    from study import service

    try:
        cmd = service.ui_command(root(ns), ns.host, ns.port)
    except ValueError as e:
        return user_error(e)
    print(f"MLflow UI at http://{ns.host}:{ns.port}  (Ctrl-C stops it)", flush=True)
    print("\n".join(["each study's trial runs, best first:", *study_links(root(ns), ns.host, ns.port)]), flush=True)
    # MLflow 3's server also starts a job runner and task consumers (8 processes more) for
    # features a study never uses: off, the UI answers in about half the time.
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    os.execv(cmd[0], cmd)


def add_study_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run a study: Ray Tune + Optuna, recorded in MLflow",
                       description="Search DIP configurations with Ray Tune and Optuna, each trial an MLflow "
                       "child run of the study's parent run; at the end, export the best to ROOT/NAME/best.json.")
    _study_flags(p)
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("resume", help="continue an interrupted study",
                       description="Continue study NAME from its saved Ray Tune state: interrupted trials "
                       "go on from their checkpoints in their own MLflow runs.")
    p.add_argument("study", metavar="NAME")
    p.add_argument("--root", help="the study's root [./studies]")
    p.add_argument("--address", help="Ray cluster address [the study's own]")
    p.set_defaults(func=cmd_resume)
    p = sub.add_parser("export", help="write the best configuration of a study as JSON",
                       description="Write study NAME's best trial (its complete config, metrics, trial name "
                       "and MLflow run) to --out, for `train --config` and `apply --config`.")
    p.add_argument("study", metavar="NAME")
    p.add_argument("--root", help="the study's root [./studies]")
    p.add_argument("--out", required=True, metavar="FILE.json", help="where to write it")
    p.add_argument("--pick", metavar="RUN_NAME|N", help="several objectives: the Pareto front's member "
                   "to write, by trial or run name or by its row N in the report's front table "
                   "[the member best on the first objective]")
    p.add_argument("--from", dest="stage", choices=("search", "confirm"), default="search",
                   help="search: the search's best trial; confirm: the variant with the best "
                   "confirmed mean (NAME/confirm.json) [search]")
    p.set_defaults(func=cmd_export)
    _confirm_parser(sub)
    p = sub.add_parser("ui", help="open the MLflow UI on a root's store",
                       description="Serve the MLflow UI on the root's store (ROOT/mlflow.db) and print each "
                       "study's link to its trial runs, best first. Ctrl-C stops it.")
    p.add_argument("--root", help="the root [./studies]")
    p.add_argument("--host", default="127.0.0.1", help="the address to serve on; 0.0.0.0 for "
                   "every interface (others can then reach it) [127.0.0.1]")
    p.add_argument("--port", type=int, default=5000, help="the port to serve on [5000]")
    p.set_defaults(func=cmd_ui)
