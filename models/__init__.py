"""Networks a trial can fit: the DIP reference "skip" and a plain UNet for comparison.

Imports only torch (and this package), so `study/` can use it and tests run without Ray.
"""
from __future__ import annotations

from torch import nn

from .packed import pack_networks, set_reflect
from .skip import Skip, SkipSpec, check_input, reference_spec
from .unet import UNet, UNetSpec

__all__ = [
    "NETWORKS", "Skip", "SkipSpec", "UNet", "UNetSpec",
    "build_network", "check_input", "count_parameters", "pack_networks", "reference_spec",
    "set_reflect",
]

NETWORKS: tuple[str, ...] = ("skip", "unet")


def build_network(
    name: str, in_channels: int, out_channels: int, *,
    scales: int, channels: int, skip_channels: int, upsample: str, groups: int = 1,
) -> nn.Module:
    """A network by name, with the same width at every scale (as the DIP notebooks).

    skip: the DIP encoder-decoder, `channels` down and up and `skip_channels` per skip.
    unet: a UNet starting at `channels` and doubling per level; it has no skip branch of
    its own width, so `skip_channels` does not apply.
    groups=K: K such networks packed into one (see models/packed.py).
    """
    if name == "skip":
        return Skip(SkipSpec(
            in_channels, out_channels,
            channels_down=(channels,) * scales, channels_up=(channels,) * scales,
            channels_skip=(skip_channels,) * scales, upsample=upsample,
        ), groups)
    if name == "unet":
        return UNet(UNetSpec(
            in_channels, out_channels, base_channels=channels, scales=scales, upsample=upsample,
        ), groups)
    raise ValueError(f"unknown network '{name}'; allowed: {', '.join(NETWORKS)}")


def count_parameters(module: nn.Module) -> int:
    """Learnable parameters (conv and BatchNorm weights); BN running stats are buffers."""
    return sum(p.numel() for p in module.parameters())
