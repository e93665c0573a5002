"""Where a trial runs, as tags of its MLflow run: the GPU ids Ray assigned it, its node, and
the device it trains on; and the one case where that device is not what the trial holds.

`device: auto` trains on CUDA where torch finds it, else on the CPU. A trial that Ray gave
a GPU and that finds no CUDA (logical GPUs, `ray start --num-gpus=N` on a CPU machine, or a
broken driver on a real GPU node) would train on the CPU without a word: it says so in one
line of its log and in a tag, and reports it, so the study's summary counts such trials.
An explicit `device: cpu` is the user's choice and is not a fallback.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

import ray

if TYPE_CHECKING:  # the driver imports this module for FALLBACK_KEY, before it needs torch
    import torch

FALLBACK_TAG = "dip.device_fallback"
FALLBACK_KEY = "device_fallback"  # in a trial's results (1.0): the driver counts them (tune.fit)


@dataclass(frozen=True)
class Placement:
    """What Ray gave the trial's worker."""

    gpu_ids: tuple[str, ...]     # ray.get_gpu_ids(): the node's GPU ids as Ray numbers them
    node_id: str
    node_ip: str
    visible: str | None          # CUDA_VISIBLE_DEVICES as Ray set it for the worker

    def fell_back(self, asked: str, device: torch.device) -> bool:
        """`device: auto` on the CPU although Ray assigned a GPU."""
        return asked == "auto" and bool(self.gpu_ids) and device.type == "cpu"

    def tags(self, device: torch.device, fell_back: bool) -> dict[str, str]:
        tags = {"dip.gpu_ids": ",".join(self.gpu_ids) or "none", "dip.node_id": self.node_id,
                "dip.node_ip": self.node_ip, "dip.cuda_visible_devices": _shown(self.visible),
                "dip.device": str(device)}
        return {**tags, FALLBACK_TAG: "true"} if fell_back else tags

    def warning(self) -> str:
        ids = ",".join(self.gpu_ids)
        return (f"warning: Ray assigned GPU {ids} to this trial (CUDA_VISIBLE_DEVICES={self.visible!r}) "
                "but torch finds no CUDA device (no GPU behind the id, or a broken driver); "
                f"device auto trains on the CPU (tag {FALLBACK_TAG})")


def current() -> Placement:
    """The calling worker's placement (inside a Ray task or actor only)."""
    return Placement(gpu_ids=tuple(str(i) for i in ray.get_gpu_ids()),
                     node_id=ray.get_runtime_context().get_node_id(),
                     node_ip=ray.util.get_node_ip_address(),
                     visible=os.environ.get("CUDA_VISIBLE_DEVICES"))


def _shown(visible: str | None) -> str:
    return "unset" if visible is None else visible or "empty"


def placement_tags(asked: str, device: torch.device) -> tuple[dict[str, str], bool]:
    """The trial's placement tags, and whether it fell back (then it has said so)."""
    place = current()
    fell_back = place.fell_back(asked, device)
    if fell_back:
        print(place.warning(), file=sys.stderr, flush=True)
    return place.tags(device, fell_back), fell_back
