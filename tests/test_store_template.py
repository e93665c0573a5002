"""A new sqlite MLflow store starts as a copy of a migrated empty one (study/tracking/template.py):
the copy must be the store MLflow would have made, and anything wrong with the template must
fall back to MLflow's own migrations."""
from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from study.tracking import template
from study.tracking.store import writer_client


def _schema(path: Path) -> list[tuple[str, list[str]]]:
    """Every table and index, each statement's lines sorted: MLflow's own migrations write a
    table's constraints in an order that differs from one run to the next."""
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT name, sql FROM sqlite_master WHERE sql IS NOT NULL").fetchall()
    return sorted((name, sorted(line.strip().rstrip(",") for line in sql.splitlines())) for name, sql in rows)


def _experiments(path: Path) -> list[tuple[int, str, str]]:
    with sqlite3.connect(path) as db:
        return db.execute("SELECT experiment_id, name, artifact_location FROM experiments").fetchall()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DIP_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_a_seeded_store_is_the_store_mlflow_makes(tmp_path, cache):
    made = tmp_path / "mlflow-made.db"
    MlflowClient(f"sqlite:///{made}").search_experiments()  # MLflow's own migrations
    first = tmp_path / "first" / "mlflow.db"
    first.parent.mkdir()
    writer_client(f"sqlite:///{first}")
    assert template.template_path().is_file() and template.template_path().parent == cache
    second = tmp_path / "second" / "mlflow.db"
    second.parent.mkdir()
    c = writer_client(f"sqlite:///{second}")
    for p in (first, second):
        assert _schema(p) == _schema(made)
        assert template.revision(p) == template.revision(made) == template.schema_head()
        assert _experiments(p) == _experiments(made)  # MLflow's Default, where MLflow puts it
    exp = c.create_experiment("s", artifact_location=(tmp_path / "a").as_uri())
    run = c.create_run(exp).info.run_id
    c.log_metric(run, "psnr", 27.5)
    assert c.get_run(run).data.metrics == {"psnr": 27.5}


def test_a_broken_template_is_rebuilt_and_an_existing_store_is_left_alone(tmp_path, cache):
    cache.mkdir()
    template.template_path().write_bytes(b"not a database")
    new = tmp_path / "mlflow.db"
    assert template.seed_store(new)
    assert template.revision(template.template_path()) == template.schema_head()
    assert template.revision(new) == template.schema_head()
    assert not template.seed_store(new)  # a store is there: MLflow's to open


def test_without_a_usable_cache_mlflow_migrates_as_before(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder would go")
    monkeypatch.setenv("DIP_CACHE_DIR", str(blocker / "cache"))
    new = tmp_path / "mlflow.db"
    assert not template.seed_store(new) and not new.exists()
    assert not list(tmp_path.glob(".*.part"))
    writer_client(f"sqlite:///{new}")
    assert template.revision(new) == template.schema_head() and _experiments(new)[0][1] == "Default"
