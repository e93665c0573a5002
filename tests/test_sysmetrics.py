"""System metrics per trial (study/engine/sysmetrics.py): the sampler under MLflow's names,
without a GPU and with one, its records, and a tiny study whose trial runs hold them."""
from __future__ import annotations


import pytest
import torch

from study.engine import sysmetrics
from study.engine.nvml import PROCESS_MEMORY, visible_entry
from study.engine.sysmetrics import Sample, SystemSampler
from study.tracking.records import SYSTEM_SERIES, TrialLogger, run_create_info
from studyutil import client, wait_until

MACHINE = {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"}
GPU = {"system/gpu_0_utilization_percentage", "system/gpu_0_memory_usage_megabytes",
       "trial/gpu_max_allocated_megabytes"}


def _collect(sampler: SystemSampler, n: int) -> list[Sample]:
    got: list[Sample] = []
    wait_until(lambda: got.extend(sampler.drain()) or len(got) >= n, f"{n} samples", timeout=10, poll=0.01)
    return got + sampler.stop()


def test_sampler_on_cpu_samples_at_start_and_end_under_mlflow_names():
    s = SystemSampler(torch.device("cpu"), every=0.02).start()
    assert len(s.drain()) == 1  # the first sample is taken at start
    samples = _collect(s, 2)
    assert not s._thread.is_alive(), "stop must end the thread"
    assert len(samples) >= 3 and [x.step for x in samples] == list(range(1, len(samples) + 1))
    assert all(x.ts <= y.ts for x, y in zip(samples, samples[1:]))
    for x in samples:  # no GPU: no GPU names, and no error
        assert set(x.values) == MACHINE | {"trial/process_rss_megabytes"}
        assert x.values["trial/process_rss_megabytes"] > 10
        assert 0 <= x.values["system/cpu_utilization_percentage"] <= 100
    assert s.stop() == [] and s.drain() == []  # a second stop is harmless


def test_sampler_off_and_refusals():
    off = SystemSampler(torch.device("cpu"), every=0).start()
    assert off.drain() == [] and off.stop() == [] and off._thread.ident is None
    with pytest.raises(ValueError, match="seconds >= 0"):
        SystemSampler(torch.device("cpu"), every=-1)


def test_cuda_visible_devices_names_the_physical_gpu():
    assert visible_entry(None, 0) == 0 and visible_entry("", 1) == 1
    assert visible_entry("3,1", 0) == 3 and visible_entry(" 3, 1", 1) == 1
    assert visible_entry("GPU-8f1e,GPU-aa", 0) == "GPU-8f1e"
    with pytest.raises(ValueError, match="not among"):
        visible_entry("2", 1)


def test_absent_nvml_leaves_gpu_names_out(monkeypatch):
    import pynvml

    def no_library():
        raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    monkeypatch.setattr(pynvml, "nvmlInit", no_library)
    assert sysmetrics.trial_gpu(torch.device("cuda", 0), "0") is None
    assert sysmetrics.trial_gpu(torch.device("cpu"), None) is None


def test_samples_become_metrics_records_of_their_own_series():
    batches: list[list[dict]] = []
    log = TrialLogger(batches.append, run_create_info("1", "p", "st", "t1", "n", {}))
    log.log_metrics({"iteration": 10, "psnr": 20.0}, 10)
    log.log_system_metrics([Sample(0, 1000, {"system/cpu_utilization_percentage": 5.0}),
                            Sample(1, 6000, {"system/cpu_utilization_percentage": 7.0})])
    log.flush()
    sysrecs = [r for r in batches[0] if r.get("series") == SYSTEM_SERIES]
    assert [(r["op"], r["trial"], r["step"], r["ts"]) for r in sysrecs] == [("metrics", "t1", 0, 1000),
                                                                          ("metrics", "t1", 1, 6000)]


def test_courier_delivers_samples_whose_steps_lie_below_the_iterations(tmp_path, monkeypatch):
    """A sample's step counts samples: it must not be taken for an iteration already delivered."""
    from study.tracking.courier import Courier
    from study.tracking.spool import Spool

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    uri = f"sqlite:///{tmp_path}/m.db"
    c = client(uri)
    exp = c.create_experiment("st", artifact_location=(tmp_path / "artifacts").as_uri())
    courier = Courier(Spool(tmp_path / "spool"), uri, say=lambda line: None).start()
    log = TrialLogger(courier.put, run_create_info(exp, "p", "st", "t1", "n", {}))
    for i in range(3):
        log.log_metrics({"iteration": 10 * i}, 10 * i)
        log.log_system_metrics([Sample(i, 1000 * i, {"system/cpu_utilization_percentage": float(i)})])
        log.flush()
    wait_until(lambda: len(courier.spool) == 0, "delivery", timeout=60)
    courier.stop()
    run = c.search_runs([exp])[0]
    steps = [m.step for m in c.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")]
    assert steps == [0, 1, 2]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is false)")
def test_sampler_on_a_gpu_logs_the_trials_gpu():
    dev = torch.device("cuda", 0)
    x = torch.ones(1024, 1024, device=dev)  # 4 MB held by this process
    s = SystemSampler(dev, every=0.05, visible=__import__("os").environ.get("CUDA_VISIBLE_DEVICES")).start()
    samples = _collect(s, 2)
    assert s.gpu is not None, "NVML should find the GPU torch uses"
    # The device NVML sampled is the one torch computes on (by UUID, whatever the orders).
    assert s.device_tags()["dip.gpu_uuid"] == sysmetrics.cuda_uuid(dev), s.device_tags()
    for v in (x.values for x in samples):
        assert GPU <= set(v), sorted(v)
        assert v["trial/gpu_max_allocated_megabytes"] >= 4.0
        assert v["system/gpu_0_memory_usage_megabytes"] >= v["trial/gpu_max_allocated_megabytes"]
        # Where NVML lists this process (not in a container with its own PID namespace).
        assert v.get(PROCESS_MEMORY, 4.0) >= 4.0
    del x


# The end-to-end check (a study's trial runs hold their own system metrics) runs on
# tests/test_study_e2e.py's study: test_trial_runs_hold_system_metrics.


def test_report_gives_device_seconds_per_network():
    from study.report.tables import TrialRow, mode_section as _mode_section

    def row(name, state, **m):
        return TrialRow(name, name, state, "uniform", None, 0.01, 40, {"psnr_ema": 20.0, **m})

    cpu = [row("a", "completed", seconds=12.0, **{"trial/cpus": 2.0, "trial/networks": 4.0}),
           row("b", "completed", seconds=6.0, **{"trial/cpus": 2.0, "trial/networks": 4.0}),
           row("c", "stopped early", seconds=1.0, **{"trial/cpus": 2.0, "trial/networks": 4.0})]
    table = _mode_section(cpu, "psnr_ema")
    assert "CPU-s per network" in table and "`seconds` x CPUs / networks" in table
    assert table.splitlines()[-1].endswith("| 4.50 |")  # median of 6 and 3: completed trials only
    gpu = [row("a", "completed", seconds=10.0, **{"trial/gpus": 0.5, "trial/cpus": 1.0, "trial/networks": 2.0})]
    table = _mode_section(gpu, "psnr_ema")
    assert "GPU-s per network" in table and table.splitlines()[-1].endswith("| 2.50 |")
    assert _mode_section([row("old", "completed", seconds=3.0)], "psnr_ema").endswith("| - |")


def test_a_retry_goes_on_from_the_sample_count_its_checkpoint_saved(tmp_path):
    """A checkpoint holds the sampler's next step, and a sampler started from it counts on:
    a retried attempt's samples no longer start again at step 0 of its run."""
    from study.cluster.trainable import CKPT_FILE, _save
    from study.config import TrialConfig
    from study.engine.trial import Trial

    s = SystemSampler(torch.device("cpu"), every=60, first=7).start()
    assert s.taken == 8  # its first sample is step 7
    steps = [x.step for x in s.stop()]
    assert steps == [7, 8] and s.taken == 9
    trial = Trial(TrialConfig(size=16, scales=2, channels=4, iterations=2, report_every=1))
    _save(trial, [], s.taken, str(tmp_path))
    assert torch.load(tmp_path / CKPT_FILE, weights_only=True)["sysmetrics_step"] == 9
