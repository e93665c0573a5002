"""The one translation between the study's metric and image names and their MLflow keys.

MLflow 3.17's run page groups a run's charts into sections named by what precedes a key's
last "/", sorts the sections by name, and puts the keys without a "/" ("Model metrics")
last (`getBaseChartAndSectionConfigs` and `extractChartSectionName` in
mlflow/server/js/build/static/js/main.*.js). An image card opens on step 0 unless it has a
single step. So the key's first part orders the page:

- `fit/...`: what a user reads first, the quality curves: PSNR, SSIM and the loss, by the
  pattern QUALITY, so a new metric of that kind (`psnr_estimate`) joins them;
- `images/...`: the observation, the input and the outputs;
- `other/...`: every other metric a trial reports (`autostop_fired`, `best_iteration`,
  `iteration`, `seconds`, `forwards`, ...), by default;
- unchanged: what already names its own group (`system/` for MLflow's System metrics tab,
  `trial/` for what the trial holds).

A mean over the images is `<group>/<metric>` (`fit/psnr_ema`). One image's quality curves
follow its pictures: `psnr_ema/camera` -> `images/camera/fit/psnr_ema` (section
images/camera/fit, right after images/camera); its other values are
`other/<image>/<metric>`. So the page reads: the mean curves, then per image its pictures
and its curves, then the rest; one section per image and kind, not one per metric.

Everything else in the study (Tune, `--metric`, export, warm start, the report) keeps the
study's names: writes go through `to_mlflow` (study/tracking/courier.py), reads through
`from_mlflow` (study/tracking/store.py), and a key without a group, as studies recorded
before the groups have them, reads as itself.
"""
from __future__ import annotations

import re

QUALITY = re.compile(r"(best_)?(psnr|ssim|loss)")  # the parent's best_psnr_ema too
FIT, IMAGES, OTHER = "fit/", "images/", "other/"
OWN_GROUPS = ("system/", "trial/")


def to_mlflow(name: str) -> str:
    """The MLflow key of the study's metric `name` (`psnr_ema/camera` -> `images/camera/fit/psnr_ema`)."""
    if name.startswith(OWN_GROUPS):
        return name
    metric, _, image = name.partition("/")
    if not QUALITY.match(metric):
        return f"{OTHER}{image}/{metric}" if image else OTHER + metric
    return f"{IMAGES}{image}/{FIT}{metric}" if image else FIT + metric


def image_to_mlflow(name: str) -> str:
    """The MLflow key of an image the study logs (`camera/output` -> `images/camera/output`)."""
    return IMAGES + name


_IMAGE_FIT = re.compile(rf"{IMAGES}(.+)/{FIT}([^/]+)")


def from_mlflow(key: str) -> str:
    """The study's name for MLflow key `key`; a key of a study recorded before the groups
    (no `fit/`, `images/` or `other/`) is its own name."""
    if m := _IMAGE_FIT.fullmatch(key):
        return f"{m[2]}/{m[1]}"
    for group in (FIT, OTHER):
        if key.startswith(group):
            image, _, metric = key[len(group):].rpartition("/")
            return f"{metric}/{image}" if image else metric
    return key


def mlflow_keys(name: str) -> tuple[str, str]:
    """Where a run may hold metric `name`: its key now, and the key of a study recorded
    before the groups (the same for `system/` and `trial/` keys)."""
    return to_mlflow(name), name
