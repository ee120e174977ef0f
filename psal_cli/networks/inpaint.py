"""PSAL inpainting: a coarse-to-fine fill at a working resolution, then PSAL detail transfer at full resolution.

    image, mask ─ to working size (long side ≤ work_size) ─ push-pull pre-fill ─ encoder ↓4 ─ dilated gated blocks
        ─ PSAL (masked keys: the hole is never copied from) ─ blocks ─ decoder ↑4 (+ pre-fill) ─ refine ─ fill
    fill ─ upsampled to full size ─ detail: PSAL over the full-resolution pixels ─ out

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


def hole_box(mask: Tensor, margin: int) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1): bounding box of the hole over the batch, grown by margin, clipped to the map."""
    H, W = mask.shape[-2:]
    ys = mask.amax(dim=(0, 1, 3)).nonzero()[:, 0]  # (n,) rows holding a hole pixel
    xs = mask.amax(dim=(0, 1, 2)).nonzero()[:, 0]  # (n,) columns holding a hole pixel
    return (max(0, int(ys[0]) - margin), min(H, int(ys[-1]) + 1 + margin),
            max(0, int(xs[0]) - margin), min(W, int(xs[-1]) + 1 + margin))


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
        work_size: int = 512  # long side of the working resolution (larger photos are reduced, then detailed)
        fill_flips: int = 4  # self-ensemble at inference: mean fill over the first 1–8 views of stages.VIEWS
        detail: bool = True  # full-resolution PSAL detail transfer
        detail_gain: float = 1.7  # gain on the copied band at native size (→ 1 on reduced photos, see transfer_detail)
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

    def forward(self, image: Tensor, mask: Tensor) -> Tensor:
        return self.run(Direct(), image=image, mask=mask)

    def run(self, ex, image: Tensor, mask: Tensor) -> Tensor:
        """image (B, 3, H, W) in [0, 1], mask (B, 1, H, W) 1 = hole → (B, 3, H, W), known pixels unchanged."""
        H, W = image.shape[-2:]
        known = 1 - mask
        image = image * known
        size = self.working_size(H, W)
        if size != (H, W):
            small = ex.whole(lambda x, m: _reduce(x, m, size), image, mask)  # (B, 4, h, w)
            fill = self.fill_ensemble(ex, small[:, :3], small[:, 3:])
            fill = ex.whole(lambda f: F.interpolate(f, size=(H, W), mode="bicubic", align_corners=False).clamp(0, 1), fill)
            out = image + mask * fill
        else:
            out = self.fill_ensemble(ex, image, mask)
        if self.config.detail:
            out = ex.whole(partial(self.add_detail, generator=ex.generator), out, mask)
        return out

    def working_size(self, height: int, width: int) -> tuple[int, int]:
        """The size the network fills at: the photo's, or reduced to a long side of work_size."""
        factor = self.config.work_size / max(height, width)
        if factor >= 1:
            return height, width
        return max(4, round(height * factor)), max(4, round(width * factor))

    def accepts_size(self, input_name: str, height: int, width: int) -> bool:
        """Whether a photo this size can be filled: PSAL over the encoder's features (1/4 of
        the working size) needs `attn_neighbors` key patches (5×5 px with the defaults)."""
        c, down = self.config, int(1 / self.encoder.scale)
        h, w = self.working_size(height, width)
        return holds_patches(-(-h // down), -(-w // down), c.attn_patch, c.attn_neighbors)

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
        feat = ex.local(self.encoder, x, m)  # (B, width, H/4, W/4)
        attended = ex.whole(partial(self.attend, generator=ex.generator), feat, m)
        coarse = (base + ex.local(self.decoder, feat, attended)[..., :H, :W]).clamp(0, 1)  # (B, 3, H, W)
        comp = image + mask * coarse
        return image + mask * ex.local(self.refine, comp, mask)

    def attend(self, feat: Tensor, mask: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """PSAL over the 1/4-size features: hole positions copy features of similar known patches."""
        hole = F.max_pool2d(mask, 4)  # (B, 1, h, w): any hole pixel in the cell
        key_mask = hole[:, 0] > 0
        # Where too few known key patches remain (a nearly full hole), let the hole be keys too.
        valid = valid_key_centres(feat.shape, self.attn.patch_size, key_mask).flatten(1).sum(1)
        key_mask = key_mask & (valid >= self.attn.neighbors)[:, None, None]
        out = self.attn(self.to_q(feat), self.to_k(feat), self.to_v(feat), key_mask=key_mask, generator=generator)
        return out * hole

    def add_detail(self, fill: Tensor, mask: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Copy the high frequencies of matching known full-resolution patches into the hole.

        Works on the hole's box grown by the search margin; the low-pass that separates
        painted from copied frequencies widens with the reduction to the working size
        (σ = detail_sigma × size / work_size), since the upsampled fill lacks all of them.
        """
        c = self.config
        H, W = fill.shape[-2:]
        sigma = c.detail_sigma * max(1.0, max(H, W) / c.work_size)
        y0, y1, x0, x1 = hole_box(mask, c.detail_search + math.ceil(3 * sigma))
        out = fill.clone()
        out[..., y0:y1, x0:x1] = self.transfer_detail(fill[..., y0:y1, x0:x1], mask[..., y0:y1, x0:x1], sigma, generator)
        return out

    def transfer_detail(self, fill: Tensor, mask: Tensor, sigma: float, generator: torch.Generator | None = None) -> Tensor:
        """`add_detail` on a crop holding the hole.

        Queries and keys: the low-pass (σ) of the composite, in which the fill and the
        known pixels look alike; values: known pixels minus their low-pass (taken over
        known pixels only, so nothing of the hole leaks into them). PatchMatch runs on f×f
        block averages of the hole box (long side ≤ detail_match_size blocks), against keys
        in the box grown by detail_search pixels, with every block near the hole
        forbidden; `coherent_nnf` then grows regions of blocks copied from one place (block
        edges inside a region are no seams); the NNF, upsampled (each query pixel copies
        from the same place within its matched block), drives PSAL's patch aggregation at
        full resolution.
        """
        c = self.config
        H, W = fill.shape[-2:]
        known = 1 - mask
        low = gaussian_blur(fill, sigma)  # (B, 3, H, W)
        high = (fill - masked_blur(fill, known, sigma)) * known
        y0, y1, x0, x1 = hole_box(mask, 1)
        f = max(1, math.ceil(max(y1 - y0, x1 - x0) / c.detail_match_size))
        # The query box in blocks, at least one search patch across (a one-pixel scratch, a hole
        # in a corner: the box of such a hole is thinner than a patch).
        hq, wq = max(c.detail_patch, -(-(y1 - y0) // f)), max(c.detail_patch, -(-(x1 - x0) // f))
        # Pad bottom/right so the block-aligned query box always fits; cropped back at the end.
        py, px = max(f, hq * f - H), max(f, wq * f - W)
        low_p, mask_p = F.pad(low, (0, px, 0, py), mode="replicate"), F.pad(mask, (0, px, 0, py), mode="replicate")
        qy0, qx0 = min(y0, H + py - hq * f), min(x0, W + px - wq * f)
        q = low_p[..., qy0 : qy0 + hq * f, qx0 : qx0 + wq * f]  # (B, 3, hq·f, wq·f)
        g = c.detail_search
        ky0, ky1, kx0, kx1 = max(0, y0 - g), min(H, y1 + g), max(0, x0 - g), min(W, x1 + g)
        hk, wk = (ky1 - ky0) // f, (kx1 - kx0) // f  # key region in blocks
        k, v = low[..., ky0 : ky0 + hk * f, kx0 : kx0 + wk * f], high[..., ky0 : ky0 + hk * f, kx0 : kx0 + wk * f]
        forbid = F.max_pool2d(mask[..., ky0 : ky0 + hk * f, kx0 : kx0 + wk * f], f)  # (B, 1, hk, wk)
        forbid = F.max_pool2d(forbid, 3, 1, 1)[:, 0] > 0  # blocks next to the hole too: patch aggregation reads ±1 pixel
        if min(hk, wk) < c.detail_patch or int(valid_key_centres((forbid.shape[0], 1, hk, wk), c.detail_patch, forbid).flatten(1).sum(1).min()) < 1:
            return fill  # nothing known to copy from
        # Match features per block: low-pass colour plus the local texture energy, which in the
        # hole is extrapolated from the known blocks around it (so a flat fill still asks for texture).
        energy = masked_blur(high.square().sum(1, keepdim=True), known, 2 * sigma).sqrt()  # (B, 1, H, W)
        energy_p = F.pad(energy, (0, px, 0, py), mode="replicate")
        eq = F.avg_pool2d(energy_p[..., qy0 : qy0 + hq * f, qx0 : qx0 + wq * f], f)  # (B, 1, hq, wq)
        ek = F.avg_pool2d(energy[..., ky0 : ky0 + hk * f, kx0 : kx0 + wk * f], f)  # (B, 1, hk, wk)
        qknown = 1 - F.max_pool2d(mask_p[..., qy0 : qy0 + hq * f, qx0 : qx0 + wq * f], f)
        spread = max(1.0, max(hq, wq) / 4)
        num, den = gaussian_blur(eq * qknown, spread), gaussian_blur(qknown, spread)
        # Far from any known block of the query box (a box-shaped hole has none): the mean
        # texture energy of the keys that may be copied from.
        allowed = (~forbid)[:, None].float()  # (B, 1, hk, wk)
        fallback = (ek * allowed).sum((2, 3), keepdim=True) / allowed.sum((2, 3), keepdim=True).clamp(min=1)
        guess = torch.where(den > 1e-4, num / den.clamp(min=1e-4), fallback)
        eq = qknown * eq + (1 - qknown) * guess
        w = c.detail_energy_weight
        fq = torch.cat([F.avg_pool2d(q, f), w * eq], 1)  # (B, 4, hq, wq)
        fk = torch.cat([F.avg_pool2d(k, f), w * ek], 1)  # (B, 4, hk, wk)
        nnf = patchmatch(fq, fk, patch_size=c.detail_patch, neighbors=1,
                         iterations=c.detail_iterations, key_mask=forbid, generator=generator).indices  # (B, hq, wq, 1)
        if c.detail_coherence > 0:
            valid = valid_key_centres(fk.shape, c.detail_patch, forbid)
            nnf = coherent_nnf(fq, fk, nnf[..., 0], valid, c.detail_patch, c.detail_coherence, c.detail_coherence_sweeps)[..., None]
        by, bx = nnf // wk, nnf % wk
        oy = torch.arange(hq * f, device=fill.device).view(1, -1, 1, 1) % f  # (1, hq·f, 1, 1)
        ox = torch.arange(wq * f, device=fill.device).view(1, 1, -1, 1) % f  # (1, 1, wq·f, 1)
        up = lambda t: t.repeat_interleave(f, 1).repeat_interleave(f, 2)
        indices = (up(by) * f + oy) * (wk * f) + up(bx) * f + ox  # full-resolution key positions
        detail = self.transfer.attend(q, k, v, indices)  # (B, 3, hq·f, wq·f)
        detail = F.pad(detail, (qx0, W + px - qx0 - wq * f, qy0, H + py - qy0 - hq * f))[..., :H, :W]
        # Fade the copied texture in from the seam over ~detail_ramp pixels: next to known pixels
        # the network's fill is already informed (thin scratches), and uncorrelated texture there
        # costs more accuracy than it adds; deep inside a large hole it is what makes it look real.
        # The ramp stays this narrow on a reduced photo: its fill holds none of the copied band
        # even next to the seam, and a ramp widened with the reduction shows as a blurred strip
        # along the hole's edge.
        weight = (2 * gaussian_blur(mask, c.detail_ramp) - 1).clamp(0, 1) * mask if c.detail_ramp > 0 else mask
        # The gain makes up for the fine contrast that a narrow (σ < 1 px) high-pass leaves out
        # at native size; on a reduced photo the band is wide and holds all the texture that the
        # upsampled fill lacks, so the gain goes to 1 with the reduction.
        gain = 1 + (c.detail_gain - 1) * c.detail_sigma / sigma
        return (fill + gain * weight * detail).clamp(0, 1)


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
    scale = price * dist.flatten(1).median(1).values.clamp(min=1e-12).view(B, 1, 1, 1)
    ys = torch.arange(hq, device=nnf.device).view(1, -1, 1)
    xs = torch.arange(wq, device=nnf.device).view(1, 1, -1)
    colour = (ys + xs) % 2  # (1, hq, wq)
    for t in range(2 * sweeps):
        proposals = []
        for dy, dx in _STEPS:  # the block at (y + dy, x + dx) copies from s; this one would copy from s − (dy, dx)
            n = torch.roll(nnf, (-dy, -dx), (1, 2))
            sy, sx = n // wk - dy, n % wk - dx
            inside = (ys + dy >= 0) & (ys + dy < hq) & (xs + dx >= 0) & (xs + dx < wq) & (sy >= 0) & (sy < hk) & (sx >= 0) & (sx < wk)
            at = torch.where(inside, sy * wk + sx, nnf)
            ok = inside & valid.flatten(1).gather(1, at.flatten(1)).view_as(at)
            proposals.append(torch.where(ok, at, -1))
        proposals = torch.stack(proposals, -1)  # (B, hq, wq, S), −1 = none
        cand = torch.cat([nnf[..., None], torch.where(proposals >= 0, proposals, nnf[..., None])], -1)  # (B, hq, wq, 1 + S)
        agree = (cand[..., :, None] == proposals[..., None, :]).sum(-1)  # neighbours each candidate is coherent with
        cost = patch_distances(query, key, cand, patch) - scale * agree
        best = cand.gather(-1, cost.argmin(-1, keepdim=True))[..., 0]
        nnf = torch.where(colour == t % 2, best, nnf)
    return nnf


_NEIGHBOURS = torch.tensor([[0.0, 0.25, 0.0], [0.25, 0.0, 0.25], [0.0, 0.25, 0.0]]).view(1, 1, 3, 3)


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
    kernel = _NEIGHBOURS.to(image).repeat(image.shape[1], 1, 1, 1)  # (C, 1, 3, 3)
    for x, k in zip(reversed(xs[:-1]), reversed(ks[:-1])):
        filled = x + F.interpolate(filled, size=x.shape[-2:], mode="bilinear", align_corners=False) * (1 - k)
        for _ in range(iterations):
            around = F.conv2d(F.pad(filled, (1, 1, 1, 1), mode="replicate"), kernel, groups=image.shape[1])
            filled = x + around * (1 - k)  # x = mean colour × known fraction
    return filled


def _reduce(image: Tensor, mask: Tensor, size: tuple[int, int]) -> Tensor:
    """Area-downsample to `size` from known pixels only; a cell with any hole pixel is hole. → (B, 4, h, w)."""
    known = 1 - mask
    num = F.interpolate(image * known, size=size, mode="area")
    den = F.interpolate(known, size=size, mode="area")
    hole = (den < 1 - 1e-6).float()
    return torch.cat([num / den.clamp(min=1e-6) * (1 - hole), hole], 1)
