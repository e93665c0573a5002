"""A durable first-in first-out queue of JSON records in one folder: what the MLflow
courier (study/tracking/store.py) has not delivered yet survives a crash of its process and an
outage of the server of any length, up to a size bound.

Each `append` writes one batch file atomically (temporary file, fsync, rename), named by a
counter so that the folder's sorted listing is the delivery order. The consumer reads the
oldest batch, delivers a prefix of it, and `ack`s that prefix: the file is rewritten with
what is left, or removed. Only one process owns a spool folder at a time (the study's
relay); a new owner continues where the last one stopped.

Standard library only (and the project's JSON alias).
"""
from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path

from study.paths import JsonObject

Record = JsonObject  # one MLflow write (study/tracking/records.py), as JSON
BATCH = re.compile(r"^(\d{12})\.json$")
META = "meta.json"
DEFAULT_MAX_BYTES = 512 * 2**20  # a bound on what waits on disk for the server


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Spool:
    """Batches of records on disk, oldest first. Records marked `"droppable": True` (images)
    are the first to go when the folder would pass `max_bytes`; everything else is kept
    up to twice that bound. `dropped` counts what was refused, across restarts."""

    def __init__(self, folder: str | os.PathLike, max_bytes: int = DEFAULT_MAX_BYTES):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._meta = self._read_meta()
        names = sorted(p.name for p in self.folder.iterdir() if BATCH.match(p.name))
        self._batches = names
        self._bytes = sum((self.folder / n).stat().st_size for n in names)
        self._next = int(BATCH.match(names[-1]).group(1)) + 1 if names else self._meta.get("next", 0)

    def _read_meta(self) -> dict[str, int]:
        try:
            return json.loads((self.folder / META).read_text())
        except (OSError, ValueError):
            return {"dropped": 0, "next": 0}

    def _save_meta(self) -> None:
        self._meta["next"] = self._next
        _write_atomic(self.folder / META, json.dumps(self._meta).encode())

    @property
    def dropped(self) -> int:
        return int(self._meta.get("dropped", 0))

    def __len__(self) -> int:
        return len(self._batches)

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def append(self, records: list[Record]) -> int:
        """Store `records` as one batch; returns how many were dropped by the bound."""
        with self._lock:
            data, kept = self._encode_within_bound(records)
            dropped = len(records) - len(kept)
            if kept:
                name = f"{self._next:012d}.json"
                self._next += 1
                _write_atomic(self.folder / name, data)
                self._batches.append(name)
                self._bytes += len(data)
            if dropped:
                self._meta["dropped"] = self.dropped + dropped
            if dropped or kept:
                self._save_meta()
            return dropped

    def _encode_within_bound(self, records: list[Record]) -> tuple[bytes, list[Record]]:
        data = json.dumps(records).encode()
        if self._bytes + len(data) <= self.max_bytes:
            return data, records
        kept = [r for r in records if not r.get("droppable")]
        data = json.dumps(kept).encode()
        if self._bytes + len(data) <= 2 * self.max_bytes:
            return data, kept
        return b"", []

    def head(self) -> list[Record]:
        """The oldest batch (empty when the spool is empty)."""
        with self._lock:
            if not self._batches:
                return []
            return json.loads((self.folder / self._batches[0]).read_bytes())

    def ack(self, n: int) -> None:
        """The first `n` records of the oldest batch were delivered."""
        with self._lock:
            path = self.folder / self._batches[0]
            rest = json.loads(path.read_bytes())[n:]
            self._bytes -= path.stat().st_size
            if rest:
                data = json.dumps(rest).encode()
                _write_atomic(path, data)
                self._bytes += len(data)
            else:
                path.unlink()
                self._batches.pop(0)
