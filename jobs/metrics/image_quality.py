"""Per-image PSNR and SSIM for reconstructions (SPEC "rFID" row: also PSNR, SSIM).

Both take float images [B, 3, H, W] in [0, 1] (the uint8-rounded reconstruction / 255, so the
numbers describe what is stored, like the FID features). SSIM is Wang et al. 2004: 11x11 Gaussian
window, sigma 1.5, K1 0.01, K2 0.03, data range 1, per channel, valid region, averaged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def psnr(images: torch.Tensor, recon: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """[B] PSNR in dB; identical images give +inf (callers cap it when averaging)."""
    mse = (images.double() - recon.double()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(data_range**2 / mse)


def _gaussian_window(size: int, sigma: float, channels: int, dtype, device) -> torch.Tensor:
    coords = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim(
    images: torch.Tensor, recon: torch.Tensor, data_range: float = 1.0, window: int = 11, sigma: float = 1.5
) -> torch.Tensor:
    """[B] mean SSIM; the window shrinks to the image for images smaller than 11 px."""
    x, y = images.double(), recon.double()
    channels = x.shape[1]
    window = min(window, x.shape[-1], x.shape[-2])
    w = _gaussian_window(window, sigma, channels, x.dtype, x.device)

    def blur(t):
        return F.conv2d(t, w, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    score = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return score.flatten(1).mean(1)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats -> uint8, clamped and rounded (SPEC "rFID": reconstructions clamped and rounded)."""
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
