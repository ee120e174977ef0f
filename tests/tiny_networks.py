"""Tiny randomly initialised networks that follow the network contract
(`psal_cli.networks.stages`): one 3x3 convolution each, so tests exercise the real
pipeline (model files, engine, image I/O) in milliseconds. Importing this module
registers them; `psal` subprocesses in tests import it too (see `conftest.psal_command`).
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from psal_cli.modelfile import save_model
from psal_cli.networks import register_model
from psal_cli.networks.stages import LocalStage


class Conv(LocalStage):
    """3x3 convolution of the concatenated inputs, then pixel shuffle by `scale`."""

    def __init__(self, cin: int, cout: int, scale: int = 1) -> None:
        super().__init__()
        self.radius, self.scale = 1, Fraction(scale)
        self.conv = nn.Conv2d(cin, cout * scale * scale, 3, padding=1)
        self.shuffle = nn.PixelShuffle(scale)

    def forward(self, *xs: Tensor) -> Tensor:
        return self.shuffle(self.conv(torch.cat(xs, 1)))


@register_model("test-tiny-upscale")
class TinyUpscale(nn.Module):
    task = "upscale"

    @dataclass
    class Config:
        scale: int = 2

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.body = Conv(3, 3, config.scale)

    def run(self, ex, image: Tensor) -> Tensor:
        base = F.interpolate(image, scale_factor=self.config.scale, mode="nearest")
        return (base + 0.1 * ex.local(self.body, image)).clamp(0, 1)


@register_model("test-tiny-colorize")
class TinyColorize(nn.Module):
    task = "colorize"

    @dataclass
    class Config:
        width: int = 3

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.body = Conv(1, config.width)

    def run(self, ex, gray: Tensor, reference: Tensor) -> Tensor:
        tint = ex.whole(lambda r: r.mean((2, 3), keepdim=True), reference)  # (B, 3, 1, 1)
        tint = tint - tint.mean(1, keepdim=True)
        return (gray + tint + 0.01 * ex.local(self.body, gray)).clamp(0, 1)


@register_model("test-tiny-inpaint")
class TinyInpaint(nn.Module):
    task = "inpaint"

    @dataclass
    class Config:
        width: int = 3

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.body = Conv(4, config.width)

    def run(self, ex, image: Tensor, mask: Tensor) -> Tensor:
        return ex.local(self.body, image, mask).sigmoid()


def write_models(folder: Path) -> None:
    """Write upscale-x2, upscale-x4, upscale-real-x4 (no real ×2), colorize and inpaint model files into `folder`."""
    torch.manual_seed(0)
    for name, model in [("upscale-x2", TinyUpscale(TinyUpscale.Config(2))),
                        ("upscale-x4", TinyUpscale(TinyUpscale.Config(4))),
                        ("upscale-real-x4", TinyUpscale(TinyUpscale.Config(4))),
                        ("colorize", TinyColorize(TinyColorize.Config())),
                        ("inpaint", TinyInpaint(TinyInpaint.Config()))]:
        training = {"data": "none", "steps": 0, **({"degradation": {"name": "real"}} if "real" in name else {})}
        save_model(model, folder / f"{name}.safetensors", training=training, metrics={"psnr": 12.5})
