"""Checks on folders a command will write, made before any work starts, and the one way
the service writes its JSON files."""
from __future__ import annotations

import json
import os
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Union

# JSON as this project's files and records hold it (study.json, best.json, result.json,
# MLflow records and artifacts, Ray Jobs metadata): what json.loads returns, json.dumps takes.
Json = Union[None, bool, int, float, str, list["Json"], dict[str, "Json"]]
JsonObject = dict[str, Json]


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


def write_json(path: Path, data: Json) -> None:
    """Write through a temporary file and a rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


ENTRY = Path(__file__).resolve().parents[1] / "run_study.py"


def _shown(path: Path) -> str:
    """A path as a user may type it here: relative under the working folder, else absolute."""
    return os.path.relpath(path) if path.is_relative_to(Path.cwd()) else str(path)


def command(*args: str) -> str:
    """A run_study.py command line to print for the user (a resume hint, a replay) that
    works from the folder the user is in: this interpreter and the project's entry point,
    each shortened to a path under the working folder when it is one."""
    return shlex.join([_shown(Path(sys.executable)), _shown(ENTRY), *args])


def resume_hint(name: str, root: str) -> str:
    return command("resume", name, "--root", root)
