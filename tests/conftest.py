"""Shared fixtures, and how the suite runs in parallel (pytest-xdist, `-n` in pytest.ini)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Under xdist each worker is its own pytest process. `ray.init()` without an address joins
# the cluster named in RAY_TMPDIR/ray_current_cluster, and `--address auto` looks there
# too: with one folder per worker a study of one worker never joins another worker's Ray.
_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if _WORKER:
    os.environ["RAY_TMPDIR"] = f"/tmp/ray-{_WORKER}"
    Path(os.environ["RAY_TMPDIR"]).mkdir(exist_ok=True)

# Modules whose tests start a Ray cluster of several nodes (network namespaces, `ray start`
# heads and workers, a Jobs head): one at a time, on one worker, so two such clusters never
# share the 2 cores of a small machine.
CLUSTER_MODULES = {"test_cluster_netns", "test_study_multinode", "test_jobs"}


def pytest_configure(config: pytest.Config) -> None:
    """Ray's first local cluster writes ~/.ray/auth_token when there is none, and every later
    cluster and client reads it: made once here, before the workers start, so two workers'
    first clusters cannot write different tokens at once."""
    if _WORKER is None and not (Path.home() / ".ray" / "auth_token").exists():
        from ray._private.authentication.authentication_token_setup import generate_and_save_token

        generate_and_save_token()


def _group(nodeid: str) -> str:
    module = Path(nodeid.split("::", 1)[0]).stem
    return "cluster" if module in CLUSTER_MODULES else module


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """Under xdist, whole modules go to a worker (module-scoped fixtures, a study or a
    cluster, are made once), the cluster modules as one, in the order collected below.
    (xdist's own `loadgroup` marks do not reach this pytest: it sets a node id pytest 9
    no longer reads.)"""
    from xdist.scheduler import LoadScopeScheduling

    class ModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _group(nodeid)

    config.option.loadscopereorder = False  # keep the order of pytest_collection_modifyitems
    return ModuleScheduling(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The cluster group first, then the other end-to-end modules, then the fast ones: the
    longest work starts first and the two workers end together."""
    slow = {_group(i.nodeid) for i in items if i.get_closest_marker("slow")}
    order = {g: n for n, g in enumerate(dict.fromkeys(_group(i.nodeid) for i in items))}
    items.sort(key=lambda i: (_group(i.nodeid) != "cluster", _group(i.nodeid) not in slow,
                              order[_group(i.nodeid)]))


@pytest.fixture(autouse=True)
def one_thread():
    """Nets this small gain nothing from more threads, and on a shared machine several
    spinning OpenMP threads per process slow a run many times over."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
