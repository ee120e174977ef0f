"""The Gaussian blurs: the separable one that the networks (inpainting's low-pass) and the metrics
(SSIM's window) share, and any (anisotropic) kernel by FFT for the degradations of real photos."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


# Bytes of input rows blurred at once: the band and its partial sums stay in a core's L2 cache
# through all the taps, where whole-image passes went out to memory and back once per tap.
_BAND_BYTES = 1 << 20


def gaussian_blur(x: Tensor, sigma: float, pad: bool = True) -> Tensor:
    """Separable Gaussian blur of (B, C, H, W), per channel, radius ⌈3σ⌉ (at least 1), in x's dtype.

    `pad`: replicate padding, the output keeps x's size; otherwise "valid" (smaller by the
    radius on each side, no border artefacts: what SSIM averages over).
    """
    r = max(1, math.ceil(3 * sigma))
    g = [math.exp(-(i * i) / (2 * sigma**2)) for i in range(-r, r + 1)]
    total = math.fsum(g)
    taps = [t / total for t in g]
    if pad:
        x = F.pad(x, (r, r, r, r), mode="replicate")
    n = x.shape[-2] - 2 * r
    rows = max(8, _BAND_BYTES // max(1, x[..., :1, :].numel() * x.element_size()))
    bands = []
    for y0 in range(0, max(n, 1), rows):  # one band even when nothing is left (n = 0), as before
        band = x[..., y0 : y0 + min(rows, n - y0) + 2 * r, :]
        # Each pass as a weighted sum of shifted slices: on a CPU a depthwise convolution of a
        # few channels costs two to three times more.
        for dim in (-1, -2):
            size = band.shape[dim] - 2 * r
            out = band.narrow(dim, 0, size) * taps[0]
            for i in range(1, 2 * r + 1):
                out.add_(band.narrow(dim, i, size), alpha=taps[i])
            band = out
        bands.append(band)
    return torch.cat(bands, -2) if len(bands) > 1 else bands[0]


def gaussian_kernel(sigma_x: float, sigma_y: float, theta: float = 0.0) -> Tensor:
    """A normalised 2-D Gaussian (k, k) with standard deviations σx, σy along axes turned by θ;
    k = 2·ceil(3·max σ) + 1 covers ±3σ. Anisotropic kernels are not separable: `kernel_blur`."""
    radius = max(1, math.ceil(3 * max(sigma_x, sigma_y)))
    r = torch.arange(-radius, radius + 1, dtype=torch.float64)
    y, x = torch.meshgrid(r, r, indexing="ij")
    c, s = math.cos(theta), math.sin(theta)
    u, v = c * x + s * y, -s * x + c * y
    k = torch.exp(-0.5 * ((u / sigma_x) ** 2 + (v / sigma_y) ** 2))
    return (k / k.sum()).float()


def kernel_blur(x: Tensor, kernel: Tensor) -> Tensor:
    """(C, H, W) convolved with a point-symmetric (k, k) kernel, k odd, edges reflected (replicated
    when the image is narrower than the radius). By FFT: with kernels 13–17 px wide, several times
    faster on the CPU than a direct convolution."""
    h, w = x.shape[-2:]
    r = kernel.shape[-1] // 2
    x = F.pad(x[None], (r, r, r, r), mode="reflect" if r < min(h, w) else "replicate")[0]
    size = x.shape[-2:]
    # A circular convolution of the padded image: the kernel at the origin shifts the output by
    # 2r, and the kept window [2r, 2r + side) never wraps around.
    x = torch.fft.irfft2(torch.fft.rfft2(x) * torch.fft.rfft2(kernel.to(x.dtype), s=size), s=size)
    return x[:, 2 * r: 2 * r + h, 2 * r: 2 * r + w]
