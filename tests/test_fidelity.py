import numpy as np
import pytest

from bitflux.eval.fidelity import fidelity, psnr, ssim


def _image(seed, shape=(32, 32, 3)):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_identical_images():
    a = _image(0)
    assert psnr(a, a) == float("inf") and ssim(a, a) == pytest.approx(1.0)


def test_known_psnr():
    a = np.full((16, 16, 3), 100, np.uint8)
    b = a + 10  # mse = (10/255)^2
    assert psnr(a, b) == pytest.approx(20 * np.log10(255 / 10), rel=1e-5)


def test_more_noise_lower_scores():
    a = _image(0).astype(np.int16)
    noise = np.random.default_rng(1).normal(0, 1, a.shape)
    small = np.clip(a + 5 * noise, 0, 255).astype(np.uint8)
    large = np.clip(a + 40 * noise, 0, 255).astype(np.uint8)
    a = a.astype(np.uint8)
    assert psnr(a, small) > psnr(a, large) and ssim(a, small) > ssim(a, large)
    assert fidelity([a, a], [small, large])["psnr"] == pytest.approx((psnr(a, small) + psnr(a, large)) / 2)
