"""models/: the DIP skip network matches the reference's size; both networks run on CPU."""
import pytest
import torch

from models import (
    NETWORKS, Skip, SkipSpec, UNet, UNetSpec, build_network, count_parameters,
    reference_spec,
)


def small_skip(**changes) -> Skip:
    spec = dict(
        in_channels=3, out_channels=3, channels_down=(8,) * 3, channels_up=(8,) * 3,
        channels_skip=(4,) * 3,
    )
    return Skip(SkipSpec(**{**spec, **changes}))


# Measured on the reference code: skip(32, 3, [128]*5, [128]*5, [4]*5, bilinear, reflection).
@pytest.mark.parametrize("out_channels, expected", [(3, 2_217_831), (1, 2_217_573)])
def test_reference_parameter_count(out_channels, expected):
    assert count_parameters(Skip(reference_spec(32, out_channels))) == expected


def test_reference_forward_shape():
    net = Skip(reference_spec()).eval()
    with torch.no_grad():
        y = net(torch.rand(1, 32, 64, 64) * 0.1)
    assert y.shape == (1, 3, 64, 64)


@pytest.mark.parametrize("upsample", ["bilinear", "nearest"])
@pytest.mark.parametrize("skip_channels", [4, 0])
def test_small_skip_forward(upsample, skip_channels):
    net = small_skip(upsample=upsample, channels_skip=(skip_channels,) * 3)
    y = net(torch.rand(1, 3, 32, 32))
    assert y.shape == (1, 3, 32, 32)
    assert y.min() > 0 and y.max() < 1
    y.mean().backward()  # gradients reach the input end of the network
    assert net.body.down[0][0].weight.grad is not None


def test_zero_pad_and_no_sigmoid():
    net = small_skip(pad="zero", need_sigmoid=False, need1x1_up=False)
    assert net(torch.rand(2, 3, 16, 16)).shape == (2, 3, 16, 16)


def test_skip_spec_takes_lists():
    spec = SkipSpec(3, 3, [8, 8], [8, 8], [4, 4])
    assert spec.channels_down == (8, 8) and spec.scales == 2
    hash(spec)


@pytest.mark.parametrize("changes, message", [
    (dict(channels_up=(8, 8)), "one entry per scale"),
    (dict(channels_down=(), channels_up=(), channels_skip=()), "one entry per scale"),
    (dict(channels_down=(8, 0, 8)), "must be positive"),
    (dict(channels_skip=(4, -1, 4)), "non-negative"),
    (dict(upsample="bicubic"), "unknown upsample 'bicubic'"),
    (dict(pad="replicate"), "unknown pad 'replicate'"),
    (dict(filter_size=4), "positive odd"),
    (dict(in_channels=0), "must be positive"),
])
def test_skip_spec_rejects(changes, message):
    with pytest.raises(ValueError, match=message):
        small_skip(**changes)


def test_unet_forward():
    net = UNet(UNetSpec(1, 1, base_channels=8, scales=3))
    y = net(torch.rand(1, 1, 32, 32))
    assert y.shape == (1, 1, 32, 32)
    assert y.min() > 0 and y.max() < 1


def test_unet_spec_rejects():
    with pytest.raises(ValueError, match="scales must be at least 1"):
        UNetSpec(1, 1, scales=0)
    with pytest.raises(ValueError, match="unknown upsample"):
        UNetSpec(1, 1, upsample="bicubic")


@pytest.mark.parametrize("name", NETWORKS)
def test_build_network(name):
    net = build_network(name, 2, 1, scales=2, channels=8, skip_channels=4, upsample="nearest")
    assert net(torch.rand(1, 2, 16, 16)).shape == (1, 1, 16, 16)


def test_build_network_skip_matches_reference():
    net = build_network("skip", 32, 3, scales=5, channels=128, skip_channels=4,
                        upsample="bilinear")
    assert count_parameters(net) == 2_217_831


def test_build_network_unknown_name():
    with pytest.raises(ValueError, match="unknown network 'resnet'; allowed: skip, unet"):
        build_network("resnet", 1, 1, scales=2, channels=8, skip_channels=4,
                      upsample="bilinear")


@pytest.mark.parametrize("name", NETWORKS)
def test_size_not_divisible(name):
    net = build_network(name, 1, 1, scales=3, channels=4, skip_channels=2, upsample="nearest")
    with pytest.raises(ValueError, match=r"24x20 is not divisible by 2\*\*3 = 8"):
        net(torch.rand(1, 1, 24, 20))


def test_too_small_for_reflection():
    # 5 halvings of 32 px leave 1x1 features, which reflection padding cannot pad.
    with pytest.raises(ValueError, match="too small for 5 scales"):
        Skip(reference_spec())(torch.rand(1, 32, 32, 32))


def test_wrong_channels():
    with pytest.raises(ValueError, match="N x 3 x H x W"):
        small_skip()(torch.rand(1, 1, 16, 16))


@pytest.mark.parametrize("name", NETWORKS)
def test_same_seed_same_parameters(name):
    def init(seed):
        torch.manual_seed(seed)
        return build_network(name, 3, 3, scales=2, channels=8, skip_channels=4,
                             upsample="bilinear").state_dict()

    a, b, c = init(0), init(0), init(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
