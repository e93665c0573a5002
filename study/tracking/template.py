"""A new sqlite MLflow store, copied from an empty one migrated once per installation.

MLflow 3.17 builds a sqlite store by running its ~60 alembic migrations, about 2 s on a
2-core CPU, at the start of every study under a fresh root (and of every test that makes
one). The result is the same file each time for a given MLflow: so it is built once, kept
in the user's cache keyed by MLflow's version and schema head, and copied. The template has
no experiment: MLflow adds its "Default" experiment when it first opens the copy, with the
artifact location it would have given it (it depends on the working directory).

Anything unexpected (no cache folder, a template from another MLflow, a failed copy) falls
back to MLflow's own migrations: a copy that does not read back at the head is removed.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
from pathlib import Path


def cache_dir() -> Path:
    """DIP_CACHE_DIR, else $XDG_CACHE_HOME/dip-study, else ~/.cache/dip-study."""
    if os.environ.get("DIP_CACHE_DIR"):
        return Path(os.environ["DIP_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dip-study"


def schema_head() -> str:
    from mlflow.store.db.utils import _get_latest_schema_revision

    return _get_latest_schema_revision()


def template_path() -> Path:
    import mlflow

    return cache_dir() / f"mlflow-{mlflow.__version__}-{schema_head()}.db"


def revision(path: Path) -> str | None:
    """The store's alembic revision, read-only (opening it with MLflow would migrate it)."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)) as db:
            rows = db.execute("SELECT version_num FROM alembic_version").fetchall()
    except sqlite3.Error:
        return None
    return rows[0][0] if len(rows) == 1 else None


def _build(target: Path) -> None:
    """Migrate an empty store at `target` (atomically: a half-built one is never seen)."""
    import sqlalchemy
    from mlflow.store.db.utils import _initialize_tables

    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(f".{target.name}.{os.getpid()}.part")
    part.unlink(missing_ok=True)
    engine = sqlalchemy.create_engine(f"sqlite:///{part}")
    try:
        _initialize_tables(engine)
    finally:
        engine.dispose()
    if revision(part) != schema_head():
        part.unlink(missing_ok=True)
        raise RuntimeError(f"the migrated template {part} is not at MLflow's head")
    os.replace(part, target)


def seed_store(path: Path) -> bool:
    """Make the new store at `path` a copy of the template (building the template first if
    this installation has none). True if `path` now holds a store at MLflow's head; False
    (and nothing at `path`) where the template cannot be used: MLflow then migrates as
    usual. The caller holds the store's creation lock (store._creating)."""
    if path.exists() and path.stat().st_size > 0:
        return False  # an existing store: MLflow's to open (and migrate if it is older)
    part = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        template = template_path()
        if revision(template) != schema_head():
            _build(template)
        shutil.copyfile(template, part)
        if revision(part) != schema_head():
            raise RuntimeError("the copy does not read back at MLflow's head")
        os.replace(part, path)
        return True
    except Exception:  # noqa: BLE001 - any failure leaves MLflow's own path, which always works
        part.unlink(missing_ok=True)
        return False
