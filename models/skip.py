"""The Deep Image Prior encoder-decoder with skip connections ("skip").

Computes what `skip()` in DmitryUlyanov/deep-image-prior (models/skip.py with
models/common.py) computes for downsample_mode="stride" and act_fun="LeakyReLU", the
setting of every reference notebook (Ulyanov, Vedaldi, Lempitsky, "Deep Image Prior",
CVPR 2018, supplementary Fig. 2). The reference grows nested Sequentials through a
monkey-patched `nn.Module.add`; here each scale is one `_Level` module that holds the
next, with the same layers, the same parameter count and the same order of random
initialisation, so one seed gives the reference's initial weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import nn

from .packed import Conv2d, group_cat

Upsample = Literal["bilinear", "nearest"]
Pad = Literal["reflection", "zero"]
UPSAMPLES: tuple[str, ...] = get_args(Upsample)
PADS: tuple[str, ...] = get_args(Pad)


@dataclass(frozen=True)
class SkipSpec:
    in_channels: int                 # channels of the network input (reference: 32 of noise)
    out_channels: int                # channels of the image out (3 for RGB, 1 for gray)
    channels_down: tuple[int, ...]   # per scale, outermost first: width of the encoder convs
    channels_up: tuple[int, ...]     # per scale, outermost first: width of the decoder convs
    channels_skip: tuple[int, ...]   # per scale: width of the skip branch (0: no skip)
    filter_size: int = 3             # kernel of the encoder and decoder convs
    filter_skip_size: int = 1        # kernel of the skip-branch convs
    upsample: Upsample = "bilinear"  # x2 decoder upsampling (denoising notebook: bilinear)
    need1x1_up: bool = True          # add a 1x1 conv + BN + LeakyReLU after each decoder conv
    need_sigmoid: bool = True        # squash the output into (0, 1), the range of images
    need_bias: bool = True           # conv biases (the reference keeps them, BN or not)
    pad: Pad = "reflection"          # conv border: reflection (notebooks) or zero

    def __post_init__(self) -> None:
        # Configs arrive from JSON and Ray as lists; keep the spec hashable.
        for name in ("channels_down", "channels_up", "channels_skip"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        _validate(self)

    @property
    def scales(self) -> int:
        """Number of stride-2 halvings; inputs must have sides divisible by 2**scales."""
        return len(self.channels_down)


def _validate(spec: SkipSpec) -> None:
    if spec.in_channels < 1 or spec.out_channels < 1:
        raise ValueError(
            f"in_channels and out_channels must be positive, got {spec.in_channels} and "
            f"{spec.out_channels}"
        )
    lengths = {len(spec.channels_down), len(spec.channels_up), len(spec.channels_skip)}
    if len(lengths) != 1 or spec.scales < 1:
        raise ValueError(
            "channels_down, channels_up and channels_skip must have one entry per scale "
            f"(same non-zero length), got lengths {len(spec.channels_down)}, "
            f"{len(spec.channels_up)} and {len(spec.channels_skip)}"
        )
    if min(spec.channels_down + spec.channels_up) < 1 or min(spec.channels_skip) < 0:
        raise ValueError(
            "channels_down and channels_up must be positive and channels_skip non-negative, "
            f"got {spec.channels_down}, {spec.channels_up} and {spec.channels_skip}"
        )
    for name in ("filter_size", "filter_skip_size"):
        size = getattr(spec, name)
        if size < 1 or size % 2 == 0:
            # An even kernel with (k - 1) // 2 padding shrinks the image by one pixel.
            raise ValueError(f"{name} must be a positive odd number, got {size}")
    if spec.upsample not in UPSAMPLES:
        raise ValueError(f"unknown upsample '{spec.upsample}'; allowed: {', '.join(UPSAMPLES)}")
    if spec.pad not in PADS:
        raise ValueError(f"unknown pad '{spec.pad}'; allowed: {', '.join(PADS)}")


def reference_spec(in_channels: int = 32, out_channels: int = 3) -> SkipSpec:
    """The network of the reference denoising notebook: 5 scales of 128, skips of 4."""
    return SkipSpec(
        in_channels, out_channels,
        channels_down=(128,) * 5, channels_up=(128,) * 5, channels_skip=(4,) * 5,
        upsample="bilinear", pad="reflection",
    )


def check_input(x: torch.Tensor, in_channels: int, scales: int, min_bottom: int = 1) -> None:
    """Raise ValueError unless x is N x in_channels x H x W with H, W divisible by 2**scales
    and at least min_bottom pixels left after the last halving."""
    if x.dim() != 4 or x.shape[1] != in_channels:
        raise ValueError(
            f"expected an input of shape N x {in_channels} x H x W, got {tuple(x.shape)}"
        )
    multiple = 2 ** scales
    h, w = x.shape[-2:]
    if h % multiple or w % multiple:
        raise ValueError(
            f"input size {h}x{w} is not divisible by 2**{scales} = {multiple}: the network "
            f"halves it {scales} times; resize or crop to a multiple of {multiple}"
        )
    if min(h, w) // multiple < min_bottom:
        raise ValueError(
            f"input size {h}x{w} is too small for {scales} scales: the deepest features "
            f"would be {h // multiple}x{w // multiple}, and reflection padding needs at "
            f"least {min_bottom}x{min_bottom}; use at least {min_bottom * multiple} pixels"
        )


def _conv(spec: SkipSpec, c_in: int, c_out: int, kernel: int, stride: int = 1,
          groups: int = 1) -> nn.Conv2d:
    """common.conv: 'same' padding of (k - 1) // 2; padding_mode='reflect' computes what
    the reference's ReflectionPad2d followed by an unpadded conv computes. `groups`
    networks side by side (see models/packed.py)."""
    mode = "reflect" if spec.pad == "reflection" else "zeros"
    return Conv2d(
        c_in * groups, c_out * groups, kernel, stride, padding=(kernel - 1) // 2,
        padding_mode=mode, bias=spec.need_bias, groups=groups,
    )


def _conv_bn_act(
    spec: SkipSpec, c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1
) -> nn.Sequential:
    # BatchNorm + LeakyReLU(0.2) after every conv but the last, as common.bn / common.act.
    return nn.Sequential(
        _conv(spec, c_in, c_out, kernel, stride, groups),
        nn.BatchNorm2d(c_out * groups),
        nn.LeakyReLU(0.2, inplace=True),
    )


class _Level(nn.Module):
    """Scale i: BN(concat(skip(x), up(inner(down(x))))) -> conv -> [1x1 conv], each + BN + act."""

    def __init__(self, spec: SkipSpec, i: int, c_in: int, groups: int = 1) -> None:
        super().__init__()
        self.groups = g = groups
        c_skip, c_down, c_up = spec.channels_skip[i], spec.channels_down[i], spec.channels_up[i]
        last = i == spec.scales - 1
        # What comes back up from below: the next level's decoder width, or at the bottom
        # this level's own encoder output.
        c_deeper = c_down if last else spec.channels_up[i + 1]
        k = spec.filter_size
        # Built in the reference's order (skip, down, up, then the next level) so a seed
        # draws the same initial weights as the reference.
        self.skip = _conv_bn_act(spec, c_in, c_skip, spec.filter_skip_size, groups=g) if c_skip else None
        self.down = nn.Sequential(
            _conv_bn_act(spec, c_in, c_down, k, 2, g),
            _conv_bn_act(spec, c_down, c_down, k, groups=g),
        )
        # align_corners left at its default (False), as the reference's nn.Upsample.
        self.upsample = nn.Upsample(scale_factor=2, mode=spec.upsample)
        self.merge_bn = nn.BatchNorm2d((c_skip + c_deeper) * g)
        up = [_conv_bn_act(spec, c_skip + c_deeper, c_up, k, groups=g)]
        if spec.need1x1_up:
            up.append(_conv_bn_act(spec, c_up, c_up, 1, groups=g))
        self.up = nn.Sequential(*up)
        self.inner = None if last else _Level(spec, i + 1, c_down, g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        deeper = self.down(x)
        if self.inner is not None:
            deeper = self.inner(deeper)
        deeper = self.upsample(deeper)
        if self.skip is not None:
            # Sides divisible by 2**scales (checked by Skip) make both branches the same
            # size, so the reference's centre crop in Concat never cuts anything.
            deeper = group_cat([self.skip(x), deeper], self.groups)
        return self.up(self.merge_bn(deeper))


class Skip(nn.Module):
    """The DIP "skip" network: nested _Level modules, then a 1x1 conv and a sigmoid.
    With groups=K, K such networks packed side by side (models/packed.py)."""

    def __init__(self, spec: SkipSpec, groups: int = 1) -> None:
        super().__init__()
        self.spec, self.groups = spec, groups
        self.body = _Level(spec, 0, spec.in_channels, groups)
        self.head = _conv(spec, spec.channels_up[0], spec.out_channels, 1, groups=groups)
        self.out_act = nn.Sigmoid() if spec.need_sigmoid else nn.Identity()
        # Reflection padding by p needs more than p pixels to reflect, also at the bottom.
        pad = (spec.filter_size - 1) // 2
        self._min_bottom = pad + 1 if spec.pad == "reflection" else 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.spec.in_channels * self.groups, self.spec.scales, self._min_bottom)
        # float(): under bf16 autocast the sigmoid and everything after it stay float32.
        return self.out_act(self.head(self.body(x)).float())
