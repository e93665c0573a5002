"""What every bench here does at its end: print its table and, with --out, save it
(bench/results/ keeps them beside the command that made them)."""
from __future__ import annotations

from pathlib import Path


def emit(text: str, out: str | None) -> int:
    """Print `text` and write it to `out` when one is given; exit status 0."""
    print(text)
    if out:
        Path(out).write_text(text)
    return 0
