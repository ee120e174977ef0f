"""Colour conversions on (B, 3, H, W) tensors in [0, 1] (pure functions, any device)."""

from __future__ import annotations

import torch
from torch import Tensor

# ITU-R BT.601 luma, as Pillow's "L" mode computes it: a gray input *is* this Y.
_LUMA = (0.299, 0.587, 0.114)


def rgb_to_ycbcr(rgb: Tensor) -> Tensor:
    """Full-range (JPEG) YCbCr, channels (Y, Cb, Cr) in [0, 1], chroma centred on 0.5."""
    r, g, b = rgb.unbind(1)
    y = _LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b
    cb = 0.5 + (b - y) * (0.5 / (1 - _LUMA[2]))
    cr = 0.5 + (r - y) * (0.5 / (1 - _LUMA[0]))
    return torch.stack([y, cb, cr], 1)


def ycbcr_to_rgb(ycbcr: Tensor) -> Tensor:
    """Inverse of `rgb_to_ycbcr` (not clipped: callers clip once, at the end)."""
    y, cb, cr = ycbcr.unbind(1)
    r = y + (cr - 0.5) * (2 * (1 - _LUMA[0]))
    b = y + (cb - 0.5) * (2 * (1 - _LUMA[2]))
    g = (y - _LUMA[0] * r - _LUMA[2] * b) / _LUMA[1]
    return torch.stack([r, g, b], 1)


def rgb_to_luma(rgb: Tensor) -> Tensor:
    """(B, 1, H, W) BT.601 luma: what a grayscale conversion of the photo gives."""
    return rgb_to_ycbcr(rgb)[:, :1]


# sRGB (D65) → CIE XYZ, and the D65 white point.
_XYZ = ((0.412453, 0.357580, 0.180423), (0.212671, 0.715160, 0.072169), (0.019334, 0.119193, 0.950227))
_WHITE = (0.950456, 1.0, 1.088754)


def rgb_to_lab(rgb: Tensor) -> Tensor:
    """CIELAB (D65) of sRGB in [0, 1]: L in [0, 100], a and b roughly in [-128, 127]."""
    linear = torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb.clamp(min=0) + 0.055) / 1.055) ** 2.4)
    matrix = torch.tensor(_XYZ, dtype=rgb.dtype, device=rgb.device)
    xyz = torch.einsum("ij,bjhw->bihw", matrix, linear)
    white = torch.tensor(_WHITE, dtype=rgb.dtype, device=rgb.device).view(1, 3, 1, 1)
    t = xyz / white
    f = torch.where(t > 0.008856, t.clamp(min=1e-12) ** (1 / 3), 7.787 * t + 16 / 116)
    fx, fy, fz = f.unbind(1)
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], 1)


def lab_to_rgb(lab: Tensor) -> Tensor:
    """Inverse of `rgb_to_lab` (out-of-gamut colours are not clipped: callers clip)."""
    L, a, b = lab.unbind(1)
    fy = (L + 16) / 116
    f = torch.stack([fy + a / 500, fy, fy - b / 200], 1)
    t = torch.where(f > 0.008856 ** (1 / 3), f**3, (f - 16 / 116) / 7.787)
    white = torch.tensor(_WHITE, dtype=lab.dtype, device=lab.device).view(1, 3, 1, 1)
    inverse = torch.linalg.inv(torch.tensor(_XYZ, dtype=torch.float64)).to(lab.dtype).to(lab.device)
    linear = torch.einsum("ij,bjhw->bihw", inverse, t * white)
    return torch.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear.clamp(min=0) ** (1 / 2.4) - 0.055)
