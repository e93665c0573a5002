"""How a study joins Ray (study/cluster/runtime.py `connect`): a Ray it starts itself runs
without a runtime env (every worker is on this machine and imports the project from the
driver's path), one it joins gets the project as its working_dir (its nodes may be other
machines). Both in a PID namespace and a Ray temp folder of their own, so no other Ray on
the machine is found, and everything started there ends with the namespace."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile

import pytest

from studyutil import ROOT, env, free_ports

PROBE = """
import json, sys
sys.path.insert(0, sys.argv[1])  # the project, as a notebook elsewhere might find it
import ray
from study.cluster import runtime
runtime.connect("")

@ray.remote(num_cpus=1)
class Probe:
    def where(self):
        import os, study.cluster.trainable as t
        return {"module": t.__file__, "cwd": os.getcwd()}

print("PROBE " + json.dumps({"runtime_env": dict(ray.get_runtime_context().runtime_env),
                             **ray.get(Probe.remote().where.remote())}))
ray.shutdown()
"""

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"),
                                reason="needs root and unshare: a PID namespace hides the machine's other Rays")


def _probe(tmp_path, before: str = "", address: str = "", cwd=ROOT) -> dict:
    """The probe as a driver run from `cwd` (the project: as `python run_study.py` is), after
    `before` in the same PID namespace, with RAY_ADDRESS=`address` if given."""
    raytmp = tempfile.mkdtemp(prefix="dipr", dir="/tmp")  # short: Ray's socket paths are capped at 107 bytes
    isolated = {k: v for k, v in env(RAY_TMPDIR=raytmp, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16)).items()
                if k not in ("RAY_ADDRESS", "PYTHONPATH")}
    (tmp_path / "probe.py").write_text(PROBE)
    driver = f"{'RAY_ADDRESS=' + address + ' ' if address else ''}{sys.executable} {tmp_path / 'probe.py'} {ROOT}"
    r = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "bash", "-c",
                        f"{before + ' && ' if before else ''}{driver}"],
                       cwd=cwd, capture_output=True, text=True, timeout=240, env=isolated)
    shutil.rmtree(raytmp, ignore_errors=True)
    lines = [line for line in r.stdout.splitlines() if line.startswith("PROBE ")]
    assert r.returncode == 0 and lines, r.stdout[-2000:] + r.stderr[-3000:]
    return json.loads(lines[0][len("PROBE "):])


def test_a_ray_the_study_starts_has_no_runtime_env_and_its_workers_import_the_project(tmp_path):
    got = _probe(tmp_path)
    assert got["runtime_env"] == {}, got
    assert got["module"] == str(ROOT / "study" / "cluster" / "trainable.py") and got["cwd"] == str(ROOT)


def test_a_driver_elsewhere_ships_the_project_to_the_ray_it_starts(tmp_path):
    """A driver that found the project by a sys.path entry of its own: Ray would not pass that
    entry to the workers, so the project travels as the working_dir."""
    got = _probe(tmp_path, cwd=tmp_path)
    assert got["runtime_env"].get("working_dir"), got
    assert str(ROOT) not in got["module"] and got["module"].endswith("study/cluster/trainable.py")


def test_a_ray_the_study_joins_gets_the_project_as_its_working_dir(tmp_path):
    port = free_ports(1)[0]
    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    got = _probe(tmp_path, before=f"{ray} start --head --port {port} --num-cpus 1 --include-dashboard false "
                                  "--disable-usage-stats >/dev/null", address=f"127.0.0.1:{port}")
    assert got["runtime_env"].get("working_dir"), got
    assert str(ROOT) not in got["module"] and got["module"].endswith("study/cluster/trainable.py")
