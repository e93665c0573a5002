"""A real study ranked by the held-out PSNR estimate (issue 22): its best.json replays to
the value it was ranked by."""
from __future__ import annotations

import pytest

from studyutil import TINY, cli, read_json

pytestmark = pytest.mark.slow


def test_a_study_ranked_by_the_estimate_exports_a_best_json_that_replays(tmp_path):
    root = tmp_path / "studies"
    space = tmp_path / "space.yaml"
    space.write_text("lr: {low: 0.003, high: 0.02, log: true}\n")
    p = cli("run", "--name", "est", "--root", str(root), "--num-samples", "2", "--space", str(space),
            "--max-concurrent", "2", "--seed", "1", "--scheduler", "fifo", "--metric", "psnr_estimate",
            "--stop-rule", "holdout", "--noise-mode", "uniform", *TINY, "--image", "camera")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    best = read_json(root / "est" / "best.json")
    assert best["metric"] == "psnr_estimate" and best["config"]["stop_rule"] == "holdout"
    r = cli("train", "--config", str(root / "est" / "best.json"), "--out", str(tmp_path / "replay"), "--quiet")
    assert r.returncode == 0, r.stderr
    got = read_json(tmp_path / "replay" / "result.json")
    assert got["config"] == best["config"]
    # Same seed, config and held-out pixels on the same CPU: the same estimate.
    assert got["psnr_estimate"] == pytest.approx(best["value"], abs=0.05)


def test_ranking_by_the_estimate_without_held_out_pixels_exits_2(tmp_path):
    p = cli("run", "--name", "bad", "--root", str(tmp_path), "--metric", "psnr_estimate",
            "--stop-rule", "eswmv", *TINY)
    assert p.returncode == 2 and "reported only with stop_rule holdout" in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()
