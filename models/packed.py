"""K networks of one architecture as one computation ("packing").

A network built with `groups=K` holds K independent copies of itself side by side on the
channel axis: every conv is a grouped conv (group k sees only network k's channels), a
BatchNorm over K*C channels is K BatchNorms (for batch 1 its statistics are per channel
anyway), activations, padding and upsampling act per channel, and skip concatenations
join the channels of each network (`group_cat`). So one forward of the packed network on
the K inputs stacked on the channel axis is K separate forwards, and Adam, which is
elementwise, on the packed parameters is K Adams with the same learning rate. On the CPU
the grouped convs run as K groups=1 convs (`set_convs`), so each network rounds exactly
as it would alone.

The state of network k is slice k of every per-channel tensor: `pack_state_dicts` and
`unpack_state_dict` convert between K separate state dicts and the packed one, so each
network keeps its own weights (and a packed network starts from K separately seeded
initialisations).
"""
from __future__ import annotations

from typing import Callable, Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

ReflectImpl = Literal["native", "cat"]
ConvImpl = Literal["grouped", "split"]


def to_channels(x: torch.Tensor) -> torch.Tensor:
    """K inputs (K, C, H, W) -> the packed network's input (1, K*C, H, W)."""
    return rearrange(x, "k c h w -> 1 (k c) h w")


def from_channels(y: torch.Tensor, groups: int) -> torch.Tensor:
    """The packed network's output (1, K*C, H, W) -> K outputs (K, C, H, W)."""
    return rearrange(y, "1 (k c) h w -> k c h w", k=groups)


def group_cat(xs: list[torch.Tensor], groups: int) -> torch.Tensor:
    """Concatenate channels network by network: for groups=1 this is torch.cat(dim=1).

    The channels of network k in each part are joined, in order, and the K results laid
    side by side again. Channels-last tensors are joined on their last memory axis, so
    the result stays channels-last without a copy back."""
    if groups == 1:
        return torch.cat(xs, dim=1)
    if xs[0].is_contiguous(memory_format=torch.channels_last) and xs[0].shape[1] > 1:
        parts = [rearrange(x, "b (k c) h w -> b h w k c", k=groups) for x in xs]
        return rearrange(torch.cat(parts, dim=-1), "b h w k c -> b (k c) h w")
    parts = [rearrange(x, "b (k c) h w -> b k c h w", k=groups) for x in xs]
    return rearrange(torch.cat(parts, dim=2), "b k c h w -> b (k c) h w")


def reflect_pad(x: torch.Tensor, p: int) -> torch.Tensor:
    """Reflection padding (as F.pad(mode='reflect')) from slices and concatenations.

    The same values as the native kernel; its backward is plain slice-adds instead of the
    native backward's scattered atomic adds, and it keeps any memory format."""
    if p == 0:
        return x
    top = x[..., 1 : p + 1, :].flip(-2)
    bottom = x[..., -p - 1 : -1, :].flip(-2)
    x = torch.cat([top, x, bottom], dim=-2)
    left = x[..., :, 1 : p + 1].flip(-1)
    right = x[..., :, -p - 1 : -1].flip(-1)
    return torch.cat([left, x, right], dim=-1)


def _twin(t: torch.Tensor | None, dim: int) -> torch.Tensor | None:
    """t beside a detached copy of itself on `dim`: the phantom second network."""
    return None if t is None else torch.cat([t, t.detach()], dim)


def _split_conv(conv: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                padding: tuple[int, ...] | str) -> torch.Tensor:
    """A grouped conv as one groups=1 conv per group, side by side (see `set_split`)."""
    g = conv.groups
    biases = [None] * g if bias is None else bias.chunk(g)
    ys = [F.conv2d(xi, wi, bi, conv.stride, padding, conv.dilation)
          for xi, wi, bi in zip(x.chunk(g, 1), weight.chunk(g), biases, strict=True)]
    return torch.cat(ys, 1)


class Conv2d(nn.Conv2d):
    """nn.Conv2d whose reflection padding can be computed by `reflect_pad` (reflect="cat"),
    whose groups can run as separate groups=1 convs (split=True, see `set_convs`), and which
    can run as one network of a grouped pair (phantom=True, see `set_phantom`).

    Same parameters and state dict as nn.Conv2d; only how the result is computed differs."""

    reflect: ReflectImpl = "native"
    phantom: bool = False
    split: bool = False

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor,
                      bias: torch.Tensor | None) -> torch.Tensor:
        padding = self.padding
        if self.padding_mode != "zeros":
            ph, pw = self.padding  # type: ignore[misc]
            if self.padding_mode == "reflect" and self.reflect == "cat" and ph == pw:
                x = reflect_pad(x, ph)
            else:
                x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = (0, 0)
        if self.split and self.groups > 1:
            return _split_conv(self, x, weight, bias, padding)
        if not self.phantom:
            return F.conv2d(x, weight, bias, self.stride, padding, self.dilation, self.groups)
        y = F.conv2d(_twin(x, 1), _twin(weight, 0), _twin(bias, 0), self.stride, padding,
                     self.dilation, 2 * self.groups)
        return y[:, : self.out_channels]


def set_reflect(module: nn.Module, impl: ReflectImpl) -> None:
    """Choose how every reflection-padded conv of `module` builds its border."""
    if impl not in ("native", "cat"):
        raise ValueError(f"unknown reflection padding {impl!r}; allowed: native, cat")
    for m in module.modules():
        if isinstance(m, Conv2d):
            m.reflect = impl


def set_phantom(module: nn.Module, on: bool) -> None:
    """Compute every conv of `module` as network 0 of a pack of two whose network 1 is a
    detached copy (its output is dropped, so it is never read and never trained). Used
    with grouped convs only (a GPU's); the CPU's split convs need no twin (`set_convs`).

    Why: with grouped convs a pack of one (groups=1) gets other conv kernels than a pack of K >= 2 (grouped),
    so its numbers differ by rounding, which training amplifies (0.67 dB at iteration 60,
    64 px). On the CPU, PyTorch sends a groups=1 conv of batch 1 under 20480 input values to
    its im2col kernel (Slow2d) and every grouped conv to oneDNN; and oneDNN itself rounds
    a groups=1 conv of 36 input channels other than each group of a grouped one. With this
    a pack of one gets, bit for bit, what network 0 of a pack of two computes (measured
    with one and two threads); whether other pack sizes agree is oneDNN's choice (issue 13:
    with one thread, gray inputs, packs of 2 to 7 agree at the default network).
    The cost is a second network: a pack of one now steps as slowly as a pack of two
    (default network, 64 px, one thread, CPU time: 56 -> 107 ms per iteration; K=2: 112)."""
    for m in module.modules():
        if isinstance(m, Conv2d):
            m.phantom = on


def set_convs(module: nn.Module, impl: ConvImpl) -> None:
    """Choose how every packed conv of `module` runs: one grouped conv ("grouped"), or one
    groups=1 conv per network, side by side ("split").

    Why split: each network of a pack then runs exactly the conv a lone network runs (same
    shapes, so the same kernel and rounding), and every other layer acts per channel, so a
    network's numbers do not depend on how many share its pack, at any pack size or thread
    count, and a pack of one costs one network (no `set_phantom` twin). On the CPU it costs
    no more than the grouped conv (bench/lone_step.py); on a GPU one grouped kernel beats K
    small launches, so the GPU keeps "grouped"."""
    if impl not in ("grouped", "split"):
        raise ValueError(f"unknown conv implementation {impl!r}; allowed: grouped, split")
    for m in module.modules():
        if isinstance(m, Conv2d):
            m.split = impl == "split"


def pack_state_dicts(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """K state dicts of one architecture -> the state dict of the network built with
    groups=K. Per-channel tensors are stacked network-major on their first axis; scalars
    (BatchNorm's num_batches_tracked, equal when the networks step together) are shared."""
    packed = {}
    for key, first in states[0].items():
        ts = [s[key] for s in states]
        packed[key] = first.clone() if first.dim() == 0 else rearrange(
            torch.stack(ts), "k c ... -> (k c) ...")
    return packed


def unpack_state_dict(packed: dict[str, torch.Tensor], groups: int) -> list[dict[str, torch.Tensor]]:
    """The inverse of `pack_state_dicts`: one state dict per network."""
    out: list[dict[str, torch.Tensor]] = [{} for _ in range(groups)]
    for key, t in packed.items():
        parts = [t] * groups if t.dim() == 0 else rearrange(t, "(k c) ... -> k c ...", k=groups)
        for k in range(groups):
            out[k][key] = parts[k].detach().clone()
    return out


def pack_networks(nets: list[nn.Module], build: Callable[[int], nn.Module]) -> nn.Module:
    """One network computing all of `nets`: `build(K)` makes the architecture with
    groups=K, which is then loaded with the K networks' own weights."""
    with torch.random.fork_rng(devices=[]):  # its own initialisation is overwritten
        packed = build(len(nets))
    packed.load_state_dict(pack_state_dicts([n.state_dict() for n in nets]))
    return packed
