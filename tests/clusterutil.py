"""A multi-host cluster on this machine, for the cluster tests (needs root: `ip netns`).

    the host = the head node                      a worker node (x2), each its own netns
    bridge dipcXb  10.231.X.1/24  <-- veth -->   dipcXwIn  10.231.X.(10+I)/24
      ray head (0 CPUs: no trial lands here)        ray worker node (--num-cpus 1)
      mlflow server   http://10.231.X.1:M           its own mount namespace: a private
      moto_server S3  http://10.231.X.1:S             tmpfs (Ray's temp dir, TMPDIR, HOME,
      the driver: run_study.py                        working folder) and one over the tests'
                                                      temp folder: no driver's study root

X is picked per cluster among 10.231.100-249 that no interface or route uses, and claimed
by creating the bridge (a name is unique on the host). Every process started here carries
DIPC_CLUSTER=<id> in its environment; teardown kills only the processes of this cluster's
network namespaces and those with that marker, then deletes its own namespaces and bridge.
It never runs `ray stop` and never kills by name.
"""
from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from studyutil import ROOT, SERVER_ENV, env, free_ports, kill_until_gone, marked_pids, wait_http

BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")
MOTO = str(BIN / "moto_server")
BUCKET = "dip-studies"
AWS_KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1"}


def usable() -> str:
    """Why this machine cannot host the cluster ('' when it can)."""
    if os.geteuid() != 0:
        return "the multi-host cluster needs root (ip netns, mount namespaces)"
    for tool in ("ip", "unshare", "mount"):
        if shutil.which(tool) is None:
            return f"the multi-host cluster needs `{tool}`"
    if not Path(MOTO).exists():
        return "moto_server is missing: make install (requirements-dev.txt has moto[server])"
    return ""


def sh(*cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _claim_subnet() -> int:
    """A free 10.231.X.0/24, claimed by creating bridge dipcXb (fails if another has it)."""
    used = sh("ip", "-o", "-4", "addr").stdout + sh("ip", "-4", "route").stdout
    for x in random.sample(range(100, 250), 150):
        if f"10.231.{x}." in used or Path(f"/var/run/netns/dipc{x}w1").exists():
            continue
        if sh("ip", "link", "add", f"dipc{x}b", "type", "bridge", check=False).returncode == 0:
            return x
    raise RuntimeError("no free 10.231.X.0/24 subnet for the test cluster")


@dataclass
class Service:
    """A server process in its own session, stopped and restarted with the same command."""

    name: str
    cmd: list[str]
    url: str                 # answers once the server is up
    log: Path
    env: dict[str, str]
    proc: subprocess.Popen | None = None

    def launch(self) -> None:
        with open(self.log, "a") as out:
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=self.env, start_new_session=True)

    def wait(self) -> None:
        wait_http(self.url, self.proc, self.log)

    def start(self) -> None:
        self.launch()
        self.wait()

    def stop(self) -> None:
        """SIGTERM its process group (the server and its workers), SIGKILL after 10 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 20)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        try:  # workers left in the group after the leader exited
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@dataclass
class Worker:
    index: int
    ns: str                  # network namespace name
    ip: str
    host_link: str           # the veth end on the host's bridge

    def pids(self) -> list[int]:
        r = sh("ip", "netns", "pids", self.ns, check=False)
        return [int(p) for p in r.stdout.split()]

    def raylet_pid(self) -> int | None:
        for pid in self.pids():
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip() == "raylet":
                    return pid
            except OSError:
                continue
        return None

    def kill_all(self) -> None:
        left = kill_until_gone(self.pids)
        if left:
            raise RuntimeError(f"processes of {self.ns} survive SIGKILL: {left}")


@dataclass
class Cluster:
    """The whole cluster; `Cluster.up(folder)` builds it, `down()` removes what it built."""

    base: Path               # this cluster's files on the host (MLflow store, logs)
    x: int = 0
    marker: str = ""
    token: str = field(default_factory=lambda: secrets.token_hex(32))
    ray_port: int = 0
    head_temp: Path | None = None
    workers: list[Worker] = field(default_factory=list)
    mlflow: Service | None = None
    s3: Service | None = None

    @property
    def head_ip(self) -> str:
        return f"10.231.{self.x}.1"

    @property
    def bridge(self) -> str:
        return f"dipc{self.x}b"

    @property
    def address(self) -> str:
        return f"{self.head_ip}:{self.ray_port}"

    @property
    def tracking_uri(self) -> str:
        return self.mlflow.url.removesuffix("/health")

    @property
    def s3_endpoint(self) -> str:
        return self.s3.url

    def storage(self, prefix: str) -> str:
        return f"s3://{BUCKET}/{prefix}"

    def env(self, **extra: str) -> dict[str, str]:
        """What every node and the driver need: Ray's token, the S3 endpoint and keys."""
        e = {"DIPC_CLUSTER": self.marker, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token,
             **AWS_KEYS, "AWS_ENDPOINT_URL": self.s3_endpoint if self.s3 else "", **extra}
        return env(**e)

    # --- building it ---

    @classmethod
    def up(cls, base: Path, n_workers: int = 2) -> "Cluster":
        c = cls(base=base)
        try:
            c.x = _claim_subnet()
            c.marker = f"dipc{c.x}-{secrets.token_hex(4)}"
            c._network(n_workers)
            c._services()  # launched first: they start while Ray does
            c._head()
            workers = [c._spawn_worker(w) for w in c.workers]
            c.s3.wait()
            c.s3_client().create_bucket(Bucket=BUCKET)
            c._join_workers(workers)
            c.mlflow.wait()
            c.wait_nodes(1 + n_workers)
        except BaseException:
            c.down()
            raise
        return c

    def _network(self, n: int) -> None:
        sh("ip", "addr", "add", f"{self.head_ip}/24", "dev", self.bridge)
        sh("ip", "link", "set", self.bridge, "up")
        for i in range(1, n + 1):
            w = Worker(i, f"dipc{self.x}w{i}", f"10.231.{self.x}.{10 + i}", f"dipc{self.x}w{i}h")
            self.workers.append(w)
            inner = f"dipc{self.x}w{i}n"
            sh("ip", "netns", "add", w.ns)
            sh("ip", "link", "add", w.host_link, "type", "veth", "peer", "name", inner)
            sh("ip", "link", "set", inner, "netns", w.ns)
            sh("ip", "link", "set", w.host_link, "master", self.bridge, "up")
            for cmd in (["addr", "add", f"{w.ip}/24", "dev", inner], ["link", "set", inner, "up"],
                        ["link", "set", "lo", "up"]):
                sh("ip", "netns", "exec", w.ns, "ip", *cmd)

    def _services(self) -> None:
        """Launch the S3 server and the MLflow server, both on the head's bridge address only."""
        self.base.mkdir(parents=True, exist_ok=True)
        port = free_port(self.head_ip)
        self.s3 = Service("s3", [MOTO, "-H", self.head_ip, "-p", str(port)],
                          f"http://{self.head_ip}:{port}", self.base / "moto.log",
                          env(DIPC_CLUSTER=self.marker))
        self.s3.launch()
        port = free_port(self.head_ip)
        # No --allowed-hosts: the trials send Host: 10.231.X.1:PORT, a private address that
        # MLflow 3's host check accepts by default (a DNS name would need --allowed-hosts).
        self.mlflow = Service("mlflow", [
            sys.executable, "-m", "mlflow", "server", "--host", self.head_ip, "--port", str(port),
            "--backend-store-uri", f"sqlite:///{self.base}/mlflow.db", "--serve-artifacts",
            "--artifacts-destination", str(self.base / "mlflow-artifacts"), "--workers", "1"],
            f"http://{self.head_ip}:{port}/health", self.base / "mlflow.log",
            env(DIPC_CLUSTER=self.marker, **SERVER_ENV))
        self.mlflow.launch()

    def _head(self) -> None:
        """The Ray head on the bridge address, every port of its own (others run Ray here)."""
        self.head_temp = Path(f"/tmp/{self.marker}")  # short: Ray's socket paths must fit 107 chars
        self.ray_port = free_port(self.head_ip)
        names = ("node-manager-port", "object-manager-port", "ray-client-server-port",
                 "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                 "runtime-env-agent-port", "metrics-export-port")
        ports = {f"--{k}": str(p) for k, p in zip(names, free_ports(len(names)), strict=True)}
        args = [RAY, "start", "--head", f"--node-ip-address={self.head_ip}",
                f"--port={self.ray_port}", "--num-cpus=0", "--include-dashboard=false",
                f"--temp-dir={self.head_temp}", "--disable-usage-stats",
                *[f"{k}={v}" for k, v in ports.items()]]
        r = subprocess.run(args, capture_output=True, text=True, env=self.env(), timeout=180)
        if r.returncode:
            raise RuntimeError(f"ray head did not start: {r.stderr[-2000:]}")

    def start_worker(self, w: Worker) -> None:
        self._join_workers([self._spawn_worker(w)])

    def _spawn_worker(self, w: Worker) -> tuple[Worker, subprocess.Popen]:
        """`ray start` inside the worker's netns and a fresh mount namespace: a private tmpfs
        holds Ray's temp dir, TMPDIR, HOME and the working folder, and another one hides the
        tests' temp folder, where the driver's study roots are. (Not all of /tmp: the project
        and its .venv may live there, as in a clone under /tmp.)"""
        temp = f"/tmp/dipc{self.x}w{w.index}"
        os.makedirs(temp, exist_ok=True)  # the mount point; empty on the host
        hide = self.base.parent
        script = (f'mount -t tmpfs -o size=16m tmpfs {hide} && mount -t tmpfs -o size=2g tmpfs {temp} && '
                  f'mkdir -p "$HOME" {temp}/work {temp}/tmp && cd {temp}/work && exec "$0" "$@"')
        args = [RAY, "start", f"--address={self.address}", f"--node-ip-address={w.ip}",
                "--num-cpus=1", f"--temp-dir={temp}/ray", "--disable-usage-stats"]
        return w, subprocess.Popen(
            ["ip", "netns", "exec", w.ns, "unshare", "--mount", "--propagation", "private", "sh",
             "-c", script, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=self.env(HOME=f"{temp}/home", TMPDIR=f"{temp}/tmp"))

    @staticmethod
    def _join_workers(started: list[tuple[Worker, subprocess.Popen]]) -> None:
        for w, proc in started:
            _, err = proc.communicate(timeout=180)
            if proc.returncode:
                raise RuntimeError(f"worker {w.ns} did not start: {err[-2000:]}")

    def restart_worker(self, w: Worker) -> None:
        w.kill_all()
        self.start_worker(w)
        self.wait_nodes(1 + len(self.workers))

    # --- looking at it ---

    def nodes(self) -> list[dict]:
        """Ray's own view: [{"id", "ip", "alive"}], from a short driver on the host."""
        code = ("import json, ray; ray.init(address=%r, logging_level='ERROR'); "
                "print(json.dumps([{'id': n['NodeID'], 'ip': n['NodeManagerAddress'], "
                "'alive': n['Alive']} for n in ray.nodes()]))" % self.address)
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env=self.env(), timeout=120, cwd="/")
        if r.returncode:
            raise RuntimeError(f"cannot list the nodes: {r.stderr[-2000:]}")
        return json.loads(r.stdout.strip().splitlines()[-1])

    def wait_nodes(self, n: int, timeout: float = 120) -> list[dict]:
        deadline = time.time() + timeout
        while True:
            alive = [d for d in self.nodes() if d["alive"]]
            if len(alive) == n:
                return alive
            if time.time() > deadline:
                raise RuntimeError(f"{len(alive)} of {n} Ray nodes alive: {alive}")
            time.sleep(2)

    def node_ips(self) -> dict[str, str]:
        return {d["id"]: d["ip"] for d in self.nodes()}

    def s3_client(self):  # noqa: ANN201 - boto3's client has no importable type
        import boto3

        return boto3.client("s3", endpoint_url=self.s3_endpoint, **{
            "aws_access_key_id": AWS_KEYS["AWS_ACCESS_KEY_ID"],
            "aws_secret_access_key": AWS_KEYS["AWS_SECRET_ACCESS_KEY"],
            "region_name": AWS_KEYS["AWS_DEFAULT_REGION"]})

    def s3_keys(self, prefix: str) -> list[str]:
        pages = self.s3_client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        return [o["Key"] for p in pages for o in p.get("Contents", [])]

    # --- the driver ---

    def study_flags(self, name: str) -> list[str]:
        return ["--address", self.address, "--tracking-uri", self.tracking_uri,
                "--storage", self.storage(name)]

    def cli(self, *args: str, timeout: float = 600, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(ROOT / "run_study.py"), *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=timeout, env=self.env(**extra))

    def driver(self, log: Path, *args: str, **extra: str) -> subprocess.Popen:
        """run_study.py in the background, its output in `log` (for tests that kill it)."""
        with open(log, "w") as out:
            return subprocess.Popen([sys.executable, str(ROOT / "run_study.py"), *args], cwd=ROOT,
                                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=self.env(**extra), start_new_session=True)

    # --- tearing it down ---

    def marked_pids(self) -> list[int]:
        return marked_pids("DIPC_CLUSTER", self.marker)

    def down(self) -> None:
        for w in self.workers:
            if Path(f"/var/run/netns/{w.ns}").exists():
                w.kill_all()
                sh("ip", "netns", "del", w.ns, check=False)
            sh("ip", "link", "del", w.host_link, check=False)  # gone with its peer, normally
            shutil.rmtree(f"/tmp/dipc{self.x}w{w.index}", ignore_errors=True)  # its empty mount point
        for s in (self.mlflow, self.s3):
            if s is not None:
                s.stop()
        if self.marker:  # the head's processes, and anything else of ours still running
            kill_until_gone(self.marked_pids)
        if self.x:
            sh("ip", "link", "del", self.bridge, check=False)
        if self.head_temp is not None:
            shutil.rmtree(self.head_temp, ignore_errors=True)
