"""Bad study arguments: one clear sentence, exit 2, and nothing written."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

import run_study
from study.cli.main import make_parser
from studyutil import ROOT, TINY, cli, env

BASE = ["--num-samples", "2", *TINY]


def _run(capsys, root, *args):
    code = run_study.main(["run", "--name", "s", "--root", str(root), *args])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--image", "no_such_image"], "unknown image 'no_such_image'"),
    (["--num-samples", "-1"], "num_samples = -1 is out of range"),
    (["--num-samples", "0"], "num_samples = 0 is out of range"),
    (["--metric", "accuracy"], "unknown metric 'accuracy'; allowed: psnr_ema"),
    (["--scheduler", "hyperband"], "unknown scheduler 'hyperband'; allowed: asha, median, fifo"),
    (["--max-concurrent", "-2"], "max_concurrent = -2 is out of range"),
    (["--cpus-per-trial", "0"], "cpus_per_trial = 0.0 is out of range"),
    (["--gpus-per-trial", "-0.5"], "gpus_per_trial = -0.5 is out of range"),
    (["--image-every", "0"], "image_every = 0 is out of range"),
    (["--timestep", "1000"], "timestep = 1000 is out of range; allowed: [0, 999]"),
    (["--lr", "0"], "lr = 0.0 is out of range"),
    (["--noise-mode", "perlin"], "unknown noise_mode 'perlin'; allowed: uniform"),
    (["--task", "deblur"], "unknown task 'deblur'"),
    (["--size", "30"], "size = 30 is not divisible by 2**scales = 4"),
    (["--tracking-uri", "ftp://x"], "unsupported tracking URI 'ftp://x'"),
    (["--storage", "relative/dir"], "storage 'relative/dir' must be an absolute path"),
    (["--config", "/no/such.json"], "cannot read config file '/no/such.json'"),
    (["--space", "/no/such.yaml"], "cannot read space file '/no/such.yaml'"),
    (["--max-failures", "-1"], "max_failures = -1 is out of range; allowed: [0, 1000]"),
    (["--checkpoint-every", "-3"], "checkpoint_every = -3 is out of range"),
    (["--reduction-factor", "1"], "reduction_factor = 1 is out of range; allowed: [2, 100]"),
])
def test_bad_argument(capsys, tmp_path, args, message):
    code, err = _run(capsys, tmp_path / "root", *BASE, *args)
    assert code == 2
    assert message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "root").exists(), "a refused study must write nothing"


@pytest.mark.parametrize("name", ["", "a/b", "../up", ".hidden", "x" * 65, "sp ace"])
def test_bad_name(capsys, tmp_path, name):
    code = run_study.main(["run", "--name", name, "--root", str(tmp_path / "r"), *BASE])
    assert code == 2 and "study name" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_relative_root_is_the_current_folders(capsys, tmp_path, monkeypatch):
    """`--root studies` means ./studies, as `make run` has it (only submit wants it absolute)."""
    monkeypatch.chdir(tmp_path)
    code = run_study.main(["list", "--root", "studies"])
    assert code == 2 and f"no studies under '{tmp_path / 'studies'}'" in capsys.readouterr().err
    (tmp_path / "studies").mkdir()
    assert run_study.main(["list", "--root", "studies"]) == 0
    code = run_study.main(["status", "nope", "--root", "studies"])
    assert code == 2 and f"no study 'nope' under '{tmp_path / 'studies'}'" in capsys.readouterr().err


@pytest.mark.parametrize("root", ["/proc/dip-study", "{a file}/studies"])
def test_unwritable_root_is_refused(capsys, tmp_path, root):
    # Under a file of our own, not /etc/hostname: a container or a root user may lack it.
    (tmp_path / "file").write_text("")
    root = root.replace("{a file}", str(tmp_path / "file"))
    code, err = _run(capsys, root, *BASE)
    assert code == 2 and f"root '{root}' cannot be written" in err, err


@pytest.mark.parametrize("text, message", [
    ("noise_mode: [uniform, perlin]\n", "noise_mode = 'perlin' is not allowed"),
    ("timestep: {low: 0, high: 5000}\n", "timestep = 1000 is not allowed"),
    ("lr: {low: 0.1, high: 0.01}\n", "low = 0.1 is above high = 0.01"),
    ("lr: {low: 0, high: 0.1, log: true}\n", "a log range needs low > 0"),
    ("learning_rate: [0.1]\n", "unknown search-space parameter 'learning_rate'"),
    ("seed: [1, 2]\n", "unknown search-space parameter 'seed'"),
    ("noise_mode: []\n", "empty list of choices"),
    ("lr: [0.1\n", "is not valid YAML"),
    ("- just a list\n", "must be a non-empty mapping"),
    ("size: [32, 30]\n", "size = 30 is not allowed"),
    ("size: {low: 32, high: 64}\n", "size = 33 is not allowed"),
])
def test_bad_space_file(capsys, tmp_path, text, message):
    space = tmp_path / "space.yaml"
    space.write_text(text)
    code, err = _run(capsys, tmp_path / "root", *BASE, "--space", str(space))
    assert code == 2 and message in err, err
    assert not (tmp_path / "root").exists()


def test_existing_study_name_is_refused(capsys, tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "study.json").write_text("{}")
    code, err = _run(capsys, tmp_path, *BASE)
    assert code == 2 and "study 's' already exists" in err


def test_gpus_on_a_cpu_cluster_are_refused(tmp_path):
    """Needs Ray's view of the cluster: a real local Ray, no GPU here."""
    r = cli("run", "--name", "g", "--root", str(tmp_path / "r"), "--gpus-per-trial", "1", *BASE)
    assert r.returncode == 2
    assert "gpus_per_trial = 1.0 but the Ray cluster has no GPU" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "r").exists()


def test_export_unknown_study(capsys, tmp_path):
    code = run_study.main(["export", "nope", "--root", str(tmp_path), "--out", str(tmp_path / "b.json")])
    assert code == 2 and "no study 'nope'" in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"),
                    reason="needs root and unshare: a PID namespace hides the machine's other Rays")
def test_address_auto_without_a_cluster_is_refused(tmp_path):
    """`auto` joins the cluster named in RAY_ADDRESS, else in $RAY_TMPDIR/ray/ray_current_cluster
    (the last `ray start` on the machine, /tmp/ray by default), else any Ray it finds among the
    machine's processes (Ray 2.60's `get_ray_address_from_environment`). The command sees
    none of them, whatever else runs: no RAY_ADDRESS, a Ray temp folder of its own, and a
    PID namespace of its own."""
    root = tmp_path / "root"
    isolated = {k: v for k, v in env(RAY_TMPDIR=str(tmp_path / "raytmp")).items() if k != "RAY_ADDRESS"}
    (tmp_path / "raytmp").mkdir()
    r = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "run_study.py", "run",
                        "--name", "s", "--root", str(root), *BASE, "--address", "auto"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120, env=isolated)
    assert r.returncode == 2 and "cannot connect to the Ray cluster at 'auto'" in r.stderr, r.stderr
    assert not root.exists()


def test_study_flags_show_their_real_defaults():
    """Study flags are generated from StudyConfig: help shows the dataclass's defaults."""
    from study.config import StudyConfig

    text = make_parser()._subparsers._group_actions[0].choices["run"].format_help()
    defaults = StudyConfig(name="x", root="/r")
    for flag, value in [("--reduction-factor", defaults.reduction_factor),
                        ("--max-failures", defaults.max_failures), ("--num-samples", defaults.num_samples)]:
        block = text.split("study settings", 1)[1].split(flag, 1)[1].split("\n  --", 1)[0]
        assert f"[{value}]" in " ".join(block.split()), (flag, block)


def test_every_command_and_flag_is_described():
    """`--help` of every subcommand has a description, and every flag a help text."""
    subs = make_parser()._subparsers._group_actions[0].choices
    assert {"run", "resume", "export", "ui", "status", "logs", "stop", "list", "extend"} <= set(subs)
    for name, p in subs.items():
        assert p.description, f"{name} has no description"
        bare = [a.option_strings for a in p._actions if a.option_strings and not a.help]
        assert not bare, (name, bare)
    assert "[25/255]" in subs["train"].format_help()


def test_unknown_flag_shows_the_subcommands_usage(capsys):
    with pytest.raises(SystemExit) as e:
        run_study.main(["status", "x", "--bogus"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("usage: run_study.py status ") and "unrecognized arguments: --bogus" in err


def test_printed_commands_work_from_another_folder(tmp_path, monkeypatch):
    """The replay, ui and resume lines a study prints name run_study.py so that they run
    from the folder the study was started in."""
    import shlex

    from study.paths import command

    monkeypatch.chdir(tmp_path)
    line = shlex.split(command("ui", "--help"))
    assert line[1] == str(ROOT / "run_study.py")
    r = subprocess.run(line, capture_output=True, text=True, timeout=120, env=env())
    assert r.returncode == 0 and "MLflow UI" in r.stdout, r.stderr
