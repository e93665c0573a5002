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

from study.config import BUNDLED_IMAGES, IMAGE_SUFFIXES, TrialConfig, check_image_spec


def expand_images(specs: tuple[str, ...]) -> list[str]:
    """Bundled names and files as given; folders replaced by their PNG/JPEG files, sorted."""
    out: list[str] = []
    for spec in specs:
        check_image_spec(spec)
        p = Path(spec)
        if spec not in BUNDLED_IMAGES and p.is_dir():
            out += sorted(str(q) for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES)
        else:
            out.append(spec)
    return out


def image_label(spec: str) -> str:
    """A short name for metrics and files: the bundled name or the file's stem."""
    return spec if spec in BUNDLED_IMAGES else Path(spec).stem


@dataclass
class Pixels:
    """An image file's pixels and what it takes to write a result back alike."""

    a: np.ndarray                 # H x W (gray) or H x W x 3, float32 in [0, 1]
    mode: str                     # PIL mode to write: L, RGB, RGBA, LA or I;16
    alpha: np.ndarray | None      # the alpha channel (H x W, uint8)

    @property
    def x(self) -> torch.Tensor:
        """(1, C, H, W) float32 in [0, 1]."""
        a = self.a[:, :, None] if self.a.ndim == 2 else self.a
        return torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)[None].clamp(0, 1)


def read_file(path: str | Path) -> Pixels:
    """A PNG/JPEG/TIFF file as gray or RGB in [0, 1], its alpha apart; 16-bit gray keeps
    its 16 bits (convert("RGB") would clip every value above 255 to white)."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode.startswith("I"):  # "I;16", "I;16B", "I;16L" or "I"
                return Pixels(np.asarray(im).astype(np.float32) / 65535.0, "I;16", None)
            if im.mode == "P":  # a palette image comes back as RGB(A)
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            alpha = np.asarray(im.getchannel("A")) if "A" in im.getbands() else None
            gray = im.mode in ("1", "L", "LA")
            a = np.asarray(im.convert("L" if gray else "RGB")).astype(np.float32) / 255.0
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read image {str(path)!r}: {e}") from None
    mode = ("LA" if alpha is not None else "L") if gray else ("RGBA" if alpha is not None else "RGB")
    return Pixels(a, mode, alpha)


def _read(spec: str) -> np.ndarray:
    if spec in BUNDLED_IMAGES:
        import skimage.data  # bundled with scikit-image: no download

        return np.asarray(getattr(skimage.data, spec)())
    return read_file(spec).a


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
    x = _convert(_to_unit(_read(spec)), color)
    h, w = x.shape[-2:]
    side = min(h, w)
    if side < size:
        raise ValueError(
            f"image {spec!r} is {w}x{h}, smaller than size = {size}; allowed: size <= {side}"
        )
    top, left = (h - side) // 2, (w - side) // 2
    x = x[..., top : top + side, left : left + side]
    if side != size:
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return x.clamp(0, 1).contiguous()


def preflight(cfg: TrialConfig) -> None:
    """Read every image of `cfg` once, so a bad or too small file is refused up front."""
    for spec in expand_images(cfg.images):
        load_image(spec, cfg.size, cfg.color)


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
