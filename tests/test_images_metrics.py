"""Tests of study/engine/images.py (loading, tasks) and study/engine/metrics.py (PSNR, SSIM)."""

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.metrics import structural_similarity

from study.engine import images as img
from study.config import BUNDLED_IMAGES, TrialConfig
from study.engine.metrics import psnr, psnr_batch, psnr_skimage, ssim

RGB_IMAGES = {"astronaut", "chelsea", "coffee", "colorwheel", "hubble_deep_field",
              "immunohistochemistry", "logo", "retina", "rocket"}


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def write_png(path, array):
    Image.fromarray(array).save(path)
    return str(path)


# --- loading ----------------------------------------------------------------------

@pytest.mark.parametrize("name", BUNDLED_IMAGES)
def test_bundled_image_loads_offline(name):
    x = img.load_image(name, 32)
    assert x.shape == (1, 3 if name in RGB_IMAGES else 1, 32, 32)
    assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1 and x.max() > x.min()


@pytest.mark.parametrize("name", ["camera", "astronaut", "logo"])
def test_color_conversions(name):
    assert img.load_image(name, 32, "gray").shape == (1, 1, 32, 32)
    rgb = img.load_image(name, 32, "rgb")
    assert rgb.shape == (1, 3, 32, 32)


def test_logo_alpha_is_dropped():
    assert img.load_image("logo", 32).shape[1] == 3


def test_gray_conversion_uses_bt601_luma():
    a = np.zeros((32, 32, 3), np.uint8)
    a[..., 0] = 255  # pure red
    x = img._to_unit(a)
    assert torch.allclose(img._convert(x, "gray"), torch.full((1, 1, 32, 32), 0.299))


def test_png_file_loads_with_its_pixels(tmp_path):
    a = np.full((40, 48), 128, np.uint8)
    x = img.load_image(write_png(tmp_path / "g.png", a), 32)
    assert x.shape == (1, 1, 32, 32)
    assert torch.allclose(x, torch.full_like(x, 128 / 255), atol=1e-6)


def test_rgba_png_drops_alpha_and_centre_crops(tmp_path):
    a = np.zeros((32, 64, 4), np.uint8)
    a[:, 16:48, 1] = 255  # the centre square is green; alpha left at 0
    x = img.load_image(write_png(tmp_path / "c.png", a), 32)
    assert x.shape == (1, 3, 32, 32)
    assert torch.equal(x[0, 1], torch.ones(32, 32)) and x[0, [0, 2]].max() == 0


def test_16_bit_png_keeps_its_range(tmp_path):
    a = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    x = img.load_image(write_png(tmp_path / "deep.png", a), 32)
    assert x.shape == (1, 1, 32, 32)
    assert abs(float(x.mean()) - 0.5) < 0.01 and float(x.min()) == 0.0


def test_folder_expands_to_sorted_images(tmp_path):
    for name in ("b.png", "a.png", "c.jpg"):
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / name)
    (tmp_path / "readme.txt").write_text("skip me")
    specs = img.expand_images((str(tmp_path), "camera"))
    assert specs == [str(tmp_path / n) for n in ("a.png", "b.png", "c.jpg")] + ["camera"]
    assert [img.image_label(s) for s in specs] == ["a", "b", "c", "camera"]
    for s in specs:
        assert img.load_image(s, 16).shape[-2:] == (16, 16)


def test_image_smaller_than_size_raises(tmp_path):
    path = write_png(tmp_path / "small.png", np.zeros((20, 30), np.uint8))
    with pytest.raises(ValueError, match=r"30x20, smaller than size = 32"):
        img.load_image(path, 32)
    with pytest.raises(ValueError, match="smaller than size"):
        img.preflight(TrialConfig(images=(path,), size=32, scales=2))


def test_corrupt_png_raises_value_error(tmp_path):
    (tmp_path / "garbage.png").write_bytes(b"this is not a png")
    with pytest.raises(ValueError, match="cannot read image .*garbage.png"):
        img.load_image(str(tmp_path / "garbage.png"), 16)


def test_truncated_png_raises_value_error(tmp_path):
    path = write_png(tmp_path / "full.png", np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8))
    data = open(path, "rb").read()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot read image .*cut.png"):
        img.preflight(TrialConfig(images=(str(tmp_path),), size=32, scales=2))


def test_save_png_round_trip(tmp_path):
    x = img.load_image("astronaut", 32)
    img.save_png(x, tmp_path / "o.png")
    assert torch.allclose(img.load_image(str(tmp_path / "o.png"), 32), x, atol=1 / 255)


# --- tasks --------------------------------------------------------------------------

def task_cfg(**kw):
    return TrialConfig(**{"size": 64, "scales": 2, **kw})


def test_denoise_is_seeded():
    clean = img.load_image("camera", 64)
    y0 = img.degrade(clean, task_cfg(), gen(0)).observation
    assert torch.equal(y0, img.degrade(clean, task_cfg(), gen(0)).observation)
    assert not torch.equal(y0, img.degrade(clean, task_cfg(), gen(1)).observation)


def test_denoise_noise_has_the_configured_std():
    clean = torch.full((1, 1, 64, 64), 0.5)  # far from 0 and 1: clipping does not bite
    d = img.degrade(clean, task_cfg(sigma=25 / 255), gen(0))
    assert d.mask is None and torch.equal(d.observation, d.input_image)
    assert abs(float((d.observation - clean).std()) - 25 / 255) < 0.005
    assert abs(float((d.observation - clean).mean())) < 0.005


def test_inpaint_mask_hides_missing_fraction():
    clean = img.load_image("astronaut", 64)
    d = img.degrade(clean, task_cfg(task="inpaint", missing=0.3), gen(0))
    hidden = 1 - float(d.mask[0, 0].mean())
    assert abs(hidden - 0.3) < 0.05
    assert torch.equal(d.mask[0, 0], d.mask[0, 1])  # one mask for all channels
    assert torch.equal(d.observation, clean * d.mask)
    out = torch.rand(clean.shape, generator=gen(1))
    pred = d.forward_op(out)
    assert torch.all(pred[d.mask == 0] == 0) and torch.equal(pred[d.mask == 1], out[d.mask == 1])


def test_sr_observation_is_low_resolution():
    clean = img.load_image("camera", 64)
    d = img.degrade(clean, task_cfg(task="sr", sr_factor=4), gen(0))
    assert d.observation.shape == (1, 1, 16, 16) and d.input_image.shape == (1, 1, 64, 64)
    out = torch.rand(clean.shape, generator=gen(1))
    assert d.forward_op(out).shape == d.observation.shape
    assert torch.allclose(d.forward_op(clean).clamp(0, 1), d.observation)


def test_reconstruct_observation_is_clean():
    clean = img.load_image("camera", 64)
    d = img.degrade(clean, task_cfg(task="reconstruct"), gen(0))
    assert torch.equal(d.observation, clean) and torch.equal(d.forward_op(clean), clean)


def test_degraded_to_keeps_everything():
    clean = img.load_image("camera", 32)
    d = img.degrade(clean, task_cfg(task="inpaint", size=32), gen(0)).to("cpu")
    assert d.mask is not None and d.sr_factor == 1 and torch.equal(d.clean, clean)


# --- metrics ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def noisy_camera():
    """docs/science.md's sanity case: camera 128 gray, sigma 25/255, seed 0."""
    cfg = TrialConfig(size=128, color="gray", sigma=25 / 255)
    clean = img.load_image("camera", 128, "gray")
    return clean, img.degrade(clean, cfg, gen(0)).observation


def test_golden_psnr_ssim_of_noisy_camera(noisy_camera):
    clean, y = noisy_camera
    assert psnr(y, clean) == pytest.approx(20.545, abs=0.01)
    assert ssim(y, clean) == pytest.approx(0.359, abs=0.01)


@pytest.mark.parametrize("name", ["camera", "astronaut"])
def test_psnr_matches_skimage(name):
    clean = img.load_image(name, 32)
    for seed in range(3):
        x = (clean + 0.1 * torch.randn(clean.shape, generator=gen(seed))).clamp(0, 1)
        assert psnr(x, clean) == pytest.approx(psnr_skimage(x, clean), abs=1e-9)


def test_psnr_batch_is_each_images_psnr():
    clean = img.load_image("astronaut", 32).repeat(3, 1, 1, 1)
    x = (clean + 0.1 * torch.randn(clean.shape, generator=gen(0))).clamp(0, 1)
    batch = psnr_batch(x, clean)
    assert batch.dtype == torch.float64 and batch.shape == (3,)
    for k in range(3):
        assert batch[k].item() == pytest.approx(psnr_skimage(x[k:k + 1], clean[k:k + 1]), abs=1e-9)
    with pytest.raises(ValueError, match="one shape"):
        psnr_batch(x, clean[:2])


def test_identical_images():
    clean = img.load_image("astronaut", 32)
    assert ssim(clean, clean) == pytest.approx(1.0)
    assert psnr(clean, clean) > 100


def test_ssim_of_noise_is_small_unlike_data_range_255(noisy_camera):
    clean, _ = noisy_camera
    noise = torch.rand(clean.shape, generator=gen(3))
    assert ssim(noise, clean) < 0.1
    # The original experiment's trap: data_range = 255 on [0, 1] images scores noise ~0.99.
    trap = structural_similarity(clean[0, 0].double().numpy(), noise[0, 0].double().numpy(),
                                 data_range=255)
    assert trap > 0.9


def test_metrics_refuse_mismatched_shapes():
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(torch.zeros(1, 1, 16, 16), torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match=r"\(1, C, H, W\)"):
        ssim(torch.zeros(1, 16, 16), torch.zeros(1, 16, 16))
