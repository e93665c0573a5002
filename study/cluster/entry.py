"""Tune's entry to a trial, light enough for the driver: the trial itself (trainable.py:
torch, the engine) is imported in the worker, when the trial starts, so the driver never
needs torch before its first trial runs (about 1.5 s of the time to it on 2 cores,
bench/study_overhead.py)."""
from __future__ import annotations

from study.cluster.context import StudyContext
from study.paths import JsonObject


def dip_trainable(config: JsonObject, ctx: StudyContext) -> None:
    """Tune's function trainable: one trial (study/cluster/trainable.py `train`)."""
    from study.cluster.trainable import train

    train(config, ctx)
