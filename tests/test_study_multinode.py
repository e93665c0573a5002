"""A study on a real multi-node Ray cluster: a head and a worker started with `ray start`
on this machine, joined with --address; trials must land on both nodes."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from studyutil import TINY, check_study, cli, env, free_port

pytestmark = pytest.mark.slow
RAY = str(Path(sys.executable).with_name("ray"))
# `ray start` enables token authentication in Ray 2.60; the nodes and the driver on this
# machine share ~/.ray/auth_token when the mode is set.
AUTH = {"RAY_AUTH_MODE": "token"}


@pytest.fixture(scope="module")
def cluster():
    port = free_port()
    e = env(**AUTH)
    common = ["--num-cpus", "1", "--disable-usage-stats"]
    subprocess.run([RAY, "start", "--head", f"--port={port}", "--include-dashboard=false", *common],
                   check=True, env=e, capture_output=True, timeout=180)
    try:
        subprocess.run([RAY, "start", f"--address=127.0.0.1:{port}", *common],
                       check=True, env=e, capture_output=True, timeout=180)
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([RAY, "stop", "--force"], env=e, capture_output=True, timeout=120)


def test_study_spreads_over_two_nodes(cluster, tmp_path):
    r = cli("run", "--name", "mn", "--root", str(tmp_path), "--num-samples", "4",
            "--address", cluster, "--scheduler", "fifo", *TINY, **AUTH)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    _, children = check_study(f"sqlite:///{tmp_path}/mlflow.db", "mn", n=4)
    nodes = {c.data.tags["dip.node_id"] for c in children}
    assert len(nodes) == 2, f"trials ran on {len(nodes)} node(s)"


def test_unreachable_cluster_is_refused(tmp_path):
    port = free_port()
    r = cli("run", "--name", "x", "--root", str(tmp_path), "--address", f"127.0.0.1:{port}", *TINY)
    assert r.returncode == 2 and "cannot reach the Ray cluster" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "x").exists()
