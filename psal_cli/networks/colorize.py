"""Guided colorization: a gray target takes the colours of a reference photo through PSAL.

    target Y ──encoder──► q (half res) ─┐
                                        PSAL: softmax(−D/T) over k matched 3×3 feature patches
    reference Y ──encoder──► k, v_feat ─┤        values = the reference's full-res CbCr (as
    (and its mirror image)   v_chroma ──┘        2×2 blocks) + a few feature channels
                                        │
                     attended CbCr, features, match distance (full res)
                                        │
    target Y ───────────────────────► decoder ──► CbCr residual ──► RGB with the input's exact Y

Luminance is never predicted: the output is YCbCr → RGB with the target's own Y (BT.601,
what Pillow's "L" computes), so it is kept exactly up to RGB gamut clipping. The reference
is searched together with its mirror image (the way generalised PatchMatch searches
transformed patches), so a flipped framing matches as well as the original. Matching runs
at half resolution (4× fewer queries and keys) while the values carry every full-res
chroma pixel, so colour edges stay sharp; the decoder fixes what the match got wrong and
fills regions without a good match, told where by the match distance.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from psal_cli.attention import PSAL
from psal_cli.color import rgb_to_ycbcr, ycbcr_to_rgb
from psal_cli.networks import register_model
from psal_cli.networks.stages import (
    Direct,
    Executor,
    LocalStage,
    conv_radius,
    holds_patches,
    pad_to_multiple,
)

def quantize8(x: Tensor) -> Tensor:
    """Round to 8-bit levels, so that the same scene gives the same luminance in both images
    whether it came as an 8-bit gray file or as a colour photo converted here."""
    return (x * 255).round() / 255


class Encoder(LocalStage):
    """Y → matching features at half resolution (3×3 convolutions, one of them stride 2).

    Outputs `qk` channels that queries and keys share, then `feat` value features; given
    the reference's chroma, appends it as 2×2 blocks (4 pixels × CbCr = 8 channels).
    """

    def __init__(self, width: int, qk: int, feat: int) -> None:
        super().__init__()
        act = nn.LeakyReLU(0.1)
        self.full = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), act)
        self.down = nn.Sequential(nn.Conv2d(width, width, 3, stride=2, padding=1), act)
        self.low = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), act,
                                  nn.Conv2d(width, width, 3, padding=1), act,
                                  nn.Conv2d(width, qk + feat, 1))
        # full-res convs count 1 pixel each; half-res ones count 2 input pixels per tap
        self.radius = conv_radius(self.full, self.down) + 2 * conv_radius(self.low)
        self.scale = Fraction(1, 2)

    def forward(self, y: Tensor, chroma: Tensor | None = None) -> Tensor:
        h = self.low(self.down(self.full(y - 0.5)))  # (B, qk+feat, H/2, W/2)
        return h if chroma is None else torch.cat([h, F.pixel_unshuffle(chroma, 2)], 1)


class Decoder(LocalStage):
    """[Y, attended CbCr, attended features, match distance] → CbCr residual (full res).

    Dilated 3×3 convolutions: a wide context (radius ≈ 2·Σ dilations) lets poorly matched
    regions take the colour of well-matched surroundings with the same structure.
    """

    def __init__(self, cin: int, width: int, dilations: list[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(cin, width, 3, padding=1), nn.LeakyReLU(0.1)]
        for d in dilations:
            layers += [nn.Conv2d(width, width, 3, padding=d, dilation=d), nn.LeakyReLU(0.1)]
        self.body = nn.Sequential(*layers)
        self.head = nn.Conv2d(width, 2, 3, padding=1)
        nn.init.zeros_(self.head.weight)  # start as the plain attention output
        nn.init.zeros_(self.head.bias)
        self.radius = conv_radius(self.body, self.head)
        self.scale = Fraction(1)

    def forward(self, y: Tensor, attended: Tensor) -> Tensor:
        return self.head(self.body(torch.cat([y - 0.5, attended], 1)))


@register_model("psal-colorize")
class PSALColorize(nn.Module):
    """Reference-guided colorization; `run(ex, gray=(B,1,H,W), reference=(B,3,Hr,Wr)) -> (B,3,H,W)`."""

    task = "colorize"
    retired_config = ("exact_pairs",)  # older files' search threshold: now the layer's EXACT_PAIRS

    @dataclass
    class Config:
        encoder_width: int = 32
        qk_channels: int = 12  # matching features (queries = keys)
        feat_channels: int = 4  # reference features carried as values, besides the colour
        patch_size: int = 3  # PSAL patch, at half resolution (≈ 6×6 pixels plus receptive field)
        neighbors: int = 4
        iterations: int = 5
        temperature: float = 1.0  # the encoder learns the feature scale, hence the sharpness
        aggregation: str = "patch"
        mirror: bool = True  # also search the mirror image of the reference
        decoder_width: int = 32
        dilations: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 4, 2, 1])

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = c = config
        self.encoder = Encoder(c.encoder_width, c.qk_channels, c.feat_channels)
        self.psal = PSAL(patch_size=c.patch_size, neighbors=c.neighbors, iterations=c.iterations,
                         temperature=c.temperature, aggregation=c.aggregation)
        self.decoder = Decoder(1 + 2 + c.feat_channels + 1, c.decoder_width, c.dilations)

    def accepts_size(self, input_name: str, height: int, width: int) -> bool:
        """Whether an input this size can be run: the gray image any size, the reference
        large enough that its half-resolution features (beside their mirror image) hold
        `neighbors` key patches: 5×5 px with 3×3 patches and 4 neighbours, 7×7 without mirror."""
        if input_name != "reference":
            return True
        c, down = self.config, int(1 / self.encoder.scale)
        h, w = -(-height // down), -(-width // down) * (2 if c.mirror else 1)
        return holds_patches(h, w, c.patch_size, c.neighbors)

    def attend(self, target: Tensor, reference: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Whole-map stage: PSAL from target to reference features, back to full resolution.

        target (B, qk+feat, h, w), reference (B, qk+feat+8, hr, wr) → (B, 2+feat+1, 2h, 2w):
        attended CbCr, attended features and log(1 + best match distance).
        """
        c = self.config
        q = target[:, : c.qk_channels]
        k, v = reference[:, : c.qk_channels], reference[:, c.qk_channels :]
        h, w = q.shape[-2:]
        if min(h, w) < c.patch_size:
            # PatchMatch needs whole query patches: a target thinner than one is searched
            # replicate-padded (its own patches are already replicate-padded: none changes).
            q = F.pad(q, (0, max(0, c.patch_size - w), 0, max(0, c.patch_size - h)), mode="replicate")
        nnf = self.psal.search(q, k, generator=generator)
        out = self.psal.attend(q, k, v, nnf.indices, nnf.distances)[..., :h, :w]
        feat, chroma = out[:, : c.feat_channels], out[:, c.feat_channels :]  # (B, feat, h, w), (B, 8, h, w)
        distance = torch.log1p(nnf.distances[:, :h, :w, :1].permute(0, 3, 1, 2))  # (B, 1, h, w)
        up = lambda x: F.interpolate(x, scale_factor=2, mode="nearest")
        return torch.cat([F.pixel_shuffle(chroma, 2), up(feat), up(distance.to(out.dtype))], 1)

    def predict_chroma(self, ex: Executor, gray: Tensor, reference: Tensor) -> Tensor:
        """CbCr − 0.5 (B, 2, H, W) before gamut clipping: what training fits."""
        H, W = gray.shape[-2:]
        ref = pad_to_multiple(reference, 2)
        if self.config.mirror:
            ref = torch.cat([ref, ref.flip(-1)], -1)  # (B, 3, Hr, 2·Wr)
        ycc = rgb_to_ycbcr(ref)
        y = quantize8(gray)
        target = ex.local(self.encoder, pad_to_multiple(y, 2))  # (B, qk+feat, H'/2, W'/2)
        keys = ex.local(self.encoder, quantize8(ycc[:, :1]), ycc[:, 1:] - 0.5)  # (B, qk+feat+8, Hr/2, Wr/2)
        attended = ex.whole(partial(self.attend, generator=ex.generator), target, keys)[..., :H, :W]  # (B, 2+feat+1, H, W)
        return attended[:, :2] + ex.local(self.decoder, y, attended)

    def run(self, ex: Executor, gray: Tensor, reference: Tensor) -> Tensor:
        chroma = self.predict_chroma(ex, gray, reference)
        return ycbcr_to_rgb(torch.cat([gray, chroma + 0.5], 1)).clamp(0, 1)

    def forward(self, gray: Tensor, reference: Tensor) -> Tensor:
        return self.run(Direct(), gray=gray, reference=reference)
