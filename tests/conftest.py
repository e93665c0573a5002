"""Shared fixtures."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Nets this small gain nothing from more threads, and on a shared machine several
    spinning OpenMP threads per process slow a run many times over."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
