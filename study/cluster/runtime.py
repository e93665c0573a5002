"""Ray's runtime environment: the project folder every node runs (working_dir and its
excludes), joining or starting a cluster, and SIGTERM handled as Ctrl-C."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
from pathlib import Path
from types import FrameType, ModuleType
from typing import Iterator

PROJECT_ROOT = Path(__file__).resolve().parents[2]
# Shipped to every worker as the job's working_dir (so a real cluster runs this code).
RUNTIME_EXCLUDES = ["studies", "runs", "bench/results", "**/__pycache__",
                    ".pytest_cache", ".whl", "*.db"]


def sigterm_as_sigint() -> None:
    """Make SIGTERM stop the study as Ctrl-C does: call whatever handles SIGINT at that
    moment (Tune's graceful stop during `fit`, KeyboardInterrupt before it). Called, not
    re-raised as SIGINT: a Ray job's driver has SIGINT blocked. Install it after
    `ray.init`, which sets its own SIGTERM handler (it logs and ends the process)."""
    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        handler = signal.getsignal(signal.SIGINT)
        if callable(handler):
            handler(signal.SIGINT, frame)
        elif handler == signal.SIG_DFL:
            raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)


def job_working_dir() -> str | None:
    """The working_dir of the Ray job this process is the driver of, if any (the job server
    passes the job's config in this variable); a driver must not set its own then."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return None
    try:
        return (json.loads(raw).get("runtime_env") or {}).get("working_dir")
    except (ValueError, AttributeError):
        return None


@contextlib.contextmanager
def address_given(*variables: str) -> Iterator[None]:
    """Without `variables` in the environment for a while: Ray lets RAY_ADDRESS and
    RAY_API_SERVER_ADDRESS override an address passed to it (ray/_private/services.py
    get_ray_address_from_environment, ray/dashboard/utils.py
    get_address_for_submission_client), but a flag on the command line must win."""
    saved = {k: os.environ.pop(k) for k in variables if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def _check_address(address: str) -> None:
    if address in ("", "auto") or address.startswith("ray://"):
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"Ray address {address!r} is not HOST:PORT, 'auto' or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise ValueError(f"cannot reach the Ray cluster at {address!r}: {e.strerror or e}") from None


def connect(address: str) -> None:
    """Join the cluster at `address`, or start a local Ray ('' : this machine only)."""
    _check_address(address)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no network from here
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # Tune warns at every forced state snapshot (num_to_keep with frequent checkpoints of
    # small trials); the snapshots are wanted: they keep a killed driver's state recent.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # tune.result_loggers
    runtime_env: dict[str, str | list[str] | dict[str, str]] | None = {
        "working_dir": str(PROJECT_ROOT), "excludes": RUNTIME_EXCLUDES}
    # The test side's fault hook (see `_test_hook`) reaches trials on every node, not only
    # on nodes started from the driver's environment. Unset in use.
    hooks = {k: v for k, v in os.environ.items() if k.startswith(("DIP_TEST_", "DIP_FAULT_", "DIP_SYSMETRICS_"))}
    if hooks:
        runtime_env["env_vars"] = hooks
    if job_working_dir():  # a Ray job's driver: the job ships the code; Ray refuses a second working_dir
        runtime_env = None
    import ray  # here, not at the top: the job commands use this module without starting Ray

    explicit = address not in ("", "auto")  # '' and 'auto' leave the choice to RAY_ADDRESS
    kwargs = {"address": address or None, "runtime_env": runtime_env, "include_dashboard": False,
              "logging_level": "WARNING", "ignore_reinit_error": True}
    try:
        with address_given(*(["RAY_ADDRESS"] if explicit else [])):
            if address:
                ray.init(**kwargs)
            else:
                _init_local(ray, kwargs)
    except ConnectionError as e:
        raise ValueError(f"cannot connect to the Ray cluster at {address!r}: {e}") from None


# A Ray that ray.init starts here runs every worker on this machine, started by its raylet
# from this process's environment: they import this project from the driver's sys.path (Ray's
# _py_driver_sys_path) and start in its working folder, so the project need not travel as a
# working_dir, and without a runtime env the raylet's prestarted workers (one per CPU, ready
# with Python and Ray imported) take the study's relay and first trials: about 2 s off the
# time to the first trial on 2 cores (bench/study_overhead.py, README). Ray refuses any
# _system_config when ray.init would join a running cluster instead (RAY_ADDRESS, a `ray
# start` on this machine), before it connects: passing one (here, a default value, which
# changes nothing) tells starting from joining without Ray's private API.
STARTS_LOCAL = {"prestart_worker_first_driver": True}


def _workers_find_project() -> bool:
    """Whether the workers of a Ray started here import this project without a working_dir:
    Ray gives them the driver's script folder (where it is on sys.path) and working folder
    (ray/_private/worker.py, _py_driver_sys_path), and they inherit PYTHONPATH. A driver that
    found the project some other way (a sys.path entry it added) ships it as the working_dir."""
    script = Path(os.path.realpath(sys.argv[0])).parent if sys.argv and sys.argv[0] else None
    given = [Path.cwd()] + ([script] if script is not None and str(script) in sys.path else [])
    given += [Path(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return any(p.resolve() == PROJECT_ROOT for p in given)


def _init_local(ray: ModuleType, kwargs: dict[str, object]) -> None:
    """ray.init with no address: start a local Ray without a runtime env (where its workers
    find the project), or join the one Ray finds with the working_dir (its nodes may be other
    machines)."""
    if not _workers_find_project():
        ray.init(**kwargs)
        return
    try:
        ray.init(**{**kwargs, "runtime_env": None}, _system_config=STARTS_LOCAL)
    except ValueError:  # Ray would join a cluster: join it as any other
        ray.init(**kwargs)
