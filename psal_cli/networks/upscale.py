"""PSAL super-resolution: an EDSR-style residual network with a PSAL self-attention block.

    lr ─ head+body1 (LocalStage) ─ feat ─ attention (whole map, PSAL) ─ body2+tail (LocalStage) ─ sr
                                                                         └ + bicubic(lr) ┘

The attention block sits at the low-resolution feature scale, where a whole 12-megapixel
output is only 0.75 megapixels of features at ×4: every position looks up its k most
similar 3×3 feature patches anywhere in the image (PatchMatch) and adds their features,
so a repeated structure (windows, text, a fence) is reconstructed from all its copies.
The tail predicts the residual over bicubic upsampling with a sub-pixel convolution
(ESPCN's pixel shuffle), so the network only learns the missing detail.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from psal_cli.attention import PSAL
from psal_cli.networks import register_model
from psal_cli.networks.stages import Direct, LocalStage, conv_radius, holds_patches

BICUBIC_RADIUS = 2  # bicubic interpolation reads 2 input pixels on each side
CUBIC_A = -0.75  # the cubic convolution's parameter in torch's (and OpenCV's) bicubic


def bicubic_phases(scale: int) -> Tensor:
    """The bicubic ×scale upsampling of one channel as a convolution before a pixel shuffle.

    Output pixel s·m + p reads input pixels m − 2 … m + 2 with the weights of row p (torch's
    `interpolate(mode="bicubic", align_corners=False)`: source position m + (p + ½)/s − ½,
    four cubic-convolution taps). Returns (s·s, 1, 5, 5) float32: the (py, px) phase's 2-D
    kernel, the channel order `pixel_shuffle` expects.
    """

    def near(x: float) -> float:  # |x| ≤ 1
        return ((CUBIC_A + 2) * x - (CUBIC_A + 3)) * x * x + 1

    def far(x: float) -> float:  # 1 < |x| < 2
        return ((CUBIC_A * x - 5 * CUBIC_A) * x + 8 * CUBIC_A) * x - 4 * CUBIC_A

    rows = torch.zeros(scale, 2 * BICUBIC_RADIUS + 1, dtype=torch.float64)
    for p in range(scale):
        source = (p + 0.5) / scale - 0.5
        first = math.floor(source) - 1  # the first of the four taps, relative to m
        t = source - math.floor(source)
        for j, weight in enumerate((far(1 + t), near(t), near(1 - t), far(2 - t))):
            rows[p, first + j + BICUBIC_RADIUS] += weight
    return (rows[:, None, :, None] * rows[None, :, None, :]).reshape(scale * scale, 1, 5, 5).float()


class ResBlock(nn.Module):
    """conv-ReLU-conv with an identity skip (EDSR: no batch norm).

    `inner` channels between the two convolutions (default `channels`): a wider activation
    than the trunk (WDSR) adds capacity where the ReLU is, without widening every map.
    """

    def __init__(self, channels: int, inner: int | None = None) -> None:
        super().__init__()
        inner = inner or channels
        self.conv1 = nn.Conv2d(channels, inner, 3, padding=1)
        self.conv2 = nn.Conv2d(inner, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.relu(self.conv1(x)))


class Head(LocalStage):
    """RGB → features, then the residual blocks before attention."""

    def __init__(self, channels: int, blocks: int, inner: int | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 3, padding=1)
        self.body = nn.Sequential(*(ResBlock(channels, inner) for _ in range(blocks)))
        self.radius = conv_radius(self)

    def forward(self, lr: Tensor) -> Tensor:
        return self.body(self.conv(lr))


class Tail(LocalStage):
    """The residual blocks after attention, sub-pixel upsampling, plus bicubic(lr).

    bicubic(lr) is made as a convolution (`bicubic_phases`) and added before the pixel
    shuffle: on a CPU `interpolate` took a fifth of the tail's time, the convolution a
    twentieth. It stays float32 under autocast: the image itself must not round to bfloat16.
    """

    def __init__(self, channels: int, blocks: int, scale: int, inner: int | None = None) -> None:
        super().__init__()
        self.body = nn.Sequential(*(ResBlock(channels, inner) for _ in range(blocks)))
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.up = nn.Conv2d(channels, 3 * scale * scale, 3, padding=1)
        self.shuffle = nn.PixelShuffle(scale)
        self.radius = max(conv_radius(self), BICUBIC_RADIUS)
        self.scale = Fraction(scale)
        self.register_buffer("bicubic", bicubic_phases(scale).repeat(3, 1, 1, 1), persistent=False)

    def forward(self, feat: Tensor, lr: Tensor) -> Tensor:
        x = F.relu(self.conv(self.body(feat)))
        with torch.autocast(lr.device.type, enabled=False):
            padded = F.pad(lr.float(), (BICUBIC_RADIUS,) * 4, mode="replicate")  # interpolate's clamped borders
            base = F.conv2d(padded, self.bicubic, groups=3)  # (B, 3·s², H, W)
        return self.shuffle(self.up(x) + base)  # (B, 3, s·H, s·W)


class Attention(nn.Module):
    """PSAL self-attention with learned 1×1 projections and a small residual scale.

    q and k are projections to few channels (the search cost is ∝ their count); the
    attended features go through the 1×1 value and output convolutions and join the
    features scaled by `gamma`, initialised small so that training starts from the plain
    CNN and lets attention in as it becomes useful. The value projection is applied after
    aggregating, not before: the attention weights sum to one, so both orders give the
    same result, and no value map as large as the features is held. At inference the
    map is aggregated in bands of rows once q and k are freed: a 4K input holds the
    features, their output and the NNF, little else.
    """

    def __init__(self, channels: int, qk_channels: int, psal: PSAL) -> None:
        super().__init__()
        self.query = nn.Conv2d(channels, qk_channels, 1)
        self.key = nn.Conv2d(channels, qk_channels, 1)
        self.value = nn.Conv2d(channels, channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.tensor(0.1))
        self.psal = psal

    def forward(self, feat: Tensor, generator: torch.Generator | None = None) -> Tensor:
        q, k = self.query(feat), self.key(feat)
        nnf = self.psal.search(q, k, generator=generator)
        if not torch.is_grad_enabled():
            q = k = None  # freed: the NNF's distances are all that attending needs
        return self.psal.attend(q, k, feat, nnf.indices, nnf.distances,
                                finish=lambda band, rows: feat[:, :, rows] + self.gamma * self.out(self.value(band)))


@register_model("psal-upscale")
class PSALUpscale(nn.Module):
    """EDSR-style ×2/×3/×4 super-resolution with a PSAL block between two residual bodies."""

    task = "upscale"
    # `--precision auto` may take bfloat16: this network's figures stay within the bound
    # of 0.01 dB under it (benchmarks/speed.py measures them); inpainting's do not.
    auto_bf16 = True
    retired_config = ("exact_keys",)  # older files' search threshold: now the layer's EXACT_PAIRS

    @dataclass
    class Config:
        scale: int = 4
        channels: int = 32
        blocks_before: int = 4  # residual blocks before the attention block
        blocks_after: int = 6  # residual blocks after it
        inner_channels: int | None = None  # channels inside each residual block (None: `channels`)
        attention: bool = True  # False: the same network without PSAL (the ablation)
        qk_channels: int = 16
        patch_size: int = 3
        neighbors: int = 4
        # PatchMatch iterations (maps above attention.EXACT_PAIRS): more find closer matches,
        # not more useful ones end to end.
        iterations: int = 3
        # Matches each neighbour propagates in PatchMatch (None: 2·neighbors): 6 of the 8 find
        # matches as useful (figures within 0.001 dB on a 1 MP mosaic) in a fifth less time.
        propagated: int | None = 6
        temperature: float = 1.0

    def __init__(self, config: Config) -> None:
        super().__init__()
        if config.scale not in (2, 3, 4):
            raise ValueError(f"scale must be 2, 3 or 4, got {config.scale}")
        self.config = config
        c = config
        self.head = Head(c.channels, c.blocks_before, c.inner_channels)
        psal = PSAL(patch_size=c.patch_size, neighbors=c.neighbors, iterations=c.iterations,
                    temperature=c.temperature, aggregation="center", propagated=c.propagated)
        self.attention = Attention(c.channels, c.qk_channels, psal) if c.attention else None
        self.tail = Tail(c.channels, c.blocks_after, c.scale, c.inner_channels)

    def deepen(self, blocks: int) -> PSALUpscale:
        """This network with `blocks` more residual blocks after attention, the same function.

        The new blocks come first in the tail and start as the identity (their last
        convolution is zero), so a trained network keeps its output and further training
        puts the added capacity to use (Net2Net's deeper network).
        """
        config = PSALUpscale.Config(**{**vars(self.config), "blocks_after": self.config.blocks_after + blocks})
        deeper = PSALUpscale(config)
        state = deeper.state_dict()
        for name, tensor in self.state_dict().items():
            if name.startswith("tail.body."):
                _, _, index, rest = name.split(".", 3)
                name = f"tail.body.{int(index) + blocks}.{rest}"
            state[name] = tensor
        for i in range(blocks):
            state[f"tail.body.{i}.conv2.weight"].zero_()
            state[f"tail.body.{i}.conv2.bias"].zero_()
        deeper.load_state_dict(state)
        return deeper

    def widen(self, inner: int) -> PSALUpscale:
        """This network with `inner` channels inside every residual block, the same function.

        The added channels get fresh first-convolution filters and zero weights in the
        second convolution, so the output is unchanged and training brings them in.
        """
        width = self.config.inner_channels or self.config.channels
        if inner <= width:
            raise ValueError(f"cannot widen to {inner}: the residual blocks already have {width} inner channels")
        wider = PSALUpscale(PSALUpscale.Config(**{**vars(self.config), "inner_channels": inner}))
        state = wider.state_dict()
        for name, tensor in self.state_dict().items():
            if ".conv2.weight" in name and ".body." in name:
                state[name].zero_()
                state[name][:, :width] = tensor
            elif ".conv1." in name and ".body." in name:
                state[name][:width] = tensor
            else:
                state[name] = tensor
        wider.load_state_dict(state)
        return wider

    def accepts_size(self, input_name: str, height: int, width: int) -> bool:
        """Whether an image this size can be enlarged: PSAL matches `neighbors` patches of
        the features, which have the image's size (4×4 px with 3×3 patches and 4 neighbours)."""
        c = self.config
        return self.attention is None or holds_patches(height, width, c.patch_size, c.neighbors)

    def run(self, ex, image: Tensor) -> Tensor:
        """image (B, 3, H, W) in [0, 1] → (B, 3, s·H, s·W) in [0, 1]."""
        feat = ex.local(self.head, image)
        if self.attention is not None:
            feat = ex.whole(partial(self.attention, generator=ex.generator), feat)
        return ex.local(self.tail, feat, image).clamp(0, 1)

    def forward(self, image: Tensor) -> Tensor:
        return self.run(Direct(), image=image)
