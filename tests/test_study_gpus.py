"""The GPU half of the scheduling on a machine without a GPU: a Ray head that declares two
logical GPUs (`ray start --head --num-gpus=2`). Ray schedules trials by them and sets each
trial's CUDA_VISIBLE_DEVICES as on a GPU node, so everything but the CUDA kernels runs here:
fractional shares, trials at once, the ids each trial records, `status`'s GPU line, and
`device: auto` falling back to the CPU (no CUDA behind a logical GPU) with a warning, a tag
and the summary's count. What waits for a real GPU: NVML's side of a trial's GPU metrics
(faked at its boundary in test_nvml_mapping.py; real in test_sysmetrics.py on a GPU).
The head has its own ports and temp dir and is torn down by its marker, never `ray stop`."""
from __future__ import annotations

import subprocess
import sys
import time
from collections import Counter

import pytest
import torch

from faults import HOOK
from study.cluster.placement import FALLBACK_TAG, Placement
from study.tracking.keys import to_mlflow  # MLflow's key of a study metric (issue 21)
from studyutil import AUTH, ROOT, TINY, check_study, client, env, own_ray, ray_start, wait_until

TRIALS, SHARE = 5, 0.5  # 4 CPUs at 0.5 would fit all 5 at once: the 2 GPUs at 0.5 allow 4


def test_placement_tags_and_when_auto_fell_back():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    held = Placement(("1",), "node-a", "10.0.0.2", "1")
    assert held.fell_back("auto", cpu) and not held.fell_back("cpu", cpu) and not held.fell_back("auto", cuda)
    assert not Placement((), "node-a", "10.0.0.2", "").fell_back("auto", cpu)  # no GPU asked for
    assert held.tags(cpu, True) == {"dip.gpu_ids": "1", "dip.node_id": "node-a", "dip.node_ip": "10.0.0.2",
                                    "dip.cuda_visible_devices": "1", "dip.device": "cpu", FALLBACK_TAG: "true"}
    tags = Placement((), "n", "ip", None).tags(cpu, False)
    assert tags["dip.gpu_ids"] == "none" and tags["dip.cuda_visible_devices"] == "unset"
    assert FALLBACK_TAG not in tags
    assert "GPU 1" in held.warning() and "\n" not in held.warning()


def test_status_gpu_line_sums_the_running_trials_shares():
    from study.tracking.store import StudyView, TrialSummary

    def trial(status: str, gpus: float) -> TrialSummary:
        return TrialSummary(run_id="r", name="n", trial_id="t", status=status, completed=False, params={},
                            metrics={"trial/gpus": gpus}, tags={}, start=1.0, end=0.0)

    def view(tags: dict[str, str], *trials: TrialSummary) -> StudyView:
        return StudyView(name="s", tracking_uri="", parent_run_id="p", status="RUNNING", start=0, end=0,
                         params={}, tags=tags, trials=trials)

    on_gpus = {"dip.cluster_gpus": "2", "dip.gpus_per_trial": "0.5"}
    busy = view(on_gpus, *[trial("RUNNING", 0.5)] * 3, trial("FINISHED", 0.5))
    assert busy.gpu_line() == "GPUs: 1.5 of 2 in use by 3 running trials, 0.5 GPU each"
    assert view(on_gpus).gpu_line() == "GPUs: 0 of 2 in use by 0 running trials, 0.5 GPU each"
    assert view({"dip.cluster_gpus": "0", "dip.gpus_per_trial": "0"}, trial("RUNNING", 0.0)).gpu_line() == ""
    assert view({}).gpu_line() == ""  # a study recorded before the tag: no line


@pytest.fixture(scope="module")
def gpu_head():
    with own_ray("dipg") as (marker, temp, port):
        ray_start(marker, temp, "--head", f"--port={port}", "--num-cpus=4", "--num-gpus=2",
                  "--include-dashboard=false")
        yield f"127.0.0.1:{port}"


def _status_gpu_line(uri: str, name: str) -> str:
    """`status`'s GPU line, read from MLflow as the command reads it ('' until it shows)."""
    from study.cli.jobs import progress_lines
    from study.tracking.store import read_study_view

    try:
        view = read_study_view(uri, name)
    except Exception:  # noqa: BLE001 - no store yet, or the store busy: ask again
        return ""
    lines = progress_lines(view, time.time()) if view is not None else []
    return next((x for x in lines if x.startswith("GPUs:")), "")


def _spans(uri: str, children: list) -> list[tuple[float, float, str]]:
    """(start, last report, GPU ids) per trial, all stamped in the trial's worker: the run's
    start and its last `iteration`. (The run's end is stamped when MLflow got it, later.)"""
    c = client(uri)
    return [(r.info.start_time, max(m.timestamp for m in c.get_metric_history(r.info.run_id, to_mlflow("iteration"))),
             r.data.tags["dip.gpu_ids"]) for r in children]


def _most_at_once(spans: list[tuple[float, float, str]]) -> tuple[int, Counter]:
    """The most trials alive at one trial's start, and the GPU ids they held then; fails if
    any GPU id is ever held by more than 1 / SHARE trials at once."""
    most, ids = 0, Counter()
    for start, _, _ in spans:
        alive = Counter(g for s, e, g in spans if s <= start <= e)
        assert max(alive.values()) <= 1 / SHARE, f"a GPU held by more than {1 / SHARE:g} trials: {alive}"
        if sum(alive.values()) > most:
            most, ids = sum(alive.values()), alive
    return most, ids


@pytest.mark.slow
def test_logical_gpus_run_four_trials_at_once_two_per_gpu(gpu_head, tmp_path):
    faults = tmp_path / "faults"
    faults.mkdir()
    log, uri = tmp_path / "driver.log", f"sqlite:///{tmp_path}/mlflow.db"
    # The first 4 trials wait for each other at their first report, and every report takes
    # 1.5 s: 4 at once whatever the machine's speed, long enough for `status` to see them.
    # No log deduplication: each trial's warning line is counted.
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "run_study.py"), "run", "--name", "gpus", "--root", str(tmp_path),
             "--num-samples", str(TRIALS), "--address", gpu_head, "--gpus-per-trial", str(SHARE),
             "--cpus-per-trial", "0.5", "--device", "auto", "--scheduler", "fifo", *TINY],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env(**AUTH, **HOOK, DIP_FAULT_BARRIER="4", DIP_FAULT_DIR=str(faults), DIP_FAULT_SLOW_S="1.5",
                    RAY_DEDUP_LOGS="0"))
    def four_running() -> str:
        assert proc.poll() is None, "the study ended before `status` showed 4 trials: " + log.read_text()[-4000:]
        if not (tmp_path / "gpus" / "study.json").exists():
            return ""  # the driver is still making the store (a second maker would race it)
        line = _status_gpu_line(uri, "gpus")
        return line if "by 4 running" in line else ""

    try:
        line = wait_until(four_running, "status showing 4 trials on 2 GPUs", timeout=300, poll=0.5)
        assert line == "GPUs: 2 of 2 in use by 4 running trials, 0.5 GPU each"
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert proc.returncode == 0, text[-4000:]
    _, children = check_study(uri, "gpus", n=TRIALS)
    tags = [r.data.tags for r in children]
    assert all(t["dip.gpu_ids"] in ("0", "1") for t in tags), [t["dip.gpu_ids"] for t in tags]
    # Ray's ids are what it put in CUDA_VISIBLE_DEVICES; one node, one address.
    assert all(t["dip.cuda_visible_devices"] == t["dip.gpu_ids"] for t in tags)
    assert len({(t["dip.node_id"], t["dip.node_ip"]) for t in tags}) == 1
    assert all(r.data.metrics["trial/gpus"] == SHARE for r in children)
    most, ids = _most_at_once(_spans(uri, children))
    assert most == 4 and ids == Counter({"0": 2, "1": 2}), (most, ids)

    # device auto: the CPU where no CUDA is behind the id (every trial on this machine).
    fell = [t for t in tags if t.get(FALLBACK_TAG) == "true"]
    assert all(t["dip.device"] == "cpu" for t in fell)
    assert all(t["dip.device"].startswith("cuda") for t in tags if t not in fell)
    if not torch.cuda.is_available():
        assert len(fell) == TRIALS
    assert text.count("device auto trains on the CPU") == len(fell), text[-4000:]
    if fell:
        assert f"{len(fell)} of {TRIALS} trials had a GPU from Ray but found no CUDA" in text
