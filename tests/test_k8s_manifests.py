"""Tests of the Kubernetes manifests (k8s/): no Kubernetes here, so they are checked as YAML
with the fields KubeRay's ray.io/v1 RayJob requires (rayjob_types.go, raycluster_types.go),
the study entrypoint with run_study.py's own parser, and MLflow's --allowed-hosts against a
real `mlflow server` started with the Deployment's arguments."""
from __future__ import annotations

import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from study.cli.common import build_study
from studyutil import env, free_port
from test_cluster_yaml import check_command

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
# The fields of a core/v1 Container that the manifests may use (a misspelled key is
# silently dropped by a lenient apply).
CONTAINER_KEYS = {"name", "image", "command", "args", "workingDir", "ports", "env", "envFrom",
                  "resources", "volumeMounts", "readinessProbe", "livenessProbe", "startupProbe",
                  "securityContext", "lifecycle", "imagePullPolicy"}
POD_KEYS = {"containers", "volumes", "tolerations", "nodeSelector", "affinity",
            "serviceAccountName", "securityContext", "initContainers", "imagePullSecrets"}


def docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def one(name: str, kind: str) -> dict:
    found = [d for d in docs(name) if d["kind"] == kind]
    assert len(found) == 1, f"{name}: {len(found)} {kind}"
    return found[0]


def pin(package: str) -> str:
    m = re.search(rf"^{re.escape(package)}(\[[\w,]+\])?==([\w.]+)", (ROOT / "requirements.txt").read_text(), re.M)
    assert m, package
    return m.group(2)


@pytest.fixture(scope="module")
def job() -> dict:
    return one("rayjob.yaml", "RayJob")


@pytest.fixture(scope="module")
def mlflow_args() -> list[str]:
    return one("mlflow.yaml", "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]


def groups(job: dict) -> list[tuple[str, dict]]:
    spec = job["spec"]["rayClusterSpec"]
    return [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]


def check_pod(where: str, template: dict, volumes_known: set[str]) -> None:
    pod = template["spec"]
    assert set(pod) <= POD_KEYS, f"{where}: unknown pod keys {set(pod) - POD_KEYS}"
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for c in pod["containers"]:
        assert c["name"] and c["image"], where
        assert set(c) <= CONTAINER_KEYS, f"{where}: unknown container keys {set(c) - CONTAINER_KEYS}"
        for m in c.get("volumeMounts", []):
            assert m["name"] in volumes, f"{where}: mount {m['name']} has no volume"
    for v in volumes.values():
        claim = v.get("persistentVolumeClaim", {}).get("claimName")
        assert claim is None or claim in volumes_known, f"{where}: no PVC {claim}"


def pvcs() -> set[str]:
    return {d["metadata"]["name"] for f in ("rayjob.yaml", "mlflow.yaml") for d in docs(f)
            if d["kind"] == "PersistentVolumeClaim"}


# --- the RayJob ---

def test_rayjob_has_what_kuberay_requires(job):
    assert job["apiVersion"] == "ray.io/v1" and job["metadata"]["name"]
    spec = job["spec"]
    assert isinstance(spec["entrypoint"], str) and spec["entrypoint"].strip()
    # KubeRay refuses a TTL without shutdownAfterJobFinishes.
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] >= 0
    for name, g in groups(job):
        assert isinstance(g["rayStartParams"], dict), name  # required before KubeRay 1.4
        assert all(isinstance(v, str) for v in g["rayStartParams"].values()), f"{name}: map[string]string"
        check_pod(name, g["template"], pvcs())
    for _, g in groups(job)[1:]:
        assert g["groupName"] and 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]


def test_head_container_serves_gcs_and_dashboard(job):
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]
    assert head["rayStartParams"].get("num-gpus") == "0"  # no trial on the head
    ports = {p["name"]: p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert ports["gcs-server"] == 6379 and ports["dashboard"] == 8265  # the submitter uses 8265


def test_gpu_workers_request_gpus(job):
    workers = groups(job)[1:]
    assert workers
    for name, g in workers:
        res = g["template"]["spec"]["containers"][0]["resources"]
        assert int(res["limits"]["nvidia.com/gpu"]) >= 1, name
        # Extended resources cannot be overcommitted: a request must equal the limit.
        assert res["requests"].get("nvidia.com/gpu", res["limits"]["nvidia.com/gpu"]) == res["limits"]["nvidia.com/gpu"]


def test_ray_version_token_auth_and_image_match_the_project(job):
    spec = job["spec"]["rayClusterSpec"]
    assert spec["rayVersion"] == pin("ray")
    assert spec["authOptions"]["mode"] == "token"
    images = {c["image"] for _, g in groups(job) for c in g["template"]["spec"]["containers"]}
    assert len(images) == 1, images  # driver and trials run the same code
    dockerfile = (K8S / "Dockerfile").read_text()
    base = re.search(r"^FROM\s+rayproject/ray:([\w.]+)-py(\d)(\d+)", dockerfile, re.M)
    assert base and base.group(1) == pin("ray") and base.group(2, 3) == ("3", "11")
    for src in re.findall(r"^COPY\s+(?:--\S+\s+)*(\S+)", dockerfile, re.M):
        assert (ROOT / src).exists(), f"k8s/Dockerfile copies {src}, which is not in the project"
    workdir = re.search(r"^WORKDIR\s+(\S+)", dockerfile, re.M).group(1)
    assert job["spec"]["entrypoint"].startswith(f"cd {workdir} && ")


def entrypoint_study(job: dict):
    m = re.search(r"python\s+run_study\.py\s+(.+)$", job["spec"]["entrypoint"], re.S)
    assert m, "the entrypoint does not run run_study.py"
    return check_command(m.group(1))


def test_entrypoint_parses_with_the_study_cli(job):
    ns = entrypoint_study(job)
    assert ns.command == "run"
    study = build_study(ns)  # TrialConfig / StudyConfig validation too
    assert study.address == "auto"
    assert study.storage.startswith("s3://")  # pods share no disk
    assert study.gpus_per_trial >= 1
    assert study.root == "/studies"
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "/studies" in {m["mountPath"] for m in head["volumeMounts"]}  # study.json survives


def test_entrypoint_flag_check_catches_a_typo(job):
    broken = dict(job["spec"], entrypoint=job["spec"]["entrypoint"].replace("--num-samples", "--num-sample"))
    with pytest.raises(ValueError, match="--num-sample"):
        entrypoint_study({"spec": broken})


# --- MLflow ---

def test_mlflow_deployment_and_service_match():
    dep, svc = one("mlflow.yaml", "Deployment"), one("mlflow.yaml", "Service")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["apiVersion"] == "apps/v1" and dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert svc["spec"]["selector"].items() <= labels.items()
    assert svc["spec"]["type"] == "ClusterIP"  # never open to the internet
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"  # SQLite
    container = dep["spec"]["template"]["spec"]["containers"][0]
    assert container["image"].endswith(f":v{pin('mlflow')}")
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert svc["spec"]["ports"][0]["targetPort"] in named
    check_pod("mlflow", dep["spec"]["template"], pvcs())


def allowed_hosts(args: list[str]) -> list[str]:
    value = next(a.split("=", 1)[1] for a in args if a.startswith("--allowed-hosts="))
    return value.split(",")


def test_the_trials_tracking_host_is_allowed(job, mlflow_args):
    uri = entrypoint_study(job).tracking_uri
    host = uri.split("://", 1)[1].rstrip("/")
    svc = one("mlflow.yaml", "Service")
    assert host == f"{svc['metadata']['name']}:{svc['spec']['ports'][0]['port']}"
    assert host in allowed_hosts(mlflow_args)
    assert svc["metadata"]["namespace"] == job["metadata"]["namespace"]  # the short name resolves


def http_status(url: str, host: str) -> int:
    req = urllib.request.Request(url, headers={"Host": host})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.mark.slow
def test_mlflow_server_with_the_deployments_args_answers_the_right_hosts(mlflow_args, tmp_path):
    """The Deployment's own arguments, paths moved under tmp_path and the port made free: a
    Host the trials or a port-forward send is served, any other is refused (403)."""
    port = free_port()
    args = []
    for a in mlflow_args:
        a = a.replace("/mlflow/", f"{tmp_path}/")
        a = "--host=127.0.0.1" if a.startswith("--host=") else a
        args.append(f"--port={port}" if a.startswith("--port=") else a)
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", *args], stdout=log,
                            stderr=subprocess.STDOUT, env=env(), start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(360):
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(url + "/health", timeout=2).close()
                break
            except OSError:
                subprocess.run(["sleep", "0.5"])
        api = url + "/api/2.0/mlflow/experiments/search?max_results=1"
        for host in allowed_hosts(mlflow_args):
            assert http_status(api, host) == 200, host
        assert http_status(api, "attacker.example:5000") == 403
        assert http_status(url + "/health", "10.0.0.7:5000") == 200  # the kubelet's probe
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
