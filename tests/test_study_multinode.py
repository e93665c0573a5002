"""A study on a real multi-node Ray cluster: a head and a worker started with `ray start`
on this machine (loopback, one disk), joined with --address; trials must land on both
nodes. A node-local storage on several nodes is refused; --shared-storage says the path is
one every node reads (true here, as on an NFS mount). The cluster has its own ports and
temp dir, and is torn down by a marker in its processes' environment, never `ray stop`."""
from __future__ import annotations

import pytest

from faults import HOOK
from studyutil import AUTH, TINY, check_study, cli, free_port, own_ray, ray_start

pytestmark = pytest.mark.slow


def _start(marker: str, temp: str, *args: str) -> None:
    ray_start(marker, temp, "--num-cpus", "1", *args)


@pytest.fixture(scope="module")
def cluster():
    with own_ray("dipmn") as (marker, temp, port):
        _start(marker, temp, "--head", f"--port={port}", "--include-dashboard=false")
        _start(marker, temp, f"--address=127.0.0.1:{port}")
        yield f"127.0.0.1:{port}"


def test_node_local_storage_is_refused_on_several_nodes(cluster, tmp_path):
    r = cli("run", "--name", "loc", "--root", str(tmp_path), "--address", cluster, *TINY, **AUTH)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert "the Ray cluster has 2 nodes" in r.stderr and "--storage s3://" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "loc").exists()


def test_image_on_the_drivers_disk_is_refused_on_several_nodes(cluster, tmp_path):
    from PIL import Image

    Image.new("RGB", (32, 32)).save(tmp_path / "mine.png")
    r = cli("run", "--name", "img", "--root", str(tmp_path), "--address", cluster, "--storage",
            "s3://bucket/prefix", "--image", str(tmp_path / "mine.png"), *TINY, **AUTH)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert f"image '{tmp_path / 'mine.png'}' is a file on this node" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "img").exists()


def test_study_spreads_over_two_nodes(cluster, tmp_path):
    # The first two trials wait for each other at their first report: two trials at once,
    # each holding its node's only CPU, whatever the machine's speed.
    faults = tmp_path / "faults"
    faults.mkdir()
    r = cli("run", "--name", "mn", "--root", str(tmp_path), "--num-samples", "4", "--shared-storage",
            "--address", cluster, "--scheduler", "fifo", *TINY, **AUTH, **HOOK,
            DIP_FAULT_BARRIER="2", DIP_FAULT_DIR=str(faults))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    _, children = check_study(f"sqlite:///{tmp_path}/mlflow.db", "mn", n=4)
    nodes = {c.data.tags["dip.node_id"] for c in children}
    assert len(nodes) == 2, f"trials ran on {len(nodes)} node(s)"


def test_unreachable_cluster_is_refused(tmp_path):
    port = free_port()
    r = cli("run", "--name", "x", "--root", str(tmp_path), "--address", f"127.0.0.1:{port}", *TINY)
    assert r.returncode == 2 and "cannot reach the Ray cluster" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "x").exists()
