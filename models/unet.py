"""A plain UNet, standing in for the original experiment's network.

The original experiment used "a UNet without time embedding, grayscale 128x128"; its code
is lost, so this is an approximation for comparison, not a reproduction: the UNet of
Ronneberger, Fischer, Brox, "U-Net", MICCAI 2015 (double 3x3 conv per level, 2x2 max-pool
down, channels doubling per level, skips concatenated on the way up), with 'same'
padding, BatchNorm, and bilinear upsampling instead of up-convolutions (as the common
milesial/Pytorch-UNet variant), and a sigmoid out so its outputs lie in (0, 1) like the
skip network's. No time embedding: DIP fits one image, there is no diffusion step to
condition on.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .packed import Conv2d, group_cat
from .skip import UPSAMPLES, Upsample, check_input


@dataclass(frozen=True)
class UNetSpec:
    in_channels: int                 # channels of the network input
    out_channels: int                # channels of the image out (1 for the original's gray)
    base_channels: int = 64          # width of the first level, doubled at each level down
    scales: int = 4                  # number of 2x2 max-pool halvings (Ronneberger et al.: 4)
    upsample: Upsample = "bilinear"  # x2 decoder upsampling before each skip concat
    need_sigmoid: bool = True        # squash the output into (0, 1), the range of images

    def __post_init__(self) -> None:
        if min(self.in_channels, self.out_channels, self.base_channels) < 1:
            raise ValueError(
                "in_channels, out_channels and base_channels must be positive, got "
                f"{self.in_channels}, {self.out_channels} and {self.base_channels}"
            )
        if self.scales < 1:
            raise ValueError(f"scales must be at least 1, got {self.scales}")
        if self.upsample not in UPSAMPLES:
            raise ValueError(
                f"unknown upsample '{self.upsample}'; allowed: {', '.join(UPSAMPLES)}"
            )

    def width(self, level: int) -> int:
        """Channels at a level (0 is full resolution): base * 2**level."""
        return self.base_channels * 2 ** level


def _double_conv(c_in: int, c_out: int, g: int = 1) -> nn.Sequential:
    # No conv bias: the BatchNorm right after subtracts any constant offset anyway.
    # g networks side by side (models/packed.py).
    return nn.Sequential(
        Conv2d(c_in * g, c_out * g, 3, padding=1, bias=False, groups=g),
        nn.BatchNorm2d(c_out * g),
        nn.ReLU(inplace=True),
        Conv2d(c_out * g, c_out * g, 3, padding=1, bias=False, groups=g),
        nn.BatchNorm2d(c_out * g),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """Encoder of `scales` max-pool + double-conv steps, mirrored decoder with skips.
    With groups=K, K such networks packed side by side (models/packed.py)."""

    def __init__(self, spec: UNetSpec, groups: int = 1) -> None:
        super().__init__()
        self.spec, self.groups = spec, groups
        g = groups
        self.stem = _double_conv(spec.in_channels, spec.width(0), g)
        self.pool = nn.MaxPool2d(2)
        self.downs = nn.ModuleList(
            _double_conv(spec.width(i - 1), spec.width(i), g) for i in range(1, spec.scales + 1)
        )
        self.upsample = nn.Upsample(scale_factor=2, mode=spec.upsample)
        # Decoder, deepest first: upsampled level i concatenated with the skip of level i - 1.
        self.ups = nn.ModuleList(
            _double_conv(spec.width(i) + spec.width(i - 1), spec.width(i - 1), g)
            for i in range(spec.scales, 0, -1)
        )
        self.head = Conv2d(spec.width(0) * g, spec.out_channels * g, 1, groups=g)
        self.out_act = nn.Sigmoid() if spec.need_sigmoid else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.spec.in_channels * self.groups, self.spec.scales)
        x = self.stem(x)
        skips = []
        for down in self.downs:
            skips.append(x)
            x = down(self.pool(x))
        for up, skip in zip(self.ups, reversed(skips), strict=True):
            x = up(group_cat([skip, self.upsample(x)], self.groups))
        return self.out_act(self.head(x).float())
