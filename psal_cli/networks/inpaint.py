"""PSAL inpainting: a coarse-to-fine fill at a working resolution, a patch copy up to full resolution, PSAL detail.

    image, mask ─ to working size (native for a narrow hole, else long side work_size) ─ push-pull pre-fill
        ─ encoder ↓4 ─ dilated gated blocks ─ PSAL (masked keys: the hole is never copied from) ─ blocks
        ─ decoder ↑4 (+ pre-fill) ─ refine ─ fill
    fill ─ its correction of the pre-fill upsampled onto the full-size pre-fill, or (copy) PatchMatch +
        patch votes level by level (×2) up to full size
        ─ detail: PSAL over the full-resolution pixels ─ out
    a narrow hole of a photo above the working size: fill at native size ─ detail
        ─ copy: PatchMatch + patch votes from a level where the hole is 2–4 px wide up to full size ─ out

The copy stage (`copy_structure`) starts from the network's fill and copies the hole, at
every level up to the native size, from the known patches that best match it
(multi-scale patch inpainting: each level's matches seed the next), keeping the
network's fill where nothing known matches well. Structure that repeats in the photo
(windows, brick courses, railings, tiles) crossed by a scratch is so copied at full
resolution instead of painted by a network trained on smaller photos. For wide holes it
is optional (from the working size up, `copy`).

A small network can only paint the low frequencies of a hole, and any resize-based tool
blurs on top of that when the photo is larger than the network's working size. The
detail stage fixes both: it matches the (low-pass) fill against the low-pass known image
with PatchMatch, then copies the *high-frequency* part of the matched known pixels into
the hole (patch aggregation, so neighbouring queries copy coherent texture). The search
runs at a reduced "match" resolution over the hole's bounding box only; its NNF is
upsampled into a full-resolution NNF and PSAL attends with it at full resolution, so the
copied texture is real full-resolution texture of the same photo. Before upsampling, the
block NNF is made coherent (neighbouring blocks copy neighbouring blocks where that costs
little match quality), so the copy comes in large seamless pieces, not a block patchwork.

Known pixels are kept exactly by every stage (each composites with the input), so the
seam is the input's own edge plus a fill that the refine stage learned to continue.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from psal_cli.attention import PSAL, patch_distances, patchmatch, valid_key_centres
from psal_cli.blur import gaussian_blur
from psal_cli.networks import register_model
from psal_cli.networks.stages import VIEWS, Direct, LocalStage, conv_radius, holds_patches, pad_to_multiple, view


class GatedBlock(nn.Module):
    """x + W·(gelu(a) · σ(g)), [a, g] = dilated 3×3 conv(x): gated convolution (Yu et al. 2019) as a residual."""

    def __init__(self, channels: int, dilation: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 2 * channels, 3, padding=dilation, dilation=dilation)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        a, g = self.conv(x).chunk(2, 1)
        return x + self.proj(F.gelu(a) * torch.sigmoid(g))


class Encoder(LocalStage):
    """(image, mask) at working size → features at 1/4, then dilated gated blocks that spread context into the hole."""

    def __init__(self, width: int, dilations: tuple[int, ...]) -> None:
        super().__init__()
        self.stem = nn.Conv2d(4, width // 2, 3, padding=1)
        self.down1 = nn.Conv2d(width // 2, width, 3, stride=2, padding=1)
        self.down2 = nn.Conv2d(width, width, 3, stride=2, padding=1)
        self.blocks = nn.Sequential(*(GatedBlock(width, d) for d in dilations))
        self.scale = Fraction(1, 4)
        # stem 1 px, down1 1 px, down2 1 half-pixel = 2 px, blocks in quarter pixels.
        self.radius = 1 + 1 + 2 + 4 * conv_radius(self.blocks)

    def forward(self, image: Tensor, mask: Tensor) -> Tensor:
        x = F.gelu(self.stem(torch.cat([image, mask], 1)))
        x = F.gelu(self.down1(x))
        return self.blocks(self.down2(x))


class Decoder(LocalStage):
    """Features at 1/4 (+ attention output) → blocks → RGB correction at working size (two ×2 sub-pixel steps)."""

    def __init__(self, width: int, dilations: tuple[int, ...]) -> None:
        super().__init__()
        self.fuse = nn.Conv2d(2 * width, width, 1)
        self.blocks = nn.Sequential(*(GatedBlock(width, d) for d in dilations))
        self.up1 = nn.Conv2d(width, 4 * (width // 2), 3, padding=1)
        self.up2 = nn.Conv2d(width // 2, 4 * (width // 4), 3, padding=1)
        self.rgb = nn.Conv2d(width // 4, 3, 3, padding=1)
        self.scale = Fraction(4)
        # Blocks and up1 at 1/4, up2 at 1/2 (half a quarter pixel), rgb at full (a quarter): round up.
        self.radius = conv_radius(self.blocks) + 1 + 1

    def forward(self, feat: Tensor, attended: Tensor) -> Tensor:
        x = self.blocks(self.fuse(torch.cat([feat, attended], 1)))
        x = F.gelu(F.pixel_shuffle(self.up1(x), 2))
        x = F.gelu(F.pixel_shuffle(self.up2(x), 2))
        return self.rgb(x)  # a correction to the smooth pre-fill


class Refine(LocalStage):
    """(composited coarse fill, mask) → residual correction at working size: continues edges across the seam."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(4, width, 3, padding=1), nn.GELU(),
            nn.Conv2d(width, width, 3, padding=2, dilation=2), nn.GELU(),
            nn.Conv2d(width, width, 3, padding=4, dilation=4), nn.GELU(),
            nn.Conv2d(width, 3, 3, padding=1),
        )
        self.radius = conv_radius(self.body)

    def forward(self, comp: Tensor, mask: Tensor) -> Tensor:
        return (comp + self.body(torch.cat([comp, mask], 1))).clamp(0, 1)


def masked_blur(x: Tensor, known: Tensor, sigma: float) -> Tensor:
    """Gaussian blur of x using only known pixels (normalised convolution), so the hole never leaks in."""
    return gaussian_blur(x * known, sigma) / gaussian_blur(known, sigma).clamp(min=1e-6)


def hole_radius(mask: Tensor, cells: int = 256) -> float:
    """Half-width in pixels of the widest part of the hole (B, 1, H, W), over the batch: 0 without one.

    Measured on a grid of at most `cells` cells along the long side (a cell is hole if any
    of its pixels is): the erosions by one cell that it takes to remove the hole, times the
    cell side. So a narrow hole on a large photo counts as about a cell wide, and the count
    costs at most `cells` small poolings. The photo's border counts as hole.
    """
    d = max(1, math.ceil(max(mask.shape[-2:]) / cells))
    hole = F.max_pool2d(mask.float(), d, ceil_mode=True) > 0
    steps = 0
    while bool(hole.any()) and steps < cells:  # a photo that is all hole never erodes
        hole = -F.max_pool2d(-hole.float(), 3, 1, 1) > 0  # padded with −inf: the border erodes nothing
        steps += 1
    return float(steps * d)


def far_share(mask: Tensor, radius: int) -> float:
    """Share of the hole pixels of (B, 1, H, W) farther than `radius` pixels (a square's) from any known one.

    The erosion by a (2·radius + 1)² square, as two separable max-poolings; the photo's
    border counts as hole (the pooling's padding never erodes), as in `hole_radius`.
    0 without a hole.
    """
    total = mask.sum().item()
    if total == 0:
        return 0.0
    y0, y1, x0, x1 = hole_box(mask, radius)  # beyond this margin no pixel is within reach
    mask, k = mask[..., y0:y1, x0:x1].float(), 2 * radius + 1
    eroded = -F.max_pool2d(F.max_pool2d(-mask, (1, k), 1, (0, radius)), (k, 1), 1, (radius, 0))
    return (eroded > 0).sum().item() / total


def hole_box(mask: Tensor, margin: int) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1): bounding box of the hole over the batch, grown by margin, clipped to the map."""
    H, W = mask.shape[-2:]
    ys = mask.amax(dim=(0, 1, 3)).nonzero()[:, 0]  # (n,) rows holding a hole pixel
    xs = mask.amax(dim=(0, 1, 2)).nonzero()[:, 0]  # (n,) columns holding a hole pixel
    return (max(0, int(ys[0]) - margin), min(H, int(ys[-1]) + 1 + margin),
            max(0, int(xs[0]) - margin), min(W, int(xs[-1]) + 1 + margin))


# Up to this reduction to the working size the detail stage copies at its full gain: faded
# from a reduction of 1, the box holes of 1024-px photos (filled at 512 px) came out far
# softer than the photos (docs/models/inpaint.md, "Photos of 1024 px").
_FULL_GAIN_REDUCTION = 2.0

# A hole filled above the working size is narrow (the photo's own push-pull fill under the
# network's correction, then the native band) up to this reduction: beyond it the native
# push-pull and band lack all that the reduction lost, and a box of a tenth of a 12 MP photo,
# filled at ~540 px, came out flat grey (docs/models/inpaint.md, "Narrow holes and boxes").
_NARROW_REDUCTION = 4.0


@register_model("psal-inpaint")
class PSALInpaint(nn.Module):
    task = "inpaint"

    @dataclass
    class Config:
        width: int = 32  # channels at 1/4 of the working size
        encoder_dilations: tuple[int, ...] = (1, 2, 4, 8, 16)
        decoder_dilations: tuple[int, ...] = (1, 2)
        refine_width: int = 16
        prefill_iterations: int = 20  # Jacobi steps per pyramid level of the smooth pre-fill
        attn_channels: int = 16  # PSAL query/key channels in the network
        attn_patch: int = 1  # the features already describe a wide neighbourhood; p = 1 keeps training fast
        attn_neighbors: int = 4
        attn_iterations: int = 3
        work_size: int = 512  # long side of the working resolution at least (larger photos are reduced, then detailed)
        # A hole is filled at the largest size, up to the native one and work_pixels, at which its half-width
        # (hole_radius) is at most work_radius pixels: the network then sees the structure beside a scratch or
        # a stroke at full resolution, or as near it as it can. A box needs the context of a reduced photo.
        work_pixels: int = 1 << 20
        work_radius: int = 64
        fill_flips: int = 4  # self-ensemble at inference: mean fill over the first 1–8 views of stages.VIEWS
        # A wide hole (half-width over work_radius) of a photo at or below the working size is also filled
        # at half that size, and the two fills averaged: a lower hole error on 481-px photos (the model
        # card). On photos reduced to the working size it measured no better, and is not done.
        fill_scales: int = 1  # 1 or 2
        detail: bool = True  # full-resolution PSAL detail transfer
        detail_gain: float = 1.8  # gain on the copied band at native size (→ 1 on reduced photos, see detail_weight)
        detail_ramp: float = 1.0  # σ in full-resolution pixels of the fade-in of texture from the seam; 0 = none
        detail_sigma: float = 0.7  # low-pass that separates what the network paints from what is copied (× reduction)
        detail_match_size: int = 128  # long side of the hole box, in blocks, at which PatchMatch searches
        detail_patch: int = 3  # patch side of the search, in blocks (odd, ≥ 3)
        detail_iterations: int = 3
        detail_search: int = 512  # keys: the hole box grown by this many full-resolution pixels
        detail_temperature: float = 1e-5  # ≈ hard choice of the best patch vote: averaging votes would blur the copy
        detail_energy_weight: float = 2.0  # weight of the texture-energy channel in the match features
        detail_coherence: float = 3.0  # price of a seam between blocks copied from unrelated places (× median match distance)
        detail_coherence_sweeps: int = 8
        # A thin hole (at most thin_share of its pixels farther than thin_radius full-resolution pixels
        # from a known one: scratches, thin strokes, blots where they cross) is a few pixels across, so
        # a fade-in as narrow as detail_ramp leaves texture beside the seam, where it costs accuracy for
        # little sharpness. It copies a finer band (thin_sigma), faded in further (thin_ramp) and raised
        # more (thin_gain) to the same sharpness (docs/models/inpaint.md, "Thin holes").
        thin_radius: int = 6  # 0 = every hole as a wide one
        thin_share: float = 0.1  # far from both: the evaluation's thin strokes, thick strokes and boxes
        thin_sigma: float = 0.5
        thin_ramp: float = 2.0
        thin_gain: float = 4.0
        # A narrow hole (half-width at most copy_radius pixels) of a photo above the working size, filled
        # at the native size and detailed: then copied coarse to fine (copy_structure) from the level where
        # its half-width is under twice copy_start_radius pixels. At or below the working size, where the
        # network was trained, and on wider strokes, the fill and detail alone measured better.
        copy_narrow: bool = True
        copy_radius: float = 32
        copy_start_radius: float = 2.0
        copy_pixels: int = 1 << 22  # photos above this many pixels are not copied: the copy takes ~4× the fill
        # A wide hole of a photo above the working size: coarse-to-fine copying from the working size up to
        # the native size. Off by default: with the detail stage on top it lowered the hole's accuracy on
        # held-out photos.
        copy: bool = False
        copy_patch: int = 7  # patch side of the copy, in pixels of each level
        copy_iterations: int = 2  # search-and-vote rounds per level (Wexler et al.'s EM steps)
        copy_search_iterations: int = 2  # PatchMatch iterations per search
        copy_search_size: int = 2048  # above this long side the NNF is only upsampled and voted with, not searched
        copy_temperature: float = 0.001  # vote weights softmax(−D / (this × median D)): nearly the best vote alone
        copy_trust: float = 0.05  # RMS patch error (0–1 levels) at which a copy and the network's fill weigh alike

    def __init__(self, config: Config) -> None:
        super().__init__()
        c = config
        self.config = c
        self.encoder = Encoder(c.width, tuple(c.encoder_dilations))
        self.to_q = nn.Conv2d(c.width, c.attn_channels, 1)
        self.to_k = nn.Conv2d(c.width, c.attn_channels, 1)
        self.to_v = nn.Conv2d(c.width, c.width, 1)
        self.attn = PSAL(patch_size=c.attn_patch, neighbors=c.attn_neighbors, iterations=c.attn_iterations,
                         aggregation="center")
        self.decoder = Decoder(c.width, tuple(c.decoder_dilations))
        self.refine = Refine(c.refine_width)
        # Attends with the NNF transfer_detail builds (it never searches): only its
        # aggregation settings matter.
        self.transfer = PSAL(patch_size=3, neighbors=1, iterations=0, temperature=c.detail_temperature,
                             aggregation="patch")
        # Distances come pre-divided by each level's temperature (copy_vote), hence T = 1.
        self.copier = PSAL(patch_size=c.copy_patch, neighbors=1, iterations=c.copy_search_iterations,
                           temperature=1.0, aggregation="patch")

    def forward(self, image: Tensor, mask: Tensor) -> Tensor:
        return self.run(Direct(), image=image, mask=mask)

    def run(self, ex, image: Tensor, mask: Tensor) -> Tensor:
        """image (B, 3, H, W) in [0, 1], mask (B, 1, H, W) 1 = hole → (B, 3, H, W), known pixels unchanged."""
        c = self.config
        H, W = image.shape[-2:]
        known = 1 - mask
        image = image * known
        radius = hole_radius(mask)
        size = self.working_size(H, W, radius)
        reduction = max(H / size[0], W / size[1])
        # A narrow hole (filled above the working size, and reduced at most _NARROW_REDUCTION times
        # from the native size) of a photo above the working size.
        narrow = max(H, W) > c.work_size and size != self.working_size(H, W) and reduction <= _NARROW_REDUCTION
        # The copy's time grows with the photo's size: photos above copy_pixels are not copied.
        copied = c.copy_narrow and narrow and H * W <= c.copy_pixels and radius <= c.copy_radius
        if size == (H, W):
            out = self.scale_ensemble(ex, image, mask, c.fill_scales > 1 and radius > c.work_radius)
        else:
            small = ex.whole(lambda x, m: _reduce(x, m, size), image, mask)  # (B, 4, h, w)
            fill = self.fill_ensemble(ex, small[:, :3], small[:, 3:])
            if c.copy:
                out = ex.whole(partial(self.copy_structure, generator=ex.generator), image, mask, fill)
            else:
                out = ex.whole(partial(self.upsample_fill, correction=narrow), image, mask, fill, small)
        if c.detail:
            # A narrow hole is filled as the photo's own push-pull fill plus an up-sampled
            # correction (`upsample_fill`): what it lacks is texture, the native band, not
            # all that the reduction lost (a wider band there cost accuracy on held-out photos).
            out = ex.whole(partial(self.add_detail, generator=ex.generator, reduction=1.0 if narrow else reduction),
                           out, mask)
        if copied:
            # Detailed first: where the copy is not trusted, the detailed fill shows (a detail
            # stage on top of the copy lowered its accuracy on held-out photos).
            out = ex.whole(partial(self.copy_structure, generator=ex.generator, start=self.copy_start(mask)),
                           image, mask, out)
        return out

    def upsample_fill(self, image: Tensor, mask: Tensor, fill: Tensor, small: Tensor, correction: bool = True) -> Tensor:
        """The working-size fill brought to the photo's size. Known pixels kept.

        With `correction`, the network's correction of the push-pull fill (`fill` minus the
        push-pull fill of `small`, the reduced photo and hole) is up-sampled onto the push-pull
        fill of the photo itself, which follows the known pixels at full resolution (a thin
        scratch's edges, fine structure beside it) where an up-sampled fill would blur them.
        Without, the fill itself is up-sampled: what a wide hole on a photo reduced to the
        working size takes, since across a hole that wide the two push-pull fills differ by
        more than any detail the photo's own adds (the model card, "Enlarging a wide hole's fill").
        """
        H, W = image.shape[-2:]
        y0, y1, x0, x1 = hole_box(mask, 2)
        crop = (..., slice(y0, y1), slice(x0, x1))
        if correction:
            it = self.config.prefill_iterations
            delta = _bicubic_crop(fill - pyramid_fill(small[:, :3], small[:, 3:], it), (H, W), (y0, y1, x0, x1))
            # A few Jacobi steps per level: the correction carries what the working size saw, the
            # base has only to follow the known pixels at full resolution (a cost of seconds at 12 MP).
            up = pyramid_fill(image[crop], mask[crop], 5) + delta
        else:
            up = _bicubic_crop(fill, (H, W), (y0, y1, x0, x1))
        out = image.clone()
        out[crop] = image[crop] + mask[crop] * up.clamp(0, 1)
        return out

    def working_size(self, height: int, width: int, radius: float | None = None) -> tuple[int, int]:
        """The size the network fills at: the photo's, or reduced to a long side of work_size.

        With the hole's half-width `radius` (`hole_radius`), the largest size, at most the native
        one and work_pixels pixels, at which that half-width is at most work_radius pixels, and never
        below work_size: a scratch is filled at the native size (or at work_pixels on a larger
        photo), a thick stroke across a large photo at about work_pixels, a box at work_size.
        Without it, the size the widest hole gets.
        """
        c = self.config
        factor = c.work_size / max(height, width)
        if radius is not None:
            fits = c.work_radius / radius if radius else math.inf  # where the hole is work_radius wide
            factor = max(factor, min(fits, math.sqrt(c.work_pixels / (height * width))))
        if factor >= 1:
            return height, width
        return max(4, round(height * factor)), max(4, round(width * factor))

    def accepts_size(self, input_name: str, height: int, width: int) -> bool:
        """Whether a photo this size can be filled: PSAL over the encoder's features (1/4 of
        the working size) needs `attn_neighbors` key patches (5×5 px with the defaults)."""
        return self.fills_at(*self.working_size(height, width))

    def fills_at(self, height: int, width: int) -> bool:
        """Whether the network can fill at this working size (enough key patches in its features)."""
        c, down = self.config, int(1 / self.encoder.scale)
        return holds_patches(-(-height // down), -(-width // down), c.attn_patch, c.attn_neighbors)

    def scale_ensemble(self, ex, image: Tensor, mask: Tensor, wide: bool) -> Tensor:
        """`fill_ensemble` at this size; for a `wide` hole, averaged with the fill at half this
        size brought back by `upsample_fill` (the config's fill_scales). Known pixels exact.

        The half-size fill comes back as a correction of this size's push-pull fill: beside the
        native fill, that measured as well as the enlarged fill itself on the selection split
        (the model card), and is how the two scales were chosen."""
        out = self.fill_ensemble(ex, image, mask)
        H, W = image.shape[-2:]
        half = (max(1, round(H / 2)), max(1, round(W / 2)))
        if not wide or not self.fills_at(*half):
            return out
        small = ex.whole(lambda x, m: _reduce(x, m, half), image, mask)
        coarse = ex.whole(self.upsample_fill, image, mask, self.fill_ensemble(ex, small[:, :3], small[:, 3:]), small)
        return ex.whole(lambda a, b: (a + b) / 2, out, coarse)

    def fill_ensemble(self, ex, image: Tensor, mask: Tensor) -> Tensor:
        """`fill`, averaged over the first `fill_flips` views of the input (stages.VIEWS: mirror images, then transposes).

        The network's guesses for a hole differ a little with its orientation; their mean
        is closer to the truth on average (a lower hole error) at the price of one network
        run per view at working size. Composited, so known pixels stay exact.
        """
        views = min(len(VIEWS), max(1, self.config.fill_flips))
        total = None
        for which in range(views):
            seen, back = partial(view, which=which), partial(view, which=which, undo=True)
            out = ex.whole(back, self.fill(ex, ex.whole(seen, image), ex.whole(seen, mask)))
            total = out if total is None else ex.whole(torch.add, total, out)
        return ex.whole(lambda t, x, m: x + m * (t / views), total, image, mask)

    def fill(self, ex, image: Tensor, mask: Tensor) -> Tensor:
        """The learned coarse-to-fine fill at working size; composited, so known pixels stay exact.

        The network corrects a smooth push-pull pre-fill rather than painting from zeros:
        the colours of a large hole are then right from the start, whatever the receptive
        field, and the network spends its capacity on structure.
        """
        H, W = image.shape[-2:]
        base = ex.whole(lambda x, m: pyramid_fill(x, m, self.config.prefill_iterations), image, mask)  # (B, 3, H, W)
        x, m = pad_to_multiple(base, 4), pad_to_multiple(mask, 4)
        feat = ex.local(self.encoder, x, m)  # (B, width, H/4, W/4): everywhere, the attention's keys
        attended = ex.whole(partial(self.attend, generator=ex.generator), feat, m)
        # The decoder and the refinement change hole pixels only: they run on the hole's box and
        # the margins their receptive fields read, which give the same values as the whole map.
        # What the refinement reads (the whole map for a batch without a hole: zero loss, a graph).
        y0, y1, x0, x1 = hole_box(mask, self.refine.radius) if bool(mask.any()) else (0, H, 0, W)
        r, (h, w) = self.decoder.radius, feat.shape[-2:]
        cy0, cy1, cx0, cx1 = max(0, y0 // 4 - r), min(h, -(-y1 // 4) + r), max(0, x0 // 4 - r), min(w, -(-x1 // 4) + r)
        correction = ex.local(self.decoder, feat[..., cy0:cy1, cx0:cx1], attended[..., cy0:cy1, cx0:cx1])
        crop = (..., slice(y0, y1), slice(x0, x1))
        coarse = (base[crop] + correction[..., y0 - 4 * cy0 : y1 - 4 * cy0, x0 - 4 * cx0 : x1 - 4 * cx0]).clamp(0, 1)
        comp = image[crop] + mask[crop] * coarse
        out = image.clone()
        out[crop] = image[crop] + mask[crop] * ex.local(self.refine, comp, mask[crop])
        return out

    def attend(self, feat: Tensor, mask: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """PSAL over the 1/4-size features: hole positions copy features of similar known patches."""
        hole = F.max_pool2d(mask, 4)  # (B, 1, h, w): any hole pixel in the cell
        key_mask = hole[:, 0] > 0
        # Where too few known key patches remain (a nearly full hole), let the hole be keys too.
        valid = valid_key_centres(feat.shape, self.attn.patch_size, key_mask).flatten(1).sum(1)
        key_mask = key_mask & (valid >= self.attn.neighbors)[:, None, None]
        out = self.attn(self.to_q(feat), self.to_k(feat), self.to_v(feat), key_mask=key_mask, generator=generator,
                        query_mask=hole[:, 0] > 0)
        return out * hole

    def copy_start(self, mask: Tensor) -> tuple[int, int]:
        """The coarsest level of a narrow hole's copy: the photo halved while the hole's half-width
        (`hole_radius`) stays at least copy_start_radius pixels and its short side 32.

        There the hole is a line a pixel or two wide, and patches of the known image around
        it match by the structure they hold, not by the network's smooth guess inside it.
        """
        H, W = mask.shape[-2:]
        radius, f = hole_radius(mask), 1
        while radius / (2 * f) >= self.config.copy_start_radius and min(H, W) / (2 * f) >= 32:
            f *= 2
        return max(4, round(H / f)), max(4, round(W / f))

    def copy_structure(self, image: Tensor, mask: Tensor, fill: Tensor, generator: torch.Generator | None = None,
                       start: tuple[int, int] | None = None) -> Tensor:
        """Refine the network's fill into a full-resolution copy of the known image, coarse to fine.

        Multi-scale patch inpainting (Wexler et al. 2007, Newson et al. 2014) started from
        the network's fill: from `start` (default: the fill's size, the working size) up to
        the native size in steps of at most ×2, each level reduces the photo (known pixels
        only, `_reduce`), votes with the nearest-neighbour field of the level below
        (upsampled) and then searches and votes `copy_iterations` times (`copy_level`). So a
        window's edge or a brick course crossing the hole is copied at every resolution from
        the intact copies beside it, not painted by the network. Above `copy_search_size` the
        upsampled field is voted with as it is (bounded time on very large photos). Known
        pixels stay exact.
        """
        c = self.config
        H, W = image.shape[-2:]
        sizes = [start or tuple(fill.shape[-2:])]
        while sizes[-1] != (H, W):
            h, w = sizes[-1]
            sizes.append((min(H, 2 * h), min(W, 2 * w)) if 2 * max(h, w) < max(H, W) else (H, W))
        nnf = None
        for size in sizes:
            if size == (H, W):
                level, hole = image, mask
            else:
                reduced = _reduce(image, mask, size)
                level, hole = reduced[:, :3], reduced[:, 3:]
            prior = level + hole * _resize(fill, size)  # the network's guess: the start and the fallback
            search = max(size) <= c.copy_search_size
            nnf, estimate = self.copy_level(level, hole, prior, nnf, c.copy_iterations if search else 0, generator)
        return estimate

    def copy_level(self, image: Tensor, mask: Tensor, prior: Tensor, nnf: "Copy | None", rounds: int,
                   generator: torch.Generator | None = None) -> tuple["Copy | None", Tensor]:
        """One level of `copy_structure`: vote with the field from below, then `rounds` × (search, vote).

        Queries are the patches of the current estimate that overlap the hole (the only ones
        that vote, `copy_vote`), laid out on the hole's box grown by two patch radii; keys are
        the whole level with every patch that touches the hole forbidden: nothing is copied
        from the hole.
        """
        c = self.config
        r = c.copy_patch // 2
        H, W = image.shape[-2:]
        forbid = mask[:, 0] > 0
        valid = valid_key_centres(image.shape, c.copy_patch, forbid)  # (B, H, W)
        if not bool(mask.any()) or int(valid.flatten(1).sum(1).min()) < 1:
            return nnf, prior
        box = hole_box(mask, 2 * r)
        y0, y1, x0, x1 = box
        voters = F.max_pool2d(mask[..., y0:y1, x0:x1], c.copy_patch, 1, r)  # (B, 1, hq, wq): patches over the hole
        estimate = prior
        indices = None if nnf is None else nnf.upsample(box, (H, W))
        if indices is not None:
            estimate = self.copy_vote(estimate, mask, prior, box, voters, indices, valid)
        for _ in range(rounds):
            query = estimate[..., y0:y1, x0:x1]
            if min(query.shape[-2:]) < c.copy_patch:
                break  # a box thinner than a patch (a hole on a corner of a tiny photo): the network's fill stays
            nnf = self.copier.search(query, estimate, forbid, init=indices, generator=generator, query_mask=voters[:, 0] > 0)
            indices = nnf.indices
            estimate = self.copy_vote(estimate, mask, prior, box, voters, indices, valid, nnf.distances)
        return (None if indices is None else Copy(indices, box, (H, W))), estimate

    def copy_vote(self, estimate: Tensor, mask: Tensor, prior: Tensor, box: tuple[int, int, int, int], voters: Tensor,
                  indices: Tensor, valid: Tensor, distances: Tensor | None = None) -> Tensor:
        """Patch aggregation of the matched known patches into the hole, blended with the prior by match quality.

        Every query patch that covers a hole pixel votes for it, weighted by softmax(−D / T)
        with T = copy_temperature × the median distance of these patches' matches (Wexler et
        al.'s weighting); where the copy rebuilds the known pixels nearby badly (RMS error
        against copy_trust), the network's fill (`prior`) takes over. Sources off `valid` (an
        upsampled field's that touch the hole) get no weight. `voters` (B, 1, hq, wq): 1 at the
        patches of `box` that overlap the hole.
        """
        c = self.config
        y0, y1, x0, x1 = box
        query = estimate[..., y0:y1, x0:x1]
        B, C, hq, wq = query.shape
        # Only patches that overlap the hole vote: a known patch elsewhere may match itself, and
        # would rebuild the known pixels around the hole perfectly whatever the copy. Votes,
        # distances and the trust's error are needed within a patch radius of the hole only.
        hole = mask[..., y0:y1, x0:x1]
        at = voters.flatten().nonzero()[:, 0]  # (n,) flat positions b·hq·wq + y·wq + x
        # An upsampled source off `valid` may sit within a patch radius of the map's edge, where
        # its patch has no pixels: it reads a valid centre instead, its vote gets no weight and
        # no part in the temperature, and a pixel no valid vote covers keeps the prior.
        flat = valid.flatten(1)  # (B, H·W)
        ok = flat.gather(1, indices.flatten(1))  # (B, hq·wq)
        first = flat.float().argmax(1, keepdim=True)  # (B, 1)
        indices = torch.where(ok, indices.flatten(1), first).view_as(indices)
        ok = ok.flatten()[at]  # (n,)
        # The search's own distances when it just ran on this estimate (they are exact).
        if distances is None:
            dist = patch_distances(query, estimate, indices.reshape(-1, 1)[at], c.copy_patch, positions=at)  # (n, 1)
        else:
            dist = distances.reshape(-1, 1)[at]
        dist = torch.where(ok[:, None], dist, 1e20)
        batch = at // (hq * wq)
        counted = [(batch == b) & ok for b in range(B)]
        scale = torch.stack([c.copy_temperature * dist[sel].median().clamp(min=1e-8) if bool(sel.any())
                             else dist.new_ones(()) for sel in counted])
        scaled = torch.full((B * hq * wq, 1), 1e20, dtype=dist.dtype, device=dist.device)  # D / T; no vote elsewhere
        scaled[at] = dist / scale[batch, None]
        votes = self.copier.attend(None, None, estimate, indices, distances=scaled.view(B, hq, wq, 1), positions=at)
        voted = query.new_empty(B, hq, wq, C).copy_(query.permute(0, 2, 3, 1))  # the query, voted near the hole
        voted.view(-1, C)[at] = votes
        voted = voted.permute(0, 3, 1, 2)
        # How well the copy rebuilds the known pixels within a patch of the hole says how far to
        # trust it there (the hole's own error is unknown); far from any known pixel it is trusted.
        error = masked_blur((voted - query).square().mean(1, keepdim=True), (1 - hole) * voters, c.copy_patch)
        trust = torch.exp(-error / c.copy_trust**2 * math.log(2))  # ½ at an RMS error of copy_trust
        cast = query.new_zeros(B * hq * wq)
        cast[at] = ok.to(cast.dtype)  # the valid votes
        trust = trust * F.max_pool2d(cast.view(B, 1, hq, wq), c.copy_patch, 1, c.copy_patch // 2)
        out = estimate.clone()
        out[..., y0:y1, x0:x1] = query + hole * (trust * voted + (1 - trust) * prior[..., y0:y1, x0:x1] - query)
        return out

    def add_detail(self, fill: Tensor, mask: Tensor, generator: torch.Generator | None = None,
                   reduction: float = 1.0) -> Tensor:
        """Copy the high frequencies of matching known full-resolution patches into the hole.

        Works on the hole's box grown by the search margin; the low-pass that separates
        painted from copied frequencies (`detail_band`) widens with the `reduction` to the
        working size, since the upsampled fill lacks all of them.
        """
        band = self.detail_band(mask, reduction)
        y0, y1, x0, x1 = hole_box(mask, self.config.detail_search + math.ceil(3 * band.sigma))
        out = fill.clone()
        out[..., y0:y1, x0:x1] = self.transfer_detail(fill[..., y0:y1, x0:x1], mask[..., y0:y1, x0:x1], band, generator)
        return out

    def detail_band(self, mask: Tensor, reduction: float = 1.0) -> "Band":
        """What `add_detail` copies into this hole: a thin hole's band (thin_*) or a wide one's (detail_*).

        The low-pass widens with the reduction. The gain makes up for the fine contrast that
        a narrow (σ < 1 px) high-pass leaves out at native size, and still up to a reduction
        of `_FULL_GAIN_REDUCTION`; beyond it the band soon holds all the texture that the
        upsampled fill lacks, so the gain goes to 1 as the square of the reduction.
        """
        c = self.config
        thin = c.thin_radius > 0 and far_share(mask, c.thin_radius) <= c.thin_share
        sigma, ramp, gain = (c.thin_sigma, c.thin_ramp, c.thin_gain) if thin else (c.detail_sigma, c.detail_ramp, c.detail_gain)
        r = max(1.0, reduction)
        return Band(sigma * r, ramp, 1 + (gain - 1) * min(1.0, (_FULL_GAIN_REDUCTION / r) ** 2))

    def transfer_detail(self, fill: Tensor, mask: Tensor, band: "Band", generator: torch.Generator | None = None) -> Tensor:
        """`add_detail` on a crop holding the hole.

        Queries and keys: the low-pass (σ = band.sigma) of the composite, in which the fill and the
        known pixels look alike; values: known pixels minus their low-pass (taken over
        known pixels only, so nothing of the hole leaks into them). PatchMatch runs on f×f
        block averages of the hole box (`DetailGrid`) against the blocks of the box grown
        by detail_search pixels, none of them next to the hole (`detail_nnf`, on
        `detail_features`); the block field, upsampled to pixels, drives PSAL's patch
        aggregation at full resolution, and the copied band fades in from the seam
        (`detail_weight`).
        """
        known, sigma = 1 - mask, band.sigma
        low = gaussian_blur(fill, sigma)  # (B, 3, H, W)
        high = (fill - masked_blur(fill, known, sigma)) * known
        grid = DetailGrid.around(mask, self.config)
        forbid = grid.forbidden(mask)
        if not grid.can_search(forbid, self.config.detail_patch):
            return fill  # nothing known to copy from
        fq, fk = self.detail_features(grid, low, high, known, forbid, sigma)
        nnf = self.detail_nnf(fq, fk, forbid, generator)
        detail = self.transfer.attend(grid.query(low), grid.keys(low), grid.keys(high), grid.pixel_indices(nnf))
        return (fill + self.detail_weight(mask, band) * grid.paste(detail)).clamp(0, 1)

    def detail_features(self, grid: "DetailGrid", low: Tensor, high: Tensor, known: Tensor, forbid: Tensor,
                        sigma: float) -> tuple[Tensor, Tensor]:
        """Match features per block, (B, 4, hq, wq) and (B, 4, hk, wk): low-pass colour and texture energy.

        The energy (local RMS of the high band) is extrapolated into the hole from the known
        blocks of the query box, so a flat fill still asks for texture; far from any known
        block (a box-shaped hole has none) it is the mean energy of the allowed keys.
        """
        c = self.config
        energy = masked_blur(high.square().sum(1, keepdim=True), known, 2 * sigma).sqrt()  # (B, 1, H, W)
        eq, ek = grid.blocks(grid.query(energy)), grid.blocks(grid.keys(energy))  # (B, 1, hq, wq), (B, 1, hk, wk)
        qknown = 1 - F.max_pool2d(grid.query(1 - known), grid.f)
        spread = max(1.0, max(grid.hq, grid.wq) / 4)
        num, den = gaussian_blur(eq * qknown, spread), gaussian_blur(qknown, spread)
        allowed = (~forbid)[:, None].float()  # (B, 1, hk, wk)
        fallback = (ek * allowed).sum((2, 3), keepdim=True) / allowed.sum((2, 3), keepdim=True).clamp(min=1)
        guess = torch.where(den > 1e-4, num / den.clamp(min=1e-4), fallback)
        eq = qknown * eq + (1 - qknown) * guess
        w = c.detail_energy_weight
        return (torch.cat([grid.blocks(grid.query(low)), w * eq], 1),
                torch.cat([grid.blocks(grid.keys(low)), w * ek], 1))

    def detail_nnf(self, fq: Tensor, fk: Tensor, forbid: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Block field (B, hq, wq) of flat key-block positions: PatchMatch, then `coherent_nnf`
        grows regions of blocks copied from one place (block edges inside a region are no seams)."""
        c = self.config
        nnf = patchmatch(fq, fk, patch_size=c.detail_patch, neighbors=1,
                         iterations=c.detail_iterations, key_mask=forbid, generator=generator).indices[..., 0]  # (B, hq, wq)
        if c.detail_coherence > 0:
            valid = valid_key_centres(fk.shape, c.detail_patch, forbid)
            nnf = coherent_nnf(fq, fk, nnf, valid, c.detail_patch, c.detail_coherence, c.detail_coherence_sweeps)
        return nnf

    def detail_weight(self, mask: Tensor, band: "Band") -> Tensor:
        """band.gain × fade-in of the copied band, (B, 1, H, W): 0 on known pixels.

        Fade in from the seam over ~band.ramp pixels: next to known pixels the network's
        fill is already informed (thin scratches), and uncorrelated texture there costs more
        accuracy than it adds; deep inside a large hole it is what makes it look real. The
        ramp stays this narrow on a reduced photo: its fill holds none of the copied band
        even next to the seam, and a ramp widened with the reduction shows as a blurred
        strip along the hole's edge.
        """
        ramp = (2 * gaussian_blur(mask, band.ramp) - 1).clamp(0, 1) * mask if band.ramp > 0 else mask
        return band.gain * ramp


@dataclass(frozen=True)
class Band:
    """What the detail stage copies into a hole (`PSALInpaint.detail_band`): the known pixels
    above a Gaussian low-pass of σ `sigma` px, faded in from the seam over ~`ramp` px, × `gain`."""

    sigma: float
    ramp: float
    gain: float


@dataclass
class DetailGrid:
    """Where the detail transfer searches: f×f blocks over the hole's box (queries) and over the
    box grown by detail_search pixels (keys), both in a crop of size (H, W).

    The query box is at least one search patch across (a one-pixel scratch, a hole in a
    corner: the box of such a hole is thinner than a patch), so maps are padded bottom/right
    (replicate) to hold it, and cropped back by `paste`.
    """

    f: int  # block side in pixels
    H: int
    W: int
    qy0: int  # query box origin in the padded crop, size (hq·f, wq·f)
    qx0: int
    hq: int
    wq: int
    ky0: int  # key region origin, size (hk·f, wk·f)
    kx0: int
    hk: int
    wk: int

    @classmethod
    def around(cls, mask: Tensor, c: "PSALInpaint.Config") -> "DetailGrid":
        H, W = mask.shape[-2:]
        y0, y1, x0, x1 = hole_box(mask, 1)
        f = max(1, math.ceil(max(y1 - y0, x1 - x0) / c.detail_match_size))
        hq, wq = max(c.detail_patch, -(-(y1 - y0) // f)), max(c.detail_patch, -(-(x1 - x0) // f))
        py, px = max(f, hq * f - H), max(f, wq * f - W)
        g = c.detail_search
        ky0, ky1, kx0, kx1 = max(0, y0 - g), min(H, y1 + g), max(0, x0 - g), min(W, x1 + g)
        return cls(f, H, W, min(y0, H + py - hq * f), min(x0, W + px - wq * f), hq, wq,
                   ky0, kx0, (ky1 - ky0) // f, (kx1 - kx0) // f)

    def query(self, x: Tensor) -> Tensor:
        """The query box of a (B, C, H, W) map, (B, C, hq·f, wq·f), replicate-padded past the crop."""
        py, px = self.qy0 + self.hq * self.f - self.H, self.qx0 + self.wq * self.f - self.W
        x = F.pad(x, (0, max(0, px), 0, max(0, py)), mode="replicate")
        return x[..., self.qy0 : self.qy0 + self.hq * self.f, self.qx0 : self.qx0 + self.wq * self.f]

    def keys(self, x: Tensor) -> Tensor:
        """The key region of a (B, C, H, W) map, (B, C, hk·f, wk·f)."""
        return x[..., self.ky0 : self.ky0 + self.hk * self.f, self.kx0 : self.kx0 + self.wk * self.f]

    def blocks(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(x, self.f)

    def forbidden(self, mask: Tensor) -> Tensor:
        """(B, hk, wk) bool: key blocks holding or next to a hole pixel (patch aggregation reads ±1 pixel)."""
        return F.max_pool2d(F.max_pool2d(self.keys(mask), self.f), 3, 1, 1)[:, 0] > 0

    def can_search(self, forbid: Tensor, patch: int) -> bool:
        if min(self.hk, self.wk) < patch:
            return False
        return int(valid_key_centres((forbid.shape[0], 1, self.hk, self.wk), patch, forbid).flatten(1).sum(1).min()) >= 1

    def pixel_indices(self, nnf: Tensor) -> Tensor:
        """Block field (B, hq, wq) → pixel field (B, hq·f, wq·f, 1) of flat positions in the key region:
        each query pixel copies from the same place within its matched block."""
        f, wk = self.f, self.wk
        by, bx = nnf[..., None] // wk, nnf[..., None] % wk
        oy = torch.arange(self.hq * f, device=nnf.device).view(1, -1, 1, 1) % f  # (1, hq·f, 1, 1)
        ox = torch.arange(self.wq * f, device=nnf.device).view(1, 1, -1, 1) % f  # (1, 1, wq·f, 1)
        up = lambda t: t.repeat_interleave(f, 1).repeat_interleave(f, 2)
        return (up(by) * f + oy) * (wk * f) + up(bx) * f + ox

    def paste(self, x: Tensor) -> Tensor:
        """A query-box map back into a zero (B, C, H, W) crop."""
        f = self.f
        Hp, Wp = max(self.H, self.qy0 + self.hq * f), max(self.W, self.qx0 + self.wq * f)
        x = F.pad(x, (self.qx0, Wp - self.qx0 - self.wq * f, self.qy0, Hp - self.qy0 - self.hq * f))
        return x[..., : self.H, : self.W]


_STEPS = tuple((s * dy, s * dx) for s in (1, 2, 4, 8) for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)))


def coherent_nnf(query: Tensor, key: Tensor, nnf: Tensor, valid: Tensor, patch: int, price: float, sweeps: int) -> Tensor:
    """Let neighbouring query blocks copy from neighbouring key blocks where that costs little match quality.

    PatchMatch on smooth block features picks, for each block, any of many near-equal
    sources, so the copied texture is a patchwork whose every block edge is a seam.
    Iterated conditional modes on a Potts prior (as the coherence term of Image
    Analogies): each block may take the source of a block 1, 2, 4 or 8 blocks away,
    shifted by that step, paying its extra patch distance but saving `price` × (median
    match distance) per such block it becomes coherent with. The far steps let a large
    coherent region absorb small ones, where nearest-neighbour ICM would freeze in a
    patchwork of 2×2-block regions. Red-black sweeps, so every update lowers the total
    cost (the far steps pair blocks of one colour too, a near-monotone approximation).
    nnf (B, hq, wq) flat key indices → the same, with coherent regions grown.
    """
    B, hq, wq = nnf.shape
    hk, wk = key.shape[-2:]
    dist = patch_distances(query, key, nnf[..., None], patch)  # (B, hq, wq, 1)
    scale = price * dist.flatten(1).median(1).values.clamp(min=1e-12)  # (B,)
    dy = torch.tensor([dy for dy, _ in _STEPS], device=nnf.device)
    dx = torch.tensor([dx for _, dx in _STEPS], device=nnf.device)
    # Per colour, once: its flat positions, their batch item and their neighbours (n, S) at
    # each step, clamped into the map, and whether that neighbour exists.
    flat = torch.arange(B * hq * wq, device=nnf.device)
    sides = []
    for colour in (0, 1):
        these = flat[(flat // wq % hq + flat % wq) % 2 == colour]
        b, y, x = (these // (hq * wq))[:, None], (these // wq % hq)[:, None] + dy, (these % wq)[:, None] + dx
        sides.append((these, b, (b * hq + y.clamp(0, hq - 1)) * wq + x.clamp(0, wq - 1),
                      (y >= 0) & (y < hq) & (x >= 0) & (x < wq)))
    valid = valid.flatten()
    nnf = nnf.flatten().clone()  # (B·hq·wq,), written in place below
    for t in range(2 * sweeps):
        these, b, around, inside = sides[t % 2]
        # The block at (y + dy, x + dx) copies from s; this one would copy from s − (dy, dx).
        n = nnf[around]
        sy, sx = n // wk - dy, n % wk - dx
        ok = inside & (sy >= 0) & (sy < hk) & (sx >= 0) & (sx < wk)
        ok &= valid[b * hk * wk + (sy * wk + sx).clamp(0, hk * wk - 1)]
        proposals = torch.where(ok, sy * wk + sx, -1)  # (n, S), −1 = none
        current = nnf[these, None]  # (n, 1)
        cand = torch.cat([current, torch.where(proposals >= 0, proposals, current)], -1)  # (n, 1 + S)
        agree = (cand[:, :, None] == proposals[:, None, :]).sum(-1)  # neighbours each candidate is coherent with
        cost = patch_distances(query, key, cand, patch, positions=these) - scale[b] * agree
        nnf[these] = cand.gather(-1, cost.argmin(-1, keepdim=True))[:, 0]
    return nnf.view(B, hq, wq)


def pyramid_fill(image: Tensor, mask: Tensor, iterations: int = 20) -> Tensor:
    """Smooth fill of the hole from the known pixels (multigrid push-pull): known pixels are kept exactly.

    Push: halve the known-weighted image and the known fraction until no cell is empty.
    Pull: from the coarsest level up, each level keeps its own known-mean colour in
    proportion to its known fraction and takes the rest from the level above (bilinear),
    then `iterations` Jacobi steps of Laplace's equation relax the unknown part. The
    result approaches the harmonic (membrane) interpolation, as smooth as Telea's and
    continuous at the seam, in a few cheap passes.
    """
    xs, ks = [image * (1 - mask)], [1 - mask]
    while min(xs[-1].shape[-2:]) > 1 and bool((ks[-1] == 0).any()):
        xs.append(F.avg_pool2d(xs[-1], 2, ceil_mode=True))
        ks.append(F.avg_pool2d(ks[-1], 2, ceil_mode=True))
    filled = xs[-1] / ks[-1].clamp(min=1e-8)
    for x, k in zip(reversed(xs[:-1]), reversed(ks[:-1])):
        filled = x + F.interpolate(filled, size=x.shape[-2:], mode="bilinear", align_corners=False) * (1 - k)
        # Jacobi changes only cells not wholly known: it runs on their box grown by a ring of
        # known cells, which keep their values and feed the box's edge as the full map would.
        partly = (k < 1).any(0).any(0)  # (h, w)
        rows, cols = partly.any(1).nonzero(), partly.any(0).nonzero()
        if len(rows) == 0:
            continue
        y0, y1 = max(0, int(rows[0]) - 1), min(k.shape[-2], int(rows[-1]) + 2)
        x0, x1 = max(0, int(cols[0]) - 1), min(k.shape[-1], int(cols[-1]) + 2)
        box = (..., slice(y0, y1), slice(x0, x1))
        known, unknown, inside = x[box], 0.25 * (1 - k[box]), filled[box]
        for _ in range(iterations):
            # The mean of the four neighbours (replicated past the border) as four shifted
            # slices: a depthwise 3×3 convolution costs ten times more on a CPU.
            p = F.pad(inside, (1, 1, 1, 1), mode="replicate")
            around = p[..., :-2, 1:-1] + p[..., 2:, 1:-1] + p[..., 1:-1, :-2] + p[..., 1:-1, 2:]
            inside = torch.addcmul(known, around, unknown)  # x = mean colour × known fraction
        filled[box] = inside
    return filled


def _reduce(image: Tensor, mask: Tensor, size: tuple[int, int]) -> Tensor:
    """Area-downsample to `size` from known pixels only; a cell with any hole pixel is hole. → (B, 4, h, w)."""
    known = 1 - mask
    num = F.interpolate(image * known, size=size, mode="area")
    den = F.interpolate(known, size=size, mode="area")
    hole = (den < 1 - 1e-6).float()
    return torch.cat([num / den.clamp(min=1e-6) * (1 - hole), hole], 1)


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bicubic resize clamped to [0, 1] (the identity at the same size)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bicubic", align_corners=False).clamp(0, 1)


def _bicubic_crop(x: Tensor, size: tuple[int, int], box: tuple[int, int, int, int]) -> Tensor:
    """`F.interpolate(x, size, mode="bicubic", align_corners=False)[..., y0:y1, x0:x1]` to rounding,
    computing only that crop, not the whole photo's resize.

    The resize is separable: the crop is R · x · Cᵀ, where R and C are the rows of torch's own
    1-D weights (the resize of each unit vector; a width of 1 stays 1 with weight 1, exactly).
    """
    def weights(n: int, out: int, lo: int, hi: int) -> Tensor:  # (hi − lo, n)
        unit = torch.eye(n, dtype=x.dtype, device=x.device).view(n, 1, n, 1)
        return F.interpolate(unit, size=(out, 1), mode="bicubic", align_corners=False)[:, 0, lo:hi, 0].T

    y0, y1, x0, x1 = box
    return weights(x.shape[-2], size[0], y0, y1) @ x @ weights(x.shape[-1], size[1], x0, x1).T


@dataclass
class Copy:
    """A level's nearest-neighbour field: flat key positions (B, hq, wq, 1) of the queries in `box` of a `size` map."""

    indices: Tensor
    box: tuple[int, int, int, int]
    size: tuple[int, int]

    def upsample(self, box: tuple[int, int, int, int], size: tuple[int, int]) -> Tensor:
        """The field for the queries of `box` in a larger `size` map: each takes its parent's offset, scaled.

        Sources are clamped into the map; one that now touches the hole is ruled out by the
        vote (`copy_vote`) or replaced by the search.
        """
        H, W = size
        h, w = self.size
        y0, y1, x0, x1 = box
        py0, _, px0, _ = self.box
        hq, wq = self.indices.shape[1:3]
        Y = torch.arange(y0, y1, device=self.indices.device)
        X = torch.arange(x0, x1, device=self.indices.device)
        y = ((Y + 0.5) * h / H).long().clamp(py0, py0 + hq - 1)  # the parent pixel, inside the parent's box
        x = ((X + 0.5) * w / W).long().clamp(px0, px0 + wq - 1)
        parent = self.indices[:, y - py0][:, :, x - px0, 0]  # (B, Hq, Wq)
        sy = (parent // w - y[:, None]) * H / h + Y[:, None]
        sx = (parent % w - x[None, :]) * W / w + X[None, :]
        return (sy.round().long().clamp(0, H - 1) * W + sx.round().long().clamp(0, W - 1))[..., None]
