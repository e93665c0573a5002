"""Helpers for the end-to-end study tests: run the real CLI, read MLflow with its own client."""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from study.tracking.keys import image_to_mlflow, to_mlflow

ROOT = Path(__file__).resolve().parent.parent
# Tiny trials: 32 px, 2 scales, 8 channels; a trial costs a second or two on a CPU.
TINY = ["--size", "32", "--scales", "2", "--channels", "8", "--iterations", "40",
        "--report-every", "10", "--image-every", "20"]


# MLflow 3's server also starts a job runner and two task consumers (its GenAI jobs, which no
# test uses): ten processes instead of two, and twice the time to answer on a loaded 2-core
# machine (83 s against 45 s, measured here at a load average of 6).
SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def env(**extra: str) -> dict[str, str]:
    e = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1",
         "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    e.update(extra)
    return e


def cli(*args: str, timeout: float = 600, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "run_study.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env=env(**extra))


def _ephemeral_range() -> range:
    try:
        lo, hi = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        lo, hi = 32768, 60999
    return range(lo, hi + 1)


_HANDED_OUT: set[int] = set()  # never the same port twice in one test process


def free_port(host: str = "127.0.0.1") -> int:
    """A free port outside the kernel's ephemeral range. A port from `bind(0)` is one the
    kernel hands out again, to the next `bind(0)` or outgoing connection (Ray's, MLflow's
    clients'), while nothing listens on it: a test that stops a server and starts it again
    on its port, or picks the port a minute before it starts one, then finds another's
    server there, or cannot bind (seen in CI: the restarted server's port was taken)."""
    import random

    eph = _ephemeral_range()
    for _ in range(1000):
        port = random.randint(20000, 65000)
        if port in eph or port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            _HANDED_OUT.add(port)
            return port
    raise RuntimeError("no free port outside the ephemeral range")


def listener_pids(port: int) -> set[int]:
    """PIDs of the processes holding a socket listening on TCP `port` (IPv4), from /proc."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        if f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:
            inodes.add(f"socket:[{f[9]}]")
    pids = set()
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            if any(os.readlink(fd) in inodes for fd in (p / "fd").iterdir()):
                pids.add(int(p.name))
        except OSError:
            continue
    return pids


def wait_http(url: str, proc: subprocess.Popen, log: Path | None = None, timeout: float = 180) -> None:
    """Until `url` answers; fails (with the server's last output) if `proc` ends first."""
    import time
    import urllib.request

    def output() -> str:
        if log is not None:
            return log.read_text()[-2000:]
        return (proc.communicate()[0] or "")[-2000:] if proc.poll() is not None else ""

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{url}: its server exited ({proc.returncode}): {output()}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {timeout:.0f} s: {output()}")


def wait_until(cond: Callable[[], Any], what: str, timeout: float = 120, poll: float = 0.2) -> Any:
    """Poll `cond` until it is truthy (returns its value); fail naming `what` at the deadline."""
    deadline = time.time() + timeout
    while not (value := cond()):
        assert time.time() < deadline, f"{what} did not happen within {timeout:.0f} s"
        time.sleep(poll)
    return value


def free_ports(n: int, host: str = "") -> list[int]:
    """`n` distinct free ports: all are held open while they are chosen (ports chosen one at
    a time can repeat once each is closed)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


# A Ray node of the tests' own (`ray start`): its own ports and temp dir, and a marker in its
# processes' environment that teardown kills by (kill_until_gone(marked_pids(...))), never
# `ray stop`. `ray start` enables token authentication in Ray 2.60; the nodes and the driver
# on this machine share ~/.ray/auth_token when the mode is set (AUTH).
RAY = str(Path(sys.executable).with_name("ray"))
AUTH = {"RAY_AUTH_MODE": "token"}
RAY_MARKER = "DIP_TEST_CLUSTER"
PORT_FLAGS = ("node-manager-port", "object-manager-port", "ray-client-server-port",
              "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
              "runtime-env-agent-port", "metrics-export-port")


def ray_start(marker: str, temp: str, *args: str) -> None:
    ports = [f"--{k}={p}" for k, p in zip(PORT_FLAGS, free_ports(len(PORT_FLAGS)), strict=True)]
    subprocess.run([RAY, "start", "--disable-usage-stats", f"--temp-dir={temp}", *ports, *args],
                   check=True, env=env(**AUTH, **{RAY_MARKER: marker}), capture_output=True, timeout=180)


@contextlib.contextmanager
def own_ray(prefix: str) -> Iterator[tuple[str, str, int]]:
    """(marker, temp dir, head port) for Ray nodes a test starts with `ray_start`; on exit
    their processes are killed by the marker and the temp dir removed."""
    marker = uuid.uuid4().hex[:10]
    temp = f"/tmp/{prefix}{marker}"  # short: Ray's socket paths must fit 107 characters
    try:
        yield marker, temp, free_port()
    finally:
        kill_until_gone(lambda: marked_pids(RAY_MARKER, marker))
        shutil.rmtree(temp, ignore_errors=True)


def client(uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def study_runs(uri: str, name: str) -> tuple[Any, list[Any]]:
    """(parent, children) of study `name`, as MLflow itself reports them."""
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    assert exp is not None, f"no experiment {name!r}"
    runs = c.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("dip.role") == "study"]
    # A trial started after a killed driver's last saved state is replaced on resume: its
    # run is closed as lost, says why, and is not one of the study's trials.
    lost = [r for r in runs if r.data.tags.get("dip.lost") == "true"]
    for r in lost:
        assert r.info.status == "KILLED" and "lost with the killed driver" in r.data.tags["dip.end_reason"]
    lost_ids = {r.info.run_id for r in lost}
    children = [r for r in runs if r.data.tags.get("dip.role") == "trial" and r.info.run_id not in lost_ids]
    assert len(parents) == 1, f"expected one parent run, got {len(parents)}"
    return parents[0], children


def check_study(uri: str, name: str, n: int, iterations: int = 40, report_every: int = 10,
                images: tuple[str, ...] = ("camera",)) -> tuple[Any, list[Any]]:
    """What every finished study must show in MLflow."""
    parent, children = study_runs(uri, name)
    c = client(uri)
    assert parent.info.status == "FINISHED"
    assert len(children) == n, f"{len(children)} child runs for {n} trials"
    trial_ids = [r.data.tags["dip.trial_id"] for r in children]
    assert len(set(trial_ids)) == n, "a trial has two runs"
    for r in children:
        assert r.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert r.info.status in ("FINISHED", "FAILED"), (r.info.run_name, r.info.status)
        assert r.data.params["noise_mode"] and r.data.params["lr"]  # the full config as params
        if r.info.status == "FAILED":
            assert r.data.tags.get("dip.end_reason"), "a failed run must say why"
            continue
        steps = [m.step for m in c.get_metric_history(r.info.run_id, to_mlflow("psnr"))]
        assert steps and steps == sorted(set(steps)) and steps[0] == report_every
        if r.data.tags.get("dip.completed") == "true":
            assert steps[-1] == iterations
        arts = [a.path for a in c.list_artifacts(r.info.run_id, "images")]
        for key in ("observation", "input", "output"):
            for image in images:  # MLflow writes an image key "images/camera/output" as "images~camera~output"
                name = image_to_mlflow(f"{image}/{key}" if len(images) > 1 else key)
                prefix = name.replace("/", "~") + "+step+"
                assert any(Path(a).name.startswith(prefix) for a in arts), (prefix, arts)
        if len(images) > 1:  # per-image values kept beside their mean
            per = [r.data.metrics[to_mlflow(f"psnr_ema/{i}")] for i in images]
            assert r.data.metrics[to_mlflow("psnr_ema")] == pytest.approx(sum(per) / len(per))
    return parent, children


def logged_iteration(uri: str, name: str, trial_id: str) -> int:
    """The last `iteration` MLflow holds for trial `trial_id` of study `name` (-1: none yet)."""
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    runs = c.search_runs([exp.experiment_id], f"tags.`dip.trial_id` = '{trial_id}'") if exp else []
    return int(runs[0].data.metrics.get(to_mlflow("iteration"), -1)) if runs else -1


def tracebacks(out: str) -> list[str]:
    """The tracebacks in a driver's output, less Python's "Exception ignored in:" reports from
    Ray's worker processes: Ray ends a trial's worker with an exception that can land inside
    a weakref callback (seen: `_weakrefset.py`, `_remove`, at a study's end), which Python
    prints and drops. That is Ray's teardown, not a failure of the study."""
    prefix = re.compile(r"^(?:\x1b\[\d+m)?(\([^)]*pid=\d+[^)]*\))")
    lines, found = out.splitlines(), []
    for i, line in enumerate(lines):
        if "Traceback (most recent call last)" not in line:
            continue
        m = prefix.match(line)
        before = [x for x in lines[:i] if m and prefix.match(x) and prefix.match(x)[1] == m[1]]
        if not (m and before and "Exception ignored in" in before[-1]):
            found.append(line)
    return found


def best_child(children: list[Any], metric: str = "psnr_ema") -> Any:
    done = [r for r in children if r.data.tags.get("dip.completed") == "true"]
    return max(done, key=lambda r: (r.data.metrics[to_mlflow(metric)], ))


def read_json(p: Path) -> dict[str, Any]:
    return json.loads(Path(p).read_text())


def _session(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 that a test can stop and start again on the same
    port and store (a head restart); stopped by its own process group only."""

    def __init__(self, folder: Path, port: int | None = None):
        self.folder, self.port = Path(folder), port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 180) -> "MlflowServer":
        log = self.folder / "server.log"
        with open(log, "a") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
                 "--backend-store-uri", f"sqlite:///{self.folder}/server.db", "--artifacts-destination",
                 str(self.folder / "artifacts"), "--workers", "1"],
                stdout=out, stderr=subprocess.STDOUT, env=env(**SERVER_ENV), start_new_session=True)
        try:
            wait_http(self.url + "/health", self.proc, log, timeout)
            # the server that answered must be this one (its session), not another's on the port
            mine = {p for p in listener_pids(self.port) if _session(p) == self.proc.pid}
            assert mine, f"{self.url} answers, but not from this server: {log.read_text()[-2000:]}"
        except AssertionError:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        import signal

        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)


def marked_pids(var: str, value: str) -> list[int]:
    """Processes (other than this one) whose environment holds VAR=value: the ones a test
    started with that marker, and only those."""
    needle = f"{var}={value}\0".encode()
    pids = []
    for p in Path("/proc").iterdir():
        try:
            if p.name.isdigit() and int(p.name) != os.getpid() and needle in (p / "environ").read_bytes():
                pids.append(int(p.name))
        except OSError:
            continue
    return pids


def kill_until_gone(pids: Any, rounds: int = 50) -> list[int]:
    """SIGKILL what `pids()` lists until it lists nothing; returns the survivors."""
    import signal
    import time

    for _ in range(rounds):
        left = pids()
        if not left:
            return []
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
    return pids()
