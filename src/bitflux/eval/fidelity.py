"""Same-seed fidelity of a variant's images against full precision: PSNR and SSIM (pure functions)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def _as_float(image) -> torch.Tensor:
    """PIL image or uint8 HxWx3 array -> float tensor (1, 3, H, W) in [0, 1]."""
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0)


def psnr(a, b) -> float:
    """Peak signal-to-noise ratio in dB (inf for identical images)."""
    mse = F.mse_loss(_as_float(a), _as_float(b)).item()
    return float("inf") if mse == 0 else 10.0 * np.log10(1.0 / mse)


def ssim(a, b, window: int = 11, sigma: float = 1.5) -> float:
    """Structural similarity (Wang et al. 2004), Gaussian window, averaged over channels and pixels."""
    x, y = _as_float(a), _as_float(b)
    coords = torch.arange(window, dtype=torch.float32) - window // 2
    g = torch.exp(-(coords ** 2) / (2 * sigma ** 2))
    g = (g / g.sum())
    kernel = (g[:, None] * g[None, :]).expand(3, 1, window, window).contiguous()
    blur = lambda t: F.conv2d(t, kernel, groups=3)  # noqa: E731 - valid region only, as the reference does
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x ** 2
    var_y = blur(y * y) - mu_y ** 2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    value = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return value.mean().item()


def fidelity(reference_images, images) -> dict:
    """Mean PSNR and SSIM of images against same-seed reference images (mean_fidelity)."""
    return mean_fidelity([psnr(r, i) for r, i in zip(reference_images, images)],
                         [ssim(r, i) for r, i in zip(reference_images, images)])


def mean_fidelity(psnrs: list[float], ssims: list[float]) -> dict:
    """{"psnr": the mean of the finite PSNRs (identical pairs have none; inf if all are), "ssim": the mean}."""
    finite = [p for p in psnrs if np.isfinite(p)]
    return {"psnr": float(np.mean(finite)) if finite else float("inf"), "ssim": float(np.mean(ssims))}
