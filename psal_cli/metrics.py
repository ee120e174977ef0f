"""Image quality metrics used by `psal eval`, as the protocols in shared/data/README.md define them."""

from __future__ import annotations

import math

from torch import Tensor

from psal_cli.blur import gaussian_blur


def rgb_to_y(rgb: Tensor) -> Tensor:
    """ITU-R BT.601 studio-range Y in [16, 235] of RGB in [0, 1] (the SR benchmark convention)."""
    r, g, b = rgb.unbind(1)
    return (16 + 65.481 * r + 128.553 * g + 24.966 * b)[:, None]


def shave(x: Tensor, border: int) -> Tensor:
    return x[..., border : x.shape[-2] - border, border : x.shape[-1] - border] if border else x


def psnr(a: Tensor, b: Tensor, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB over all elements (float64)."""
    mse = (a.double() - b.double()).square().mean().item()
    return math.inf if mse == 0 else 10 * math.log10(data_range**2 / mse)


def ssim(a: Tensor, b: Tensor, data_range: float = 255.0) -> float:
    """Mean SSIM (Wang et al. 2004): 11×11 Gaussian window σ = 1.5, K1 = 0.01, K2 = 0.03, per channel.

    The Gaussian window is separable: two 1-D passes give the 2-D window's value to
    float64 rounding at a fraction of the cost. "Valid" windows only: no padding artefacts.
    """
    a, b = a.double(), b.double()

    def blur(x: Tensor) -> Tensor:
        return gaussian_blur(x, 1.5, pad=False)  # radius ⌈4.5⌉ = 5: the 11×11 window

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b, cov = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2, blur(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.mean().item()


def to_uint8_levels(x: Tensor) -> Tensor:
    """Round [0, 1] values to the 8-bit levels a saved PNG would hold, so metrics match files."""
    return (x.clamp(0, 1) * 255).round() / 255
