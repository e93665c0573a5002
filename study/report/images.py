"""The report's images: each image's brightness, its observations exactly as the trials drew
them, the classical baseline on those (BM3D for denoising, bicubic for super-resolution),
and the grid of the best configuration's output next to the observation and the clean image.
Used by study/report/document.py; it never imports the report.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

from study.config import TrialConfig
from study.engine import images as img
from study.engine.metrics import psnr, ssim


@dataclass
class ImageFacts:
    label: str
    spec: str
    brightness: float          # mean of the clean image at the study's size, in [0, 1]
    observation_psnr: float    # mean over repeats
    baseline_psnr: float | None
    baseline_ssim: float | None
    clean: torch.Tensor
    observation: torch.Tensor  # repeat 0: the one the trial's logged images show
    baseline: torch.Tensor | None
    baseline_psnrs: tuple[float, ...] = ()  # per repeat (seed + r), for paired comparisons


def _baseline(y: img.Degraded, cfg: TrialConfig) -> torch.Tensor | None:
    """BM3D (Dabov et al. 2007; PyPI bm3d) on the noisy image, bicubic for sr, none else."""
    if cfg.task == "sr":
        return y.input_image  # the bicubic upsampling of the low-res observation
    if cfg.task != "denoise":
        return None
    import bm3d

    z = y.observation[0].permute(1, 2, 0).double().numpy()
    out = bm3d.bm3d_rgb(z, cfg.sigma) if z.shape[2] == 3 else bm3d.bm3d(z[:, :, 0], cfg.sigma)
    out = torch.from_numpy(out.reshape(z.shape)).float()
    return out.permute(2, 0, 1)[None].clamp(0, 1)


def image_facts(base: TrialConfig, baseline: bool) -> list[ImageFacts]:
    """Each image's observations exactly as the trials drew them (repeat r of image j:
    seed + r + j * SEED_STRIDE, see study/engine/pack.py), and the baseline on the same ones."""
    from study.engine.pack import SEED_STRIDE, unique_labels

    specs = img.expand_images(base.images)
    out = []
    for j, (spec, label) in enumerate(zip(specs, unique_labels(specs), strict=True)):
        clean = img.load_image(spec, base.size, base.color)
        obs_p, base_p, base_s, first, first_b = [], [], [], None, None
        for r in range(getattr(base, "repeats", 1)):
            g = torch.Generator().manual_seed(base.seed + r + j * SEED_STRIDE)
            y = img.degrade(clean, base, g)
            b = _baseline(y, base) if baseline else None
            obs_p.append(psnr(y.input_image, clean))
            if b is not None:
                base_p.append(psnr(b, clean))
                base_s.append(ssim(b, clean))
            if r == 0:
                first, first_b = y.observation if base.task != "sr" else y.input_image, b
        out.append(ImageFacts(label, spec, float(clean.mean()), statistics.fmean(obs_p),
                              statistics.fmean(base_p) if base_p else None,
                              statistics.fmean(base_s) if base_s else None, clean, first, first_b,
                              tuple(base_p)))
    return out


def best_grid(facts: list[ImageFacts], best_images: list[torch.Tensor | None], path: Path) -> None:
    """Per image one row: observation | best configuration's output | baseline | clean; no
    baseline column when no image has one (report --no-baseline, or a task without one)."""
    tiles, with_baseline = [], any(f.baseline is not None for f in facts)
    for f, out in zip(facts, best_images, strict=True):
        row = [f.observation, out, *([f.baseline] if with_baseline else []), f.clean]
        tiles += [(t if t is not None else torch.zeros_like(f.clean)).expand(1, 3, -1, -1) for t in row]
    k = max(1, 128 // tiles[0].shape[-1])  # small study images shown at >= 128 px, pixels kept
    tiles = [torch.nn.functional.interpolate(t, scale_factor=k, mode="nearest")[0] for t in tiles]
    img.save_png(tile_grid(tiles, 4 if with_baseline else 3)[None], path)


def tile_grid(tiles: list[torch.Tensor], ncol: int, pad: int = 2) -> torch.Tensor:
    """(C, H, W) tiles of one shape, row by row, `pad` white pixels around and between them:
    torchvision.utils.make_grid's layout, without importing torchvision (2 s at the end of
    every study, most of it torch._dynamo)."""
    c, h, w = tiles[0].shape
    rows = -(-len(tiles) // ncol)
    grid = torch.ones(c, rows * (h + pad) + pad, ncol * (w + pad) + pad)
    for i, t in enumerate(tiles):
        top, left = pad + (i // ncol) * (h + pad), pad + (i % ncol) * (w + pad)
        grid[:, top:top + h, left:left + w] = t
    return grid


def best_output(uri: str, run_id: str, label: str, several: bool) -> torch.Tensor | None:
    """The best trial's final output average as logged (its last output if it has none)."""
    from study.tracking import store as tracking

    pre = f"{label}/" if several else ""
    a = tracking.run_image(uri, run_id, f"{pre}output_ema")
    a = a if a is not None else tracking.run_image(uri, run_id, f"{pre}output")
    return None if a is None else torch.from_numpy(a.astype("float32") / 255.0).permute(2, 0, 1)[None]


def save_figure(fig: Figure, ax: Axes, path: Path, legend_outside: bool = False) -> None:
    """Every report figure ends alike: small legend (beside the axes where points would hide
    under it), light grid, 110 dpi, cropped to what was drawn (long tick labels are not cut)."""
    import matplotlib.pyplot as plt

    if legend_outside:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    else:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
