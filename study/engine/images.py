"""Images and the restoration tasks: a clean image, what the method is given, and how
its output is compared with what it is given.

Images are float tensors of shape (1, C, H, W) in [0, 1], C = 1 (gray) or 3 (RGB).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from study.config import TrialConfig
# Reading files needs no torch (imagefiles.py, what a driver's preflight uses); re-exported here.
from study.engine.imagefiles import (Pixels, check_size, expand_images, image_label,  # noqa: F401
                                     preflight, read_array, read_file)


def _to_unit(a: np.ndarray) -> torch.Tensor:
    """HxW or HxWxC array of any dtype -> (1, C, H, W) float32 in [0, 1]."""
    if a.dtype == bool:
        a = a.astype(np.float32)
    elif np.issubdtype(a.dtype, np.integer):
        a = a.astype(np.float32) / np.iinfo(a.dtype).max
    else:
        a = a.astype(np.float32)
        a = (a - a.min()) / max(float(a.max() - a.min()), 1e-12) if a.max() > 1 or a.min() < 0 else a
    if a.ndim == 2:
        a = a[:, :, None]
    if a.shape[2] == 4:  # drop alpha
        a = a[:, :, :3]
    return torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)[None].clamp(0, 1)


def _convert(x: torch.Tensor, color: str) -> torch.Tensor:
    if color == "gray" and x.shape[1] == 3:
        # ITU-R BT.601 luma, as PIL's "L" (skimage.color.rgb2gray uses BT.709 weights).
        w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        return (x * w).sum(1, keepdim=True)
    if color == "rgb" and x.shape[1] == 1:
        return x.repeat(1, 3, 1, 1)
    return x


def load_image(spec: str, size: int, color: str = "auto") -> torch.Tensor:
    """Centre-crop to a square and resize (antialiased) to size x size."""
    a = read_array(spec)
    check_size(spec, a, size)
    x = _convert(_to_unit(a), color)
    h, w = x.shape[-2:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    x = x[..., top : top + side, left : left + side]
    if side != size:
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return x.clamp(0, 1).contiguous()


@dataclass
class Degraded:
    """What a task hands the method, and how an output is compared with it."""

    clean: torch.Tensor | None  # ground truth, used only for metrics (None: a user's image in `apply`)
    observation: torch.Tensor   # what the loss compares against (low-res for sr)
    input_image: torch.Tensor   # the observation at output resolution: DDPM inputs start here
    mask: torch.Tensor | None   # inpaint: 1 where the pixel is known
    sr_factor: int = 1

    def forward_op(self, out: torch.Tensor) -> torch.Tensor:
        """Map a network output to the observation's space (the loss is taken there):
        downsampled for sr, and masked where a mask marks the known pixels (inpaint; in
        `apply` also the padding)."""
        if self.sr_factor > 1:
            out = downsample(out, self.sr_factor)
        if self.mask is not None:
            out = out * self.mask
        return out

    def to(self, device: torch.device | str) -> "Degraded":
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Degraded(mv(self.clean), mv(self.observation), mv(self.input_image),
                        mv(self.mask), self.sr_factor)


def downsample(x: torch.Tensor, factor: int) -> torch.Tensor:
    # Antialiased bicubic (differentiable) stands in for the reference's Lanczos kernel.
    h, w = x.shape[-2:]
    return F.interpolate(x, size=(h // factor, w // factor), mode="bicubic",
                         antialias=True, align_corners=False)


def upsample(x: torch.Tensor, factor: int) -> torch.Tensor:
    return F.interpolate(x, scale_factor=factor, mode="bicubic", align_corners=False).clamp(0, 1)


def degrade(clean: torch.Tensor, cfg: TrialConfig, generator: torch.Generator) -> Degraded:
    """The observation of `cfg.task`, drawn with `generator` (seeded: same seed, same y)."""
    if cfg.task == "denoise":
        eps = torch.randn(clean.shape, generator=generator, device=clean.device)
        y = (clean + cfg.sigma * eps).clamp(0, 1)
        return Degraded(clean, y, y, None)
    if cfg.task == "inpaint":
        u = torch.rand((1, 1, *clean.shape[-2:]), generator=generator, device=clean.device)
        mask = (u >= cfg.missing).to(clean.dtype).expand_as(clean).contiguous()
        y = clean * mask
        return Degraded(clean, y, y, mask)
    if cfg.task == "sr":
        y = downsample(clean, cfg.sr_factor).clamp(0, 1)
        return Degraded(clean, y, upsample(y, cfg.sr_factor), None, cfg.sr_factor)
    # reconstruct: the original experiment fits the clean image itself; the only task
    # where the observation is the ground truth.
    return Degraded(clean, clean, clean, None)


def save_png(x: torch.Tensor, path: str | Path) -> None:
    a = (x.detach().float().cpu().clamp(0, 1)[0].permute(1, 2, 0).numpy() * 255).round()
    a = a.astype(np.uint8)
    Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a).save(path)


def to_hwc(x: torch.Tensor) -> np.ndarray:
    """(1, C, H, W) -> H x W x C float32 numpy array in [0, 1] (for MLflow images)."""
    return x.detach().float().cpu().clamp(0, 1)[0].permute(1, 2, 0).numpy()
