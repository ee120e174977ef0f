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

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from psal_cli.attention import PSAL, patch_distances, valid_key_centres
from psal_cli.networks import register_model
from psal_cli.networks.stages import Direct, LocalStage, conv_radius

BICUBIC_RADIUS = 2  # bicubic interpolation reads 2 input pixels on each side
_CHUNK_ELEMENTS = 1 << 24  # query-key distances held at once by the exact search (64 MB)


class ResBlock(nn.Module):
    """conv-ReLU-conv with an identity skip (EDSR: no batch norm)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.relu(self.conv1(x)))


class Head(LocalStage):
    """RGB → features, then the residual blocks before attention."""

    def __init__(self, channels: int, blocks: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 3, padding=1)
        self.body = nn.Sequential(*(ResBlock(channels) for _ in range(blocks)))
        self.radius = conv_radius(self)

    def forward(self, lr: Tensor) -> Tensor:
        return self.body(self.conv(lr))


class Tail(LocalStage):
    """The residual blocks after attention, sub-pixel upsampling, plus bicubic(lr)."""

    def __init__(self, channels: int, blocks: int, scale: int) -> None:
        super().__init__()
        self.body = nn.Sequential(*(ResBlock(channels) for _ in range(blocks)))
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.up = nn.Conv2d(channels, 3 * scale * scale, 3, padding=1)
        self.shuffle = nn.PixelShuffle(scale)
        self.radius = max(conv_radius(self), BICUBIC_RADIUS)
        self.scale = Fraction(scale)
        self._s = scale

    def forward(self, feat: Tensor, lr: Tensor) -> Tensor:
        x = F.relu(self.conv(self.body(feat)))
        base = F.interpolate(lr, scale_factor=self._s, mode="bicubic", align_corners=False)
        return self.shuffle(self.up(x)) + base  # (B, 3, s·H, s·W)


def nearest_patches(q: Tensor, k: Tensor, patch_size: int, neighbors: int, grid_keys: int) -> Tensor:
    """(B, H, W, neighbors) flat key indices of the nearest patches, for self-attention.

    What PatchMatch approximates, with its conventions (replicate-padded queries, key
    centres r pixels inside the map), computed as matrix products over query chunks:
    O(N·M·C·p²) time for M searched keys, O(chunk·M) memory. On a CPU this beats
    PatchMatch's gathers up to a few hundred thousand positions (a 1-megapixel ×4 output
    has 62,500). Up to `grid_keys` positions the search is exact (training crops, small
    images); above, it searches the keys on a stride-s grid (M ≤ grid_keys) and then
    every position within s // 2 of each match, which finds the exact neighbours of all
    but the most isolated patches at ~1/s² of the cost.
    """
    r = patch_size // 2
    B, _, H, W = q.shape
    stride = max(1, math.ceil(math.sqrt(H * W / grid_keys)))
    qp = F.unfold(F.pad(q, (r, r, r, r), mode="replicate"), patch_size).transpose(1, 2)  # (B, N, C·p²)
    kp = F.unfold(k, patch_size, padding=r)  # (B, C·p², N)
    valid = valid_key_centres(k.shape, patch_size, None).flatten(1).to(q.device)  # (B, N)
    # ‖q − k‖² = ‖q‖² − 2 q·k + ‖k‖²; ‖q‖² is the same for every key of a query: left out.
    bias = kp.square().sum(1).masked_fill(~valid, float("inf"))[:, None]  # (B, 1, N)
    grid = (torch.arange(0, H, stride)[:, None] * W + torch.arange(0, W, stride)).flatten().to(q.device)  # (M,)
    step = max(1, _CHUNK_ELEMENTS // (B * grid.numel()))
    found = torch.cat([grid[(bias[..., grid] - 2 * qp[:, a : a + step] @ kp[..., grid]).topk(neighbors, -1, largest=False).indices]
                       for a in range(0, H * W, step)], 1)  # (B, N, k)
    if stride == 1:
        return found.view(B, H, W, neighbors)
    # Refine: every valid position within s // 2 of a match, each counted once; in chunks of
    # queries, as the candidates' patches (N, m, C·p²) would not fit at once.
    d = torch.arange(-(stride // 2), stride // 2 + 1, device=q.device)
    dy, dx = d.repeat_interleave(d.numel()), d.repeat(d.numel())
    keys = kp.transpose(1, 2).reshape(B * H * W, -1)  # (B·N, C·p²)
    base = (torch.arange(B, device=q.device) * H * W)[:, None, None]
    m = neighbors * d.numel() ** 2
    step = max(1, _CHUNK_ELEMENTS // (B * m * keys.shape[1]))
    out = torch.empty_like(found)
    for a in range(0, H * W, step):
        near = found[:, a : a + step]  # (B, n, k)
        y, x = (near // W)[..., None] + dy, (near % W)[..., None] + dx  # (B, n, k, (2ρ+1)²)
        inside = (y >= 0) & (y < H) & (x >= 0) & (x < W)
        cand = torch.where(inside, y * W + x, near[..., None]).flatten(2).sort(-1).values  # (B, n, m)
        rows = cand + base
        dist = bias.view(-1)[rows] - 2 * (F.embedding(rows, keys) @ qp[:, a : a + step, :, None])[..., 0]  # (B, n, m)
        dist[..., 1:].masked_fill_(cand[..., 1:] == cand[..., :-1], float("inf"))
        out[:, a : a + step] = cand.gather(-1, dist.topk(neighbors, -1, largest=False).indices)
    return out.view(B, H, W, neighbors)


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

    def __init__(self, channels: int, qk_channels: int, psal: PSAL, exact_keys: int, grid_keys: int) -> None:
        super().__init__()
        self.query = nn.Conv2d(channels, qk_channels, 1)
        self.key = nn.Conv2d(channels, qk_channels, 1)
        self.value = nn.Conv2d(channels, channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.tensor(0.1))
        self.psal = psal
        self.exact_keys, self.grid_keys = exact_keys, grid_keys

    def forward(self, feat: Tensor) -> Tensor:
        q, k = self.query(feat), self.key(feat)
        if q.shape[-2] * q.shape[-1] <= self.exact_keys:
            with torch.no_grad():
                indices = nearest_patches(q, k, self.psal.patch_size, self.psal.neighbors, self.grid_keys)
            distances = None
        else:
            nnf = self.psal.search(q, k)
            indices, distances = nnf.indices, nnf.distances
        if torch.is_grad_enabled():
            return feat + self.gamma * self.out(self.value(self.psal.attend(q, k, feat, indices, distances)))
        if distances is None:
            distances = patch_distances(q, k, indices, self.psal.patch_size)
        del q, k
        values = feat.contiguous(memory_format=torch.channels_last)  # rows to gather: a copy only if not already so
        out = torch.empty_like(feat)
        rows = max(1, self.psal.query_chunk // feat.shape[-1])
        for a in range(0, feat.shape[-2], rows):
            band = self.psal.attend(None, None, values, indices[:, a : a + rows], distances[:, a : a + rows])
            out[:, :, a : a + rows] = feat[:, :, a : a + rows] + self.gamma * self.out(self.value(band))
        return out


@register_model("psal-upscale")
class PSALUpscale(nn.Module):
    """EDSR-style ×2/×3/×4 super-resolution with a PSAL block between two residual bodies."""

    task = "upscale"

    @dataclass
    class Config:
        scale: int = 4
        channels: int = 32
        blocks_before: int = 4  # residual blocks before the attention block
        blocks_after: int = 6  # residual blocks after it
        attention: bool = True  # False: the same network without PSAL (the ablation)
        qk_channels: int = 16
        patch_size: int = 3
        neighbors: int = 4
        iterations: int = 6  # PatchMatch iterations at inference (training may use fewer)
        temperature: float = 1.0
        exact_keys: int = 1 << 18  # maps with more positions than this use PatchMatch, not nearest_patches
        grid_keys: int = 1 << 14  # maps with more positions than this search a key grid, then refine

    def __init__(self, config: Config) -> None:
        super().__init__()
        if config.scale not in (2, 3, 4):
            raise ValueError(f"scale must be 2, 3 or 4, got {config.scale}")
        self.config = config
        c = config
        self.head = Head(c.channels, c.blocks_before)
        psal = PSAL(c.patch_size, c.neighbors, c.iterations, c.temperature, aggregation="center")
        self.attention = Attention(c.channels, c.qk_channels, psal, c.exact_keys, c.grid_keys) if c.attention else None
        self.tail = Tail(c.channels, c.blocks_after, c.scale)

    def run(self, ex, image: Tensor) -> Tensor:
        """image (B, 3, H, W) in [0, 1] → (B, 3, s·H, s·W) in [0, 1]."""
        feat = ex.local(self.head, image)
        if self.attention is not None:
            feat = ex.whole(self.attention, feat)
        return ex.local(self.tail, feat, image).clamp(0, 1)

    def forward(self, image: Tensor) -> Tensor:
        return self.run(Direct(), image=image)
