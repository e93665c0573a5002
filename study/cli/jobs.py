"""The command line of a study on a cluster, followed from anywhere: submit, status, logs,
stop, list, extend. Registered by run_study.py's make_parser (`add_parsers`)."""
from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from study.cli import common
from study.cli.common import build_study, check_added, user_error
from study.cluster.jobs import STOP_WAIT_S, Cluster, Job
from study.cluster.runtime import PROJECT_ROOT
from study.cli.progress import progress_lines, study_row, when
from study.paths import command as command_line

if TYPE_CHECKING:  # mlflow is slow to import: the views' module only for the type checker
    from study.tracking.store import StudyView

SUBMITTABLE = ("run", "resume", "extend")


def _guarded(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Bad input, an unknown study, an unreachable cluster or store: one sentence, exit 2."""
    def run(ns: argparse.Namespace) -> int:
        try:
            return fn(ns)
        except ValueError as e:
            return user_error(e)
    return run


def _cluster_flag(p: argparse.ArgumentParser, required: bool) -> None:
    what = "" if required else " unless --root or --tracking-uri is given; with it, the job's state too"
    # Read when the command runs (see _cluster), so that tests and shells can set it late.
    p.add_argument("--cluster", metavar="URL", help=f"the Ray dashboard, http://HEAD:8265 [$RAY_API_SERVER_ADDRESS]{what}")


def _cluster(ns: argparse.Namespace) -> str | None:
    """--cluster, else $RAY_API_SERVER_ADDRESS (Ray's own variable for its job CLI); for
    status and list only when no --root or --tracking-uri says where to look instead."""
    if ns.cluster:
        return ns.cluster
    if getattr(ns, "root", None) or getattr(ns, "tracking_uri", None):
        return None
    return os.environ.get("RAY_API_SERVER_ADDRESS") or None


def _where_flags(p: argparse.ArgumentParser) -> None:
    _cluster_flag(p, required=False)
    p.add_argument("--root", help="the studies' root on this machine [./studies]")
    p.add_argument("--tracking-uri", help="the MLflow tracking URI to read [the study's own]")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("submit", help="run, resume or extend a study on a cluster as a Ray job",
                       description="Ship this project to the cluster as a Ray job's working_dir and run "
                       "one study command there. Returns at once; follow it with status/logs.")
    _cluster_flag(p, required=True)
    p.add_argument("--python", default="python", help="the Python on the head's PATH that has the "
                   "requirements [python]")
    p.add_argument("--stop-wait", type=int, default=STOP_WAIT_S, metavar="S",
                   help=f"seconds `stop` gives the study to end cleanly before Ray kills it [{STOP_WAIT_S}]")
    p.add_argument("study_command", nargs=argparse.REMAINDER, metavar="run|resume|extend ...",
                   help="the study command and its flags, as run locally (--root is required: a folder on the head)")
    p.set_defaults(func=_guarded(cmd_submit), study_parsers=sub)

    p = sub.add_parser("status", help="a study's progress: trials, best so far, speed, ETA",
                       description="A study's progress from its MLflow record: trials by state, the best "
                       "so far, iterations per second and an ETA; with --cluster, its latest job's state "
                       "too (and 'starting' until the job's driver has recorded the study).")
    p.add_argument("study", metavar="NAME")
    _where_flags(p)
    p.set_defaults(func=_guarded(cmd_status))

    p = sub.add_parser("logs", help="the driver's log of a study's latest job",
                       description="Print the driver's log of study NAME's latest Ray job on the cluster; "
                       "--follow keeps printing until the job ends.")
    p.add_argument("study", metavar="NAME")
    _cluster_flag(p, required=True)
    p.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    p.set_defaults(func=_guarded(cmd_logs))

    p = sub.add_parser("stop", help="stop a study's job cleanly (as Ctrl-C); resume continues it",
                       description="Stop study NAME's running Ray job as Ctrl-C stops a local study: its "
                       "trials end and Tune saves its state; `submit ... resume NAME` continues it.")
    p.add_argument("study", metavar="NAME")
    _cluster_flag(p, required=True)
    p.set_defaults(func=_guarded(cmd_stop))

    p = sub.add_parser("list", help="the studies under a root, on a tracking server or on a cluster",
                       description="One row per study (trials ended of asked, status, best value, "
                       "created, where it lives): under --root, on --tracking-uri, or submitted to --cluster.")
    _where_flags(p)
    p.set_defaults(func=_guarded(cmd_list))

    p = sub.add_parser("extend", help="add trials to a finished or interrupted study (Optuna's history kept)",
                       description="Run --num-samples more trials of study NAME: the searcher goes on from "
                       "every earlier trial, trial names go on numbering, best.json is replaced if beaten.")
    p.add_argument("study", metavar="NAME")
    p.add_argument("--num-samples", type=int, required=True, help="trials to add")
    p.add_argument("--root", help="the study's root [./studies]")
    p.add_argument("--address", help="Ray cluster address [the study's own]")
    p.set_defaults(func=_guarded(cmd_extend))


# --- submit -----------------------------------------------------------------------------

def _inside_project(path: str, what: str) -> None:
    p = Path(path).resolve()
    if not p.is_relative_to(PROJECT_ROOT):
        raise ValueError(f"{what} {path!r} is outside {PROJECT_ROOT}, the folder the job ships; "
                         "copy it there or use a bundled image")


def _validate(command: str, ns: argparse.Namespace) -> tuple[str, str]:
    """The refusals of a local `run`/`resume`/`extend` that do not need the cluster's disk;
    returns (study name, root)."""
    if ns.root is None or not os.path.isabs(ns.root):
        raise ValueError(f"submit needs --root as an absolute folder on the cluster's head (got {ns.root!r}), "
                         "e.g. --root /home/ubuntu/studies")
    if command == "extend":
        check_added(ns.num_samples)
    if command != "run":
        return ns.study, ns.root
    from study.cli.answer import apply_preset
    from study.config import BUNDLED_IMAGES

    s = build_study(apply_preset(ns))
    for image in s.trial.images:
        if image not in BUNDLED_IMAGES:
            _inside_project(image, "image")
    if s.space_file:
        _inside_project(s.space_file, "space file")
    from study.engine.images import preflight  # torch: only once the cheap checks passed
    from study.space import load_space

    load_space(s.space_file or None, s.trial)
    preflight(s.trial)
    return s.name, s.root


def cmd_submit(ns: argparse.Namespace) -> int:
    argv = list(ns.study_command)
    if not argv or argv[0] not in SUBMITTABLE:
        got = argv[0] if argv else "nothing"
        raise ValueError(f"submit runs one of: {', '.join(SUBMITTABLE)} (got {got}); "
                         "e.g. submit --cluster URL run --name big --root /home/ubuntu/studies ...")
    if ns.stop_wait < 1:
        raise ValueError(f"--stop-wait {ns.stop_wait} is not a number of seconds; allowed: 1 or more")
    command = argv[0]
    study_ns = ns.study_parsers.choices[command].parse_args(argv[1:])
    name, root = _validate(command, study_ns)
    cluster = Cluster(_cluster(ns) or "")
    earlier = cluster.jobs(name)
    if earlier and not earlier[-1].terminal:
        raise ValueError(f"study {name!r} is already running as job {earlier[-1].id} ({earlier[-1].status}); "
                         f"stop it first or follow it with `status {name}`")
    if command == "run" and earlier:
        raise ValueError(f"study {name!r} was already submitted (job {earlier[-1].id}, {earlier[-1].status}); "
                         f"use `submit ... resume {name}` or `submit ... extend {name}`, or another --name")
    if study_ns.address is None:  # the job's driver joins the cluster it runs on
        argv += ["--address", "auto"]
    uri = getattr(study_ns, "tracking_uri", None) or (earlier[-1].tracking_uri if earlier else "")
    job_id = cluster.submit(name, command, argv, ns.python, root, uri, ns.stop_wait)
    print(f"submitted study {name!r} ({command}) as Ray job {job_id} on {cluster.url}")
    follow = ["--cluster", cluster.url]
    print("follow it:\n  " + "\n  ".join(command_line(*c) for c in (
        ["status", name, *follow], ["logs", name, *follow, "--follow"], ["stop", name, *follow])))
    return 0


# --- status -----------------------------------------------------------------------------

def _tracking_uri(ns: argparse.Namespace, job: Job | None, name: str | None) -> str:
    """Where the study's MLflow record is: --tracking-uri, else the job's, else study.json's."""
    if ns.tracking_uri:
        return ns.tracking_uri
    if job is not None:
        return job.tracking_uri or f"sqlite:///{Path(job.root) / 'mlflow.db'}"
    root = common.root(ns)
    if name is None:
        return f"sqlite:///{Path(root) / 'mlflow.db'}"
    from study.studydir import read_study

    return read_study(root, name).current.resolved_tracking_uri


def cmd_status(ns: argparse.Namespace) -> int:
    from study.tracking import store as tracking

    url = _cluster(ns)
    job = Cluster(url).latest(ns.study) if url else None
    uri = _tracking_uri(ns, job, ns.study)
    if job is not None:
        print(f"job {job.id}: {job.status} (started {when(job.start)}"
              f"{', ended ' + when(job.end) if job.end else ''}){': ' + job.message if job.terminal and job.message else ''}")
    try:
        view = tracking.read_study_view(uri, ns.study)
    except tracking.StoreNotReady:
        if job is None:
            raise
        view = None
    except ValueError as e:
        if job is None:
            raise
        print(f"MLflow: {e}; pass --tracking-uri with an address that reaches it from here")
        return 0
    if view is None:
        if job is None:
            raise ValueError(f"no study {ns.study!r} in the MLflow store {uri!r}")
        print(_not_yet(job, ns.study, uri))
        return 0
    print(f"study {ns.study!r}: {view.status} (parent run {view.parent_run_id}, started "
          f"{when(view.start)}), MLflow {uri}")
    for line in progress_lines(view, time.time()):
        print("  " + line)
    return 0


def _not_yet(job: Job, name: str, uri: str) -> str:
    """The job runs (or ended) but its driver has not recorded the study at `uri` yet."""
    if job.terminal:
        return f"MLflow: no record of study {name!r} at {uri}: job {job.id} ended {job.status} before writing one"
    return (f"study {name!r} is starting: job {job.id} is {job.status}, and its driver has not "
            f"recorded the study in MLflow ({uri}) yet")


# --- logs, stop ---------------------------------------------------------------------------

def cmd_logs(ns: argparse.Namespace) -> int:
    cluster = Cluster(_cluster(ns) or "")
    job = cluster.latest(ns.study)
    if not ns.follow:
        sys.stdout.write(cluster.logs(job.id))
        return 0
    try:
        cluster.follow(job.id, sys.stdout)
    except KeyboardInterrupt:
        return 130
    print(f"[job {job.id} ended: {cluster.job(job.id).status}]")
    return 0


def cmd_stop(ns: argparse.Namespace) -> int:
    cluster = Cluster(_cluster(ns) or "")
    job = cluster.latest(ns.study)
    if job.terminal:
        raise ValueError(f"study {ns.study!r} has no running job: its latest, {job.id}, ended {job.status}")
    print(f"stopping job {job.id}: the study ends its trials cleanly (up to {job.stop_wait} s)...", flush=True)
    job = cluster.stop(job.id, timeout=job.stop_wait + 60)
    if not job.terminal:
        return user_error(ValueError(f"job {job.id} is still {job.status}; see `logs {ns.study}`"), code=1)
    print(f"job {job.id}: {job.status}. Continue the study with:\n  "
          + command_line("submit", "--cluster", cluster.url, "resume", ns.study, "--root", job.root))
    return 0


# --- list ---------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)  # several studies share one store: read it once
def _views(uri: str) -> dict[str, StudyView]:
    from study.tracking import store as tracking

    try:
        return {v.name: v for v in tracking.study_views(uri)}
    except ValueError:
        return {}


def cmd_list(ns: argparse.Namespace) -> int:
    rows = _list_rows(ns)  # everything read before anything is printed
    print(f"{'study':<24} {'trials':>9}  {'status':<9} {'best':>10}  {'created':<16}  store")
    for row in rows:
        print(row)
    return 0


def _list_rows(ns: argparse.Namespace) -> list[str]:
    url = _cluster(ns)
    if url:
        latest: dict[str, Job] = {j.study: j for j in Cluster(url).jobs()}  # oldest first: the latest wins
        return [study_row(name, _views(_tracking_uri(ns, j, None)).get(name), f"{j.root}/{name}",
                     f"  job {j.id} {j.status}") for name, j in latest.items()]
    if ns.tracking_uri:
        from study.tracking import store as tracking

        return [study_row(v.name, v, f"{v.params.get('root', '?')}/{v.name}") for v in tracking.study_views(ns.tracking_uri)]
    from study.studydir import read_study, study_names

    root = common.root(ns)
    if not Path(root).is_dir():
        raise ValueError(f"no studies under {root!r}: the folder does not exist")
    rows = []
    for name in study_names(root):
        s = read_study(root, name).current
        rows.append(study_row(s.name, _views(s.resolved_tracking_uri).get(s.name), str(s.study_dir)))
    return rows


# --- extend -------------------------------------------------------------------------------

def cmd_extend(ns: argparse.Namespace) -> int:
    root = common.root(ns)
    check_added(ns.num_samples)  # before importing the service (torch, Ray): a quick refusal
    from study import service

    return service.extend(root, ns.study, ns.num_samples, ns.address or "")
