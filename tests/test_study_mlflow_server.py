"""A study against a real `mlflow server` on 127.0.0.1 (HTTP tracking, proxied artifacts),
checked through the server's REST API."""
from __future__ import annotations

import json
import urllib.request

import pytest

from studyutil import TINY, MlflowServer, check_study, cli, free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("mlflow")
    srv = MlflowServer(d).start()
    yield srv.url, d
    srv.stop()


def _rest(url: str, path: str, body: dict) -> dict:
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def test_study_on_mlflow_server(server, tmp_path):
    url, d = server
    # Ranked by where ES-WMV stops (no clean image in the choice); its export replays.
    r = cli("run", "--name", "srv", "--root", str(tmp_path), "--num-samples", "3", "--metric",
            "psnr_autostop", "--window", "10", "--patience", "10", "--tracking-uri", url,
            "--max-concurrent", "2", *TINY)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert not (tmp_path / "mlflow.db").exists()  # nothing went to the local store
    check_study(url, "srv", n=3)
    found = _rest(url, "/api/2.0/mlflow/runs/search", {"experiment_ids": [_exp_id(url, "srv")],
                                                          "max_results": 100})
    statuses = sorted(run["info"]["status"] for run in found["runs"])
    assert statuses == ["FINISHED"] * 4
    assert any((d / "artifacts").rglob("*.png")), "images were not proxied to the server's store"
    e = cli("export", "srv", "--root", str(tmp_path), "--out", str(tmp_path / "best.json"))
    assert e.returncode == 0, e.stderr
    best = json.loads((tmp_path / "best.json").read_text())
    assert best["metric"] == "psnr_autostop"
    r = cli("train", "--config", str(tmp_path / "best.json"), "--out", str(tmp_path / "replay"), "--quiet")
    assert r.returncode == 0, r.stderr
    got = json.loads((tmp_path / "replay" / "result.json").read_text())
    assert got["psnr_autostop"] == pytest.approx(best["value"], abs=0.01)
    assert got["autostop_iteration"] == best["metrics"]["autostop_iteration"]


def _exp_id(url: str, name: str) -> str:
    with urllib.request.urlopen(f"{url}/api/2.0/mlflow/experiments/get-by-name?experiment_name={name}", timeout=30) as r:
        return json.loads(r.read())["experiment"]["experiment_id"]


def test_unreachable_tracking_server_is_refused(tmp_path):
    port = free_port()  # nothing listens there
    r = cli("run", "--name", "x", "--root", str(tmp_path), "--tracking-uri", f"http://127.0.0.1:{port}", *TINY)
    assert r.returncode == 2
    assert f"cannot reach the MLflow tracking server 'http://127.0.0.1:{port}'" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "x").exists()
