"""Restoring a trial whose saved checkpoint was rotated away.

After a killed driver, Tune's saved experiment state lags the trials: the checkpoint it
names for a trial may have been deleted since (`CheckpointConfig(num_to_keep=2)` keeps the
two newest) for newer ones. Ray's `Trainable.restore` (ray/tune/trainable/trainable.py,
Ray 2.60) then fails the trial with "Could not recover from checkpoint as it does not exist
on storage anymore" before the trial's own code runs (seen in CI:
tests/test_cluster_netns.py::test_driver_killed_then_resume_from_s3). `resumable` wraps a
function trainable in a class whose `restore` takes the trial's newest checkpoint still in
the storage instead: it is later than the one named, never earlier, and the trial's state
(iteration, weights, optimiser, stop rule) is all in it.
"""
from __future__ import annotations

from typing import Callable

from ray import tune
from ray.train._internal.checkpoint_manager import _TrainingResult
from ray.tune.trainable import FunctionTrainable, wrap_function


def newest_checkpoint(ckpt: tune.Checkpoint) -> tune.Checkpoint:
    """`ckpt` where it still exists, else the newest checkpoint of the same trial in the
    storage; FileNotFoundError when none is left."""
    import pyarrow.fs as pafs

    fs = ckpt.filesystem
    if fs.get_file_info(ckpt.path).type != pafs.FileType.NotFound:
        return ckpt
    parent = ckpt.path.rstrip("/").rsplit("/", 1)[0]
    found = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(parent))
                   if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_"))
    if not found:
        raise FileNotFoundError(f"no checkpoint left under {parent}")
    return tune.Checkpoint(found[-1], filesystem=fs)


def resumable(fn: Callable[..., None]) -> type[FunctionTrainable]:
    """`fn` (with_parameters / with_resources applied) as Tune's class for it, restoring
    from the newest checkpoint left when the one Tune names is gone. Its Tune name is
    `fn`'s, so studies started before this wrapper restore with it."""
    base = wrap_function(fn)

    class Resumable(base):  # type: ignore[misc, valid-type] - a class Ray makes at run time
        def restore(self, checkpoint_path: object) -> None:
            if isinstance(checkpoint_path, _TrainingResult):
                found = newest_checkpoint(checkpoint_path.checkpoint)
                if found is not checkpoint_path.checkpoint:
                    checkpoint_path = _TrainingResult(checkpoint=found, metrics=checkpoint_path.metrics)
            super().restore(checkpoint_path)

    Resumable.__name__ = Resumable.__qualname__ = base.__name__
    return Resumable
