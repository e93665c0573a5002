"""Checks on folders a command will write, made before any work starts."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def check_writable(path: Path, what: str = "folder") -> None:
    """Raise ValueError unless `path` exists as a writable folder or can be created: a real
    write in its nearest existing ancestor (os.access says yes to root even on read-only or
    virtual filesystems such as /proc)."""
    probe = path
    while not probe.exists():
        probe = probe.parent
    try:
        if not probe.is_dir():
            raise OSError(f"{str(probe)!r} is not a folder")
        fd, tmp = tempfile.mkstemp(dir=probe, prefix=".dip-write-test-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise ValueError(f"{what} {str(path)!r} cannot be written: {e.strerror or e}") from None
