"""The shared Gaussian blur against a dense 2-D Gaussian convolution."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from psal_cli import blur
from psal_cli.blur import gaussian_blur


@pytest.mark.parametrize("sigma", [0.3, 0.7, 1.5, 2.6])
@pytest.mark.parametrize("pad", [True, False])
@pytest.mark.parametrize("band_bytes", [1 << 20, 1])  # the image in one band; bands of 8 rows
def test_blur_is_the_2d_gaussian(sigma: float, pad: bool, band_bytes: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(blur, "_BAND_BYTES", band_bytes)
    x = torch.rand(2, 3, 23, 19, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    r = max(1, math.ceil(3 * sigma))
    y, xx = torch.meshgrid(torch.arange(-r, r + 1.0), torch.arange(-r, r + 1.0), indexing="ij")
    window = torch.exp(-(y**2 + xx**2) / (2 * sigma**2)).double()
    window = (window / window.sum()).expand(3, 1, -1, -1)
    padded = F.pad(x, (r, r, r, r), mode="replicate") if pad else x
    truth = F.conv2d(padded, window, groups=3)
    out = gaussian_blur(x, sigma, pad=pad)
    assert out.shape == truth.shape == ((2, 3, 23, 19) if pad else (2, 3, 23 - 2 * r, 19 - 2 * r))
    assert torch.allclose(out, truth, atol=1e-12)
