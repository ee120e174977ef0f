"""The Gaussian blur that the networks (inpainting's low-pass) and the metrics (SSIM's window) share."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def gaussian_blur(x: Tensor, sigma: float, pad: bool = True) -> Tensor:
    """Separable Gaussian blur of (B, C, H, W), per channel, radius ⌈3σ⌉ (at least 1), in x's dtype.

    `pad`: replicate padding, the output keeps x's size; otherwise "valid" (smaller by the
    radius on each side, no border artefacts: what SSIM averages over).
    """
    r = max(1, math.ceil(3 * sigma))
    g = torch.exp(-(torch.arange(-r, r + 1, dtype=x.dtype, device=x.device) ** 2) / (2 * sigma**2))
    g = (g / g.sum()).view(1, 1, 1, -1).expand(x.shape[1], 1, 1, 2 * r + 1)  # (C, 1, 1, 2r+1)
    rows = F.pad(x, (r, r, 0, 0), mode="replicate") if pad else x
    x = F.conv2d(rows, g, groups=x.shape[1])
    cols = F.pad(x, (0, 0, r, r), mode="replicate") if pad else x
    return F.conv2d(cols, g.transpose(2, 3), groups=x.shape[1])
