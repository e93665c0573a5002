"""A study launched and followed through Ray Jobs: a real Ray head with its dashboard and
job server (token authentication on, as Ray 2.60 clusters run), started here with its own
temp dir and ports on 127.0.0.1; `submit`, `status`, `logs --follow`, `stop`, `resume`
through the CLI as a user types them, and MLflow read with its own client."""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import pytest

from faults import HOOK
from studyutil import ROOT, check_study, cli, client, env, free_port, logged_iteration

RAY = str(Path(sys.executable).with_name("ray"))
TRIALS = ["--size", "32", "--scales", "2", "--channels", "8", "--report-every", "10",
          "--image-every", "20", "--scheduler", "fifo", "--max-concurrent", "2"]


def _ours(marker: str) -> list[int]:
    """PIDs of the processes of our head: they all inherit its unique token path."""
    pids = []
    for p in Path("/proc").iterdir():
        try:
            if p.name.isdigit() and marker.encode() in (p / "environ").read_bytes():
                pids.append(int(p.name))
        except OSError:
            pass
    return [pid for pid in pids if pid != os.getpid()]


def _wait_for_dashboard(url: str, proc: subprocess.Popen, log: Path, token: str) -> None:
    """Until the job server answers what `JobSubmissionClient(url).list_jobs()` asks (its
    version, then the job list), with the token. Asked over HTTP from here: a client in a
    fresh interpreter per try costs seconds of imports each on a loaded machine."""
    import urllib.request

    def answers(path: str) -> bool:
        req = urllib.request.Request(url + path, headers={"authorization": f"Bearer {token}"})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status == 200
        except OSError:
            return False

    deadline = time.time() + 180
    while time.time() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        if answers("/api/version") and answers("/api/jobs/"):
            return
        time.sleep(0.5)
    raise AssertionError("the Ray job server did not answer in time: " + log.read_text()[-3000:])


@pytest.fixture(scope="module")
def head():
    """(dashboard URL, env for the CLI). The CLI gets only the token's path: it must turn
    Ray's token mode on by itself."""
    d = Path(tempfile.mkdtemp(prefix="rj", dir="/tmp"))  # short: Ray's socket paths are limited
    token = d / "token"
    token.write_text(secrets.token_hex(32))
    # The head's environment reaches the jobs' trial workers: the first trial to report
    # iteration 60 pauses there (tests/faults.py), so `stop` lands mid-trial on any machine.
    faults = d / "faults"
    faults.mkdir()
    e = env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), **HOOK,
            DIP_FAULT_PAUSE="report:60", DIP_FAULT_DIR=str(faults))
    dash = free_port()
    ports = {"port": free_port(), "dashboard-agent-listen-port": free_port(),
             "dashboard-agent-grpc-port": free_port(), "runtime-env-agent-port": free_port(),
             "metrics-export-port": free_port(), "ray-client-server-port": free_port(),
             "node-manager-port": free_port(), "object-manager-port": free_port()}
    log = d / "head.log"
    proc = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--temp-dir={d}/ray", "--node-ip-address=127.0.0.1",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         *(f"--{k}={v}" for k, v in ports.items()), "--num-cpus=2", "--disable-usage-stats"],
        env=e, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        _wait_for_dashboard(url, proc, log, token.read_text())
        yield url, {"RAY_AUTH_TOKEN_PATH": str(token)}, faults
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        for pid in _ours(str(token)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(d, ignore_errors=True)


def _submit(url: str, auth: dict, *args: str) -> str:
    r = cli("submit", "--cluster", url, "--python", sys.executable, *args, timeout=300, **auth)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "as Ray job dip-" in r.stdout and "status" in r.stdout and "logs" in r.stdout
    return r.stdout


def _follow(url: str, auth: dict, name: str) -> str:
    r = cli("logs", name, "--cluster", url, "--follow", timeout=600, **auth)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def _wait_for_pause(faults: Path, logs: Callable[[], str], uri: str, name: str,
                    timeout: float = 240) -> str:
    """Until a trial paused at iteration 60 (its checkpoints at 20, 40, 60 written) and MLflow
    holds its report of iteration 50; returns its id. (Tune's driver has that report already:
    a function trainable's `tune.report` returns once the driver processed it.)"""
    deadline = time.time() + timeout
    while not (faults / "paused").exists():
        assert time.time() < deadline, "no trial reached iteration 60 in time:\n" + logs()[-3000:]
        time.sleep(0.5)
    trial = (faults / "paused").read_text().split()[0]
    while logged_iteration(uri, name, trial) < 50:
        assert time.time() < deadline, f"MLflow has no iteration 50 of {trial} in time:\n" + logs()[-3000:]
        time.sleep(0.5)
    return trial


@pytest.mark.slow
def test_submit_status_stop_resume_follow(head, tmp_path):
    """One study through every command: submitted, watched, stopped mid-trial as Ctrl-C
    stops a local one, resumed through `submit resume`, followed to its end."""
    url, auth, faults = head
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    _submit(url, auth, "run", "--name", "jk", "--root", str(tmp_path), "--iterations", "200", *TRIALS,
            "--num-samples", "2")
    paused = _wait_for_pause(faults, lambda: cli("logs", "jk", "--cluster", url, **auth).stdout, uri, "jk")
    r = cli("status", "jk", "--cluster", url, **auth)
    assert r.returncode == 0 and "RUNNING" in r.stdout and "of 2 asked" in r.stdout, r.stdout + r.stderr
    assert "iterations/s" in r.stdout and "ETA at most" in r.stdout

    r = cli("stop", "jk", "--cluster", url, timeout=300, **auth)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "STOPPED" in r.stdout and "resume jk" in r.stdout
    log = cli("logs", "jk", "--cluster", url, **auth).stdout
    assert "study 'jk' interrupted" in log and "resume jk" in log, log[-3000:]  # the Ctrl-C path
    c = client(uri)
    runs = c.search_runs([c.get_experiment_by_name("jk").experiment_id])
    assert all(x.info.status in ("FINISHED", "KILLED") for x in runs), [x.info.status for x in runs]
    killed = [x for x in runs if x.data.tags.get("dip.role") == "trial" and x.info.status == "KILLED"]
    assert paused in {x.data.tags["dip.trial_id"] for x in killed}, "the stopped trial waits for resume"
    assert [x for x in runs if x.data.tags.get("dip.role") == "study"][0].info.status == "KILLED"

    _submit(url, auth, "resume", "jk", "--root", str(tmp_path))
    out = _follow(url, auth, "jk")
    assert "study 'jk' finished" in out and "SUCCEEDED" in out, out[-3000:]
    _, children = check_study(uri, "jk", n=2, iterations=200)  # the guarantees of a local study
    after = {x.info.run_id: x for x in children}
    for k in killed:  # went on in its own run from its checkpoint
        assert after[k.info.run_id].info.status == "FINISHED"
        assert int(after[k.info.run_id].data.tags["dip.resumed_from"]) >= 20

    r = cli("status", "jk", "--cluster", url, **auth)
    assert r.returncode == 0, r.stderr
    assert "SUCCEEDED" in r.stdout and "2 finished, 0 running, 0 failed, 0 interrupted, 0 pending, of 2" in r.stdout
    assert "best so far: psnr_ema = " in r.stdout
    r = cli("status", "jk", "--root", str(tmp_path))  # the same study, from its store alone
    assert r.returncode == 0 and "2 finished" in r.stdout and "job " not in r.stdout, r.stdout + r.stderr
    r = cli("list", "--cluster", url, **auth)
    assert r.returncode == 0 and "jk" in r.stdout and "2/2" in r.stdout and "SUCCEEDED" in r.stdout, r.stdout
    r = cli("stop", "jk", "--cluster", url, **auth)  # a finished job
    assert r.returncode == 2 and "no running job" in r.stderr and "SUCCEEDED" in r.stderr, r.stderr
    r = cli("submit", "--cluster", url, "run", "--name", "jk", "--root", str(tmp_path), **auth)
    assert r.returncode == 2 and "already submitted" in r.stderr, r.stderr


@pytest.mark.slow
def test_bad_input_is_one_sentence(head, tmp_path):
    url, auth, _ = head

    def refused(*args: str, code: int = 2, **extra: str) -> str:
        r = cli(*args, **{**auth, **extra})
        assert r.returncode == code, (args, r.stdout[-2000:], r.stderr[-2000:])
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        return r.stderr

    assert "no job of study 'nope'" in refused("status", "nope", "--cluster", url)
    assert "no job of study 'nope'" in refused("logs", "nope", "--cluster", url)
    assert "no job of study 'nope'" in refused("stop", "nope", "--cluster", url)
    assert "no study 'nope'" in refused("status", "nope", "--root", str(tmp_path))
    dead = f"http://127.0.0.1:{free_port()}"
    assert "cannot reach the Ray job server" in refused("status", "x", "--cluster", dead)
    assert "cannot reach the Ray job server" in refused("submit", "--cluster", dead, "run", "--name", "x",
                                                        "--root", str(tmp_path))
    assert "not a dashboard URL" in refused("logs", "x", "--cluster", "127.0.0.1:8265")
    assert "requires Ray's token" in refused("list", "--cluster", url, RAY_AUTH_TOKEN_PATH="/nonexistent",
                                             RAY_AUTH_MODE="disabled")
    # Refused here, before anything reaches the cluster.
    assert "needs --root" in refused("submit", "--cluster", url, "run", "--name", "x")
    assert "size = 30" in refused("submit", "--cluster", url, "run", "--name", "x", "--root", str(tmp_path),
                                  "--size", "30")
    assert "submit runs one of" in refused("submit", "--cluster", url, "export", "x")
    assert "--num-samples 0" in refused("submit", "--cluster", url, "extend", "x", "--root", str(tmp_path),
                                        "--num-samples", "0")
    assert "outside" in refused("submit", "--cluster", url, "run", "--name", "x", "--root", str(tmp_path),
                                "--image", str(_outside_image(tmp_path)))
    r = cli("list", "--cluster", url, **auth)
    assert r.returncode == 0 and " x " not in r.stdout  # nothing was submitted


def _outside_image(tmp_path: Path) -> Path:
    from PIL import Image

    p = tmp_path / "mine.png"
    Image.new("RGB", (64, 64), (90, 120, 30)).save(p)
    assert not p.resolve().is_relative_to(ROOT)
    return p


def _status_until_done(url: str, auth: dict, name: str, timeout: float = 600) -> list[str]:
    """`status NAME` once a second (each call waits for the one before) until the job ends;
    every answer must be exit 0 without a traceback. Returns the answers."""
    seen, deadline = [], time.time() + timeout
    while True:
        r = cli("status", name, "--cluster", url, **auth)
        assert r.returncode == 0 and "Traceback" not in r.stderr, (len(seen), r.stdout, r.stderr[-3000:])
        seen.append(r.stdout)
        if any(f"job dip-{name}-" in r.stdout.splitlines()[0] and s in r.stdout.splitlines()[0]
               for s in ("SUCCEEDED", "FAILED", "STOPPED")):
            return seen
        assert time.time() < deadline, "the study did not end in time:\n" + seen[-1]
        time.sleep(1)


@pytest.mark.slow
def test_status_from_submit_to_end_and_flags_over_environment(head, tmp_path):
    """`status`, polled from the moment `submit` returns, says the study is starting
    before its driver wrote anything (never a traceback from a store in creation); and a
    flag's address wins over RAY_API_SERVER_ADDRESS / RAY_ADDRESS naming another."""
    url, auth, _ = head
    _submit(url, auth, "run", "--name", "poll", "--root", str(tmp_path), "--iterations", "40", *TRIALS,
            "--num-samples", "2")
    seen = _status_until_done(url, auth, "poll")
    # The first answer is "starting" where it came before the driver recorded the study, else
    # the study's own status: a `status` process takes seconds to start and the driver records
    # the study within ~9 s of its start (README), so either can come first (CI saw both).
    assert ("study 'poll' is starting: job dip-poll-" in seen[0]
            or "study 'poll': RUNNING (parent run" in seen[0]), seen[0]
    starting = [i for i, a in enumerate(seen) if "is starting" in a]
    assert starting == list(range(len(starting))), seen  # never "starting" again once recorded
    assert "SUCCEEDED" in seen[-1] and "2 finished, 0 running" in seen[-1], seen[-1]
    assert not any("pass --tracking-uri" in s for s in seen), [s for s in seen if "pass --tracking-uri" in s]

    dead = f"http://127.0.0.1:{free_port()}"
    for args in (["list"], ["status", "poll"], ["logs", "poll"], ["stop", "poll"],
                 ["submit", "resume", "poll", "--root", str(tmp_path)]):
        cmd = [*args[:1], "--cluster", dead, *args[1:]] if args[0] == "submit" else [*args, "--cluster", dead]
        r = cli(*cmd, RAY_API_SERVER_ADDRESS=url, **auth)
        assert r.returncode == 2 and dead in r.stderr and "poll" not in r.stdout, (args, r.stdout, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    for args in (["list"], ["status", "poll"], ["logs", "poll"]):  # and the other way round
        r = cli(*args, "--cluster", url, RAY_API_SERVER_ADDRESS=dead, RAY_ADDRESS=dead, **auth)
        assert r.returncode == 0 and "poll" in r.stdout + r.stderr, (args, r.stdout, r.stderr)
    r = cli("stop", "poll", "--cluster", url, RAY_API_SERVER_ADDRESS=dead, **auth)
    assert r.returncode == 2 and "no running job" in r.stderr, r.stderr  # it reached the live head
    gone = f"127.0.0.1:{free_port()}"
    r = cli("extend", "poll", "--num-samples", "1", "--root", str(tmp_path), "--address", gone,
            RAY_ADDRESS=url.split("//")[1], **auth)
    assert r.returncode == 2 and gone in r.stderr, r.stderr
