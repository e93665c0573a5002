"""Tests of cluster.yaml: Ray's own validator accepts it, the way `ray up` checks it before
contacting AWS, and it holds what a DIP study on GPU workers needs. No network, no cloud."""

import argparse
import copy
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.providers import _NODE_PROVIDERS
from ray.autoscaler._private.util import prepare_config, validate_config

from study.cli.common import build_study
from study.cli.main import make_parser

ROOT = Path(__file__).resolve().parent.parent
CLUSTER_YAML = ROOT / "cluster.yaml"
DOC = ROOT / "docs" / "cluster.md"
REMOTE_PROJECT = "~/dip-study"
# What the launch comment's shell variables stand for on the head (set by head_setup_commands).
SHELL_VARS = {"DIP_TRACKING_URI": "http://10.0.0.1:5000"}
GPU_INSTANCE_FAMILIES = ("g4dn", "g5", "g6", "g6e", "p3", "p4d", "p4de", "p5")


def load_raw() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def as_ray_up(raw: dict) -> dict:
    """What `ray up` does to the file before AWS (commands.create_or_update_cluster, then
    _bootstrap_config): a known provider, prepare_config (defaults.yaml merged, setup
    commands merged per role, docker checked, per-type worker bounds), validate_config
    (ray-schema.json and the node-type rules). Left out, as they call AWS: the EC2 resource
    auto-detection (ray up only warns when it fails) and the provider's bootstrap_config."""
    if raw["provider"]["type"] not in _NODE_PROVIDERS:
        raise ValueError(f"unknown provider type {raw['provider']['type']!r}")
    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    return config


@pytest.fixture(scope="module")
def config() -> dict:
    return as_ray_up(load_raw())


def worker_types(config: dict) -> dict:
    return {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}


def is_gpu_type(node_type: dict) -> bool:
    family = node_type["node_config"].get("InstanceType", "").split(".")[0]
    return node_type["resources"].get("GPU", 0) >= 1 or family in GPU_INSTANCE_FAMILIES


# --- Ray's validator ---

def test_ray_validator_accepts_the_file(config):
    assert config["cluster_name"] == "dip-study"
    assert config["provider"]["type"] == "aws" and config["provider"]["region"] == "us-west-2"
    assert config["auth"]["ssh_user"] == "ubuntu"


@pytest.mark.parametrize("break_it, error", [
    (lambda c: c.update(max_worker=c.pop("max_workers")), jsonschema.ValidationError),
    (lambda c: c.update(setup_command=c.pop("setup_commands")), jsonschema.ValidationError),
    (lambda c: c.update(max_workers="eight"), jsonschema.ValidationError),
    (lambda c: c["available_node_types"]["ray.worker.gpu"]["resources"].update(GPU=0.5),
     jsonschema.ValidationError),
    (lambda c: c["available_node_types"]["ray.worker.gpu"].update(min_worker=1),
     jsonschema.ValidationError),
    (lambda c: c.update(head_node_type="ray.head.gpu"), ValueError),
    (lambda c: c["available_node_types"]["ray.worker.gpu"].update(min_workers=99), ValueError),
], ids=["misspelled-top-level-key", "misspelled-commands-key", "max_workers-not-int",
        "fractional-gpu-resource", "misspelled-node-type-key", "unknown-head-type",
        "min-workers-over-max"])
def test_ray_validator_rejects_a_broken_copy(break_it, error):
    raw = load_raw()
    break_it(raw)
    with pytest.raises(error):
        as_ray_up(raw)


# --- the nodes ---

def test_head_has_no_gpu_so_trials_never_land_there(config):
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("GPU") == 0
    assert head["resources"].get("CPU", 0) >= 1  # the Tune driver and MLflow run there
    assert head["max_workers"] == 0


def test_a_gpu_worker_type_is_up_when_the_study_starts(config):
    gpu = {k: v for k, v in worker_types(config).items() if is_gpu_type(v)}
    assert gpu, "no worker type has a GPU"
    assert any(t["min_workers"] >= 1 for t in gpu.values())
    for name, t in gpu.items():
        assert t["min_workers"] <= t["max_workers"] <= config["max_workers"], name


def test_every_node_names_the_same_ami(config):
    images = {t["node_config"].get("ImageId") for t in config["available_node_types"].values()}
    assert len(images) == 1 and None not in images  # one AMI, set explicitly (Ray's default is old)


# --- the project and its setup ---

def test_the_project_is_mounted_without_local_state(config):
    local = config["file_mounts"].get(REMOTE_PROJECT)
    assert local is not None, f"file_mounts must copy the project to {REMOTE_PROJECT}"
    project = (ROOT / local).resolve()  # `ray up` runs in the project root
    assert project == ROOT
    for needed in ("run_study.py", "requirements.txt", "study", "models", "noise"):
        assert (project / needed).exists(), needed
    assert ".gitignore" in config["rsync_filter"]  # keeps .venv/ and studies/ off the nodes
    assert ".venv/" in (ROOT / ".gitignore").read_text().split()


def _ray_pin(text: str) -> str:
    m = re.search(r"ray\[[\w,]+\]==([\w.]+)", text)
    assert m, f"no pinned ray in {text!r}"
    return m.group(1)


def test_every_node_installs_the_requirements(config):
    install = [c for c in config["setup_commands"] if f"-r {REMOTE_PROJECT}/requirements.txt" in c]
    assert install, "setup_commands must install requirements.txt"
    for role in ("head_setup_commands", "worker_setup_commands"):  # merged by prepare_config
        assert install[0] in config[role], role
    assert _ray_pin(install[0]) == _ray_pin((ROOT / "requirements.txt").read_text())


def test_head_can_launch_workers(config):
    assert any("boto3" in c for c in config["head_setup_commands"])
    start = " ".join(config["head_start_ray_commands"])
    assert "ray start --head" in start
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in start
    assert "$RAY_HEAD_IP:6379" in " ".join(config["worker_start_ray_commands"])


PRIVATE_IP = "$(hostname -I | cut -d' ' -f1)"  # the head's private address, as setup writes it


def test_mlflow_server_runs_on_the_head_only(config):
    head = " ".join(config["head_start_ray_commands"])
    assert "mlflow server" in head
    assert f"--host {PRIVATE_IP}" in head and "--port 5000" in head
    assert "--backend-store-uri sqlite:////" in head  # four slashes: an absolute path
    workers = " ".join(config["worker_setup_commands"] + config["worker_start_ray_commands"])
    assert "mlflow" not in workers


def test_no_ui_listens_on_every_interface(config):
    """MLflow on the private address the workers use (a Host header MLflow 3 accepts without
    --allowed-hosts), the dashboard and job API on localhost (`ray dashboard` tunnels there)."""
    head = " ".join(config["head_start_ray_commands"])
    assert "0.0.0.0" not in head
    assert "--dashboard-host=127.0.0.1" in head
    assert "--allowed-hosts" not in head  # it would replace MLflow's default list
    uri = [c for c in config["head_setup_commands"] if "export DIP_TRACKING_URI=" in c]
    assert uri and f"http://{PRIVATE_IP}:5000" in uri[0]  # the address MLflow binds


def test_token_auth_is_shared_with_the_workers(config):
    assert any("get-auth-token --generate" in c for c in config["head_setup_commands"])
    assert "~/.ray/auth_token" in config["cluster_synced_files"]
    for role in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in config[role] if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token" in c for c in starts), role


# --- the commands in the comments and in docs/cluster.md ---

def launch_commands(text: str) -> list[str]:
    """The `python run_study.py ...` command lines in a text, continuation lines joined."""
    joined = re.sub(r"\\\n", " ", text)
    return re.findall(r"python\s+run_study\.py\s+([^'\n]+)", joined)


def yaml_comments() -> str:
    lines = CLUSTER_YAML.read_text().splitlines()
    return "\n".join(line.strip()[1:].strip() for line in lines if line.strip().startswith("#"))


def documented_commands() -> list[str]:
    return launch_commands(yaml_comments()) + launch_commands(DOC.read_text())


def command_params() -> list:
    sources = {"cluster.yaml": yaml_comments(), "docs": DOC.read_text()}
    return [pytest.param(c, id=f"{where}-{c.split()[0]}-{i}")
            for where, text in sources.items() for i, c in enumerate(launch_commands(text))]


def check_command(args: str) -> object:
    """Parse one command as run_study.py would; every flag must exist. Returns the namespace
    (for `submit run|resume|extend ...`, the namespace of the study command it carries)."""
    args = re.sub(r"\$(\w+)", lambda m: SHELL_VARS[m.group(1)], args)
    return _check_argv(shlex.split(args, comments=True))


def _check_argv(argv: list[str]) -> object:
    parser = make_parser()
    sub = next(a for a in parser._actions if hasattr(a, "choices") and isinstance(a.choices, dict))
    if argv[0] not in sub.choices:
        raise ValueError(f"run_study.py has no command {argv[0]!r}")
    command = sub.choices[argv[0]]
    # A command that carries another (submit: argparse.REMAINDER) checks its own flags up to
    # the carried command's name, then the carried command as a command of its own.
    carried = any(a.nargs == argparse.REMAINDER for a in command._actions)
    inner = next((i for i, a in enumerate(argv[1:], 1) if a in sub.choices), None) if carried else None
    own = argv[:inner] if inner else argv
    unknown = [a.split("=")[0] for a in own if a.startswith("--")
               and a.split("=")[0] not in command._option_string_actions]
    if unknown:
        raise ValueError(f"run_study.py {argv[0]} has no flag {', '.join(unknown)}")
    return _check_argv(argv[inner:]) if inner else parser.parse_args(argv)


@pytest.mark.parametrize("text", [yaml_comments, lambda: DOC.read_text()], ids=["cluster.yaml", "docs"])
def test_the_study_commands_are_documented(text):
    assert {c.split()[0] for c in launch_commands(text())} >= {"run", "resume", "export"}


@pytest.mark.parametrize("args", command_params())
def test_every_launch_command_parses(args):
    ns = check_command(args)
    submitted = args.split()[0] == "submit"  # submit adds --address auto itself
    if ns.command == "run":
        study = build_study(ns)  # the values pass TrialConfig / StudyConfig validation too
        assert study.address == "auto" or (submitted and not study.address)
        assert study.storage.startswith("s3://")  # shared by every node
        assert study.gpus_per_trial > 0
        assert study.max_failures >= 1  # a trial on a lost node is retried


def test_the_tracking_uri_reaches_the_head_from_the_workers(config):
    runs = [c for c in documented_commands() if c.startswith("run ")]
    assert runs
    for run in runs:
        uri = re.search(r"--tracking-uri\s+(\S+)", run).group(1)
        assert "localhost" not in uri and "127.0.0.1" not in uri  # trials log from the workers
        var = uri.lstrip("$")
        assert any(f"export {var}=" in c and ":5000" in c for c in config["head_setup_commands"])


def test_the_bucket_policy_covers_the_study_storage():
    """The worker role's policy in docs/cluster.md: valid JSON, the prefix of --storage."""
    block = re.search(r"```json\n(.*?)```", DOC.read_text(), re.S)
    assert block, "docs/cluster.md has no IAM policy"
    policy = json.loads(block.group(1))
    storages = {build_study(check_command(c)).storage for c in documented_commands() if c.startswith("run ")}
    assert storages == {"s3://YOUR-BUCKET/ray"}
    resources = {s["Resource"] for s in policy["Statement"]}
    assert resources == {"arn:aws:s3:::YOUR-BUCKET", "arn:aws:s3:::YOUR-BUCKET/ray/*"}
    actions = {a for s in policy["Statement"] for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])}
    assert "s3:PutObject" in actions and not any(a.endswith("*") for a in actions)  # no wildcards


def test_a_misspelled_flag_fails_the_check():
    with pytest.raises(ValueError, match="--num-sample"):
        check_command("run --name big --num-sample 64")
