"""Image files and bundled images as arrays, and the check a study makes of them before it
starts: numpy and PIL only, so the driver does not import torch for it (images.py turns them
into tensors and degrades them).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from study.config import BUNDLED_IMAGES, IMAGE_SUFFIXES, TrialConfig, check_image_spec

if TYPE_CHECKING:
    import torch


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
        import torch

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


def read_array(spec: str) -> np.ndarray:
    """A bundled image or a file's pixels, as stored (any dtype, H x W or H x W x C)."""
    if spec in BUNDLED_IMAGES:
        import skimage.data  # bundled with scikit-image: no download

        return np.asarray(getattr(skimage.data, spec)())
    return read_file(spec).a


def check_size(spec: str, a: np.ndarray, size: int) -> None:
    """An image must be at least size x size once centre-cropped to a square."""
    h, w = a.shape[:2]
    side = min(h, w)
    if side < size:
        raise ValueError(
            f"image {spec!r} is {w}x{h}, smaller than size = {size}; allowed: size <= {side}"
        )


def preflight(cfg: TrialConfig) -> None:
    """Read every image of `cfg` once, so a bad or too small file is refused up front."""
    for spec in expand_images(cfg.images):
        check_size(spec, read_array(spec), cfg.size)
