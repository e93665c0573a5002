"""Ray Jobs: a study launched on a cluster from anywhere that reaches its dashboard
(`ray job submit` done for the user), and followed, stopped or resumed there by the
study's name. The job's driver runs `run_study.py` on the head, in the project folder that
`submit` ships as the job's working_dir.

Jobs map to studies through the job's metadata (`dip.study`, `dip.root`,
`dip.tracking_uri`), so users never copy a job id; a study's job is its latest one.

Stopping: Ray 2.60's job server (dashboard/modules/job/job_supervisor.py) sends the
driver and its children RAY_JOB_STOP_SIGNAL (SIGTERM unless set to SIGINT), waits
RAY_JOB_STOP_WAIT_TIME_S seconds (3 by default) and then SIGKILLs them; both variables
are read from the supervisor's environment, which is the job's runtime_env. The driver it
starts has SIGINT blocked (Ray blocks it in its workers). So the driver treats SIGTERM as
Ctrl-C (`sigterm_as_sigint`), and `submit` sets a wait long enough for that clean stop.
"""
from __future__ import annotations

import asyncio
import logging
import os
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ParamSpec, TextIO, TypeVar

from study.cluster.runtime import PROJECT_ROOT, RUNTIME_EXCLUDES, address_given

if TYPE_CHECKING:  # ray is imported when a Cluster is made, not by the CLI's other commands
    from ray.job_submission import JobDetails

P = ParamSpec("P")
T = TypeVar("T")

STUDY_KEY, ROOT_KEY, URI_KEY, COMMAND_KEY = "dip.study", "dip.root", "dip.tracking_uri", "dip.command"
STOP_WAIT_KEY = "dip.stop_wait"
# Seconds between the stop signal and SIGKILL: Tune stops its trials and saves its state,
# then the service ends the MLflow runs (a few seconds on a CPU; more with many trials or
# a slow store). Ray's default, 3 s, would SIGKILL in the middle of that.
STOP_WAIT_S = 120
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


@dataclass(frozen=True)
class Job:
    """One Ray job of a study, as the job server reports it."""

    id: str
    study: str
    status: str                  # PENDING, RUNNING, STOPPED, SUCCEEDED or FAILED
    message: str
    start: float                 # seconds since the epoch (0 if not started)
    end: float
    root: str                    # the study's --root on the cluster
    tracking_uri: str            # as the cluster sees it ('' : sqlite under root)
    command: str                 # run, resume or extend
    stop_wait: int               # seconds the job server waits for a clean stop

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


def _job(d: JobDetails) -> Job:
    meta = d.metadata or {}
    return Job(id=d.submission_id or d.job_id or "", study=meta.get(STUDY_KEY, ""),
               status=str(getattr(d.status, "value", d.status)), message=d.message or "",
               start=(d.start_time or 0) / 1000, end=(d.end_time or 0) / 1000,
               root=meta.get(ROOT_KEY, ""), tracking_uri=meta.get(URI_KEY, ""),
               command=meta.get(COMMAND_KEY, ""), stop_wait=int(meta.get(STOP_WAIT_KEY) or STOP_WAIT_S))


def _token_available() -> bool:
    return bool(os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
                or (Path.home() / ".ray" / "auth_token").is_file())


class Cluster:
    """The job server of one cluster, at its dashboard URL (http://HEAD:8265)."""

    def __init__(self, url: str):
        if not url:
            raise ValueError("no cluster given; pass --cluster http://HEAD:8265 "
                             "(or set RAY_API_SERVER_ADDRESS)")
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"cluster {url!r} is not a dashboard URL; allowed: http(s)://HOST:PORT "
                             "(the Ray dashboard, port 8265 by default)")
        self.url = url.rstrip("/")
        # Ray 2.60's dashboard answers 401 without a token; Ray's client sends one only in
        # token mode. A token the user has made available means that mode.
        if "RAY_AUTH_MODE" not in os.environ and _token_available():
            os.environ["RAY_AUTH_MODE"] = "token"
        from ray.exceptions import AuthenticationError
        from ray.job_submission import JobSubmissionClient

        # Not a line per packaged file on submit, nor a WebSocket note after `logs --follow`.
        for name in ("ray", "ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk"):
            logging.getLogger(name).setLevel(logging.ERROR)

        try:
            with address_given("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):  # the URL given wins
                self.client = JobSubmissionClient(self.url)
        except AuthenticationError:
            raise ValueError(f"the cluster at {self.url} requires Ray's token and did not get the right one: set "
                             "RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH, a file) to what `ray get-auth-token` prints "
                             "on the head, and RAY_AUTH_MODE=token if it is set to something else") from None
        except (ConnectionError, RuntimeError, OSError) as e:
            raise ValueError(f"cannot reach the Ray job server at {self.url}: {str(e).splitlines()[0]}") from None

    def _call(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """A job-server call; what it refuses or cannot reach becomes one sentence."""
        try:
            return fn(*args, **kwargs)
        except (ConnectionError, RuntimeError, OSError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"the Ray job server at {self.url} refused or did not answer: {first}") from None

    def jobs(self, study: str | None = None) -> list[Job]:
        """The study jobs on the cluster (those `submit` made), oldest first."""
        jobs = [_job(d) for d in self._call(self.client.list_jobs)]
        jobs = [j for j in jobs if j.study and (study is None or j.study == study)]
        return sorted(jobs, key=lambda j: (j.start, j.id))

    def latest(self, study: str) -> Job:
        jobs = self.jobs(study)
        if not jobs:
            known = sorted({j.study for j in self.jobs()})
            raise ValueError(f"no job of study {study!r} on {self.url}; studies there: "
                             f"{', '.join(known) or 'none'}")
        return jobs[-1]

    def job(self, job_id: str) -> Job:
        return _job(self._call(self.client.get_job_info, job_id))

    def submit(self, study: str, command: str, argv: list[str], python: str, root: str,
               tracking_uri: str, stop_wait: int = STOP_WAIT_S) -> str:
        """Start `python run_study.py ARGV` as a job with this project as its working_dir."""
        job_id = f"dip-{study}-{time.strftime('%Y%m%d-%H%M%S')}"
        env = {"RAY_JOB_STOP_WAIT_TIME_S": str(stop_wait), "PYTHONUNBUFFERED": "1"}
        return self._call(
            self.client.submit_job, entrypoint=shlex.join([python, "run_study.py", *argv]), submission_id=job_id,
            runtime_env={"working_dir": str(PROJECT_ROOT), "excludes": RUNTIME_EXCLUDES, "env_vars": env},
            metadata={STUDY_KEY: study, ROOT_KEY: root, URI_KEY: tracking_uri, COMMAND_KEY: command,
                      STOP_WAIT_KEY: str(stop_wait)})

    def logs(self, job_id: str) -> str:
        return self._call(self.client.get_job_logs, job_id)

    def follow(self, job_id: str, out: TextIO) -> None:
        """Print the job's log as it grows, until the job ends."""
        async def tail() -> None:
            async for chunk in self.client.tail_job_logs(job_id):
                out.write(chunk)
                out.flush()

        asyncio.run(tail())

    def stop(self, job_id: str, timeout: float) -> Job:
        """Ask the job server to stop the job; wait until it has (a clean stop ends runs and
        saves Tune's state first)."""
        self._call(self.client.stop_job, job_id)
        deadline = time.time() + timeout
        job = self.job(job_id)
        while not job.terminal and time.time() < deadline:
            time.sleep(1)
            job = self.job(job_id)
        return job
