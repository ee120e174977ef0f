"""PSAL: the Patch-based Stochastic Attention Layer (Cherel et al., CVIU; see PSAL.md).

Each query position attends to its k approximate nearest-neighbour *patches* among the
keys, found by PatchMatch, instead of to all keys: memory is O(N·k) and attention stays
global at full resolution. This module knows nothing of images, files or networks.

Conventions used throughout:
- maps are (B, C, H, W); a key position is the flat index y·Wk + x into its own key map;
- a patch is p×p (p odd, r = p // 2). Key patch centres must lie r pixels inside the key
  map and must not touch a masked key pixel. Query patches that cross the border use
  replicate padding, in the search and in the differentiable distances alike;
- distances are float32 sums of squared differences over the patch, whatever the input dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Query–key pairs evaluated per step: bounds the peak of the gathered (pairs, C) blocks.
_PAIR_ELEMENTS = 1 << 22
# The eight neighbours of a match, tried every iteration: overlapping patches are alike.
_NEAR = ((0, 1), (0, -1), (1, 0), (-1, 0), (1, 1), (1, -1), (-1, 1), (-1, -1))


@dataclass
class NNF:
    """A nearest-neighbour field: the k best key patches for every query position."""

    indices: Tensor  # (B, Hq, Wq, k) int64 flat key positions y·Wk + x
    distances: Tensor  # (B, Hq, Wq, k) float32, ascending


class _Maps:
    """Query and key maps laid out channels-last and flattened over the batch.

    Pairs are then plain row gathers: the query patch pixel x + d is row
    `qrow(x) + qoff[d]` of the padded query map, the key pixel y + d is row
    `krow(y) + koff[d]`, for the same list of patch offsets d.
    """

    def __init__(self, query: Tensor, key: Tensor, patch_size: int) -> None:
        r = patch_size // 2
        self.B, self.C, self.Hq, self.Wq = query.shape
        self.Hk, self.Wk = key.shape[-2:]
        self.r = r
        padded = F.pad(query.float(), (r, r, r, r), mode="replicate") if r else query.float()
        self.Wp = self.Wq + 2 * r
        self.q = padded.permute(0, 2, 3, 1).reshape(-1, self.C)  # (B·(Hq+2r)·(Wq+2r), C)
        self.k = key.float().permute(0, 2, 3, 1).reshape(-1, self.C)  # (B·Hk·Wk, C)
        dy, dx = torch.meshgrid(torch.arange(-r, r + 1), torch.arange(-r, r + 1), indexing="ij")
        device = query.device
        self.qoff = (dy * self.Wp + dx).flatten().to(device)  # (p²,)
        self.koff = (dy * self.Wk + dx).flatten().to(device)  # (p²,)

    def query_rows(self) -> Tensor:
        """Row of every query centre in the padded map, in (B, Hq, Wq) order."""
        r, device = self.r, self.q.device
        b = torch.arange(self.B, device=device).view(-1, 1, 1)
        y = torch.arange(self.Hq, device=device).view(1, -1, 1)
        x = torch.arange(self.Wq, device=device).view(1, 1, -1)
        rows = (b * (self.Hq + 2 * r) + y + r) * self.Wp + x + r
        return rows.flatten()  # (B·Hq·Wq,)

    def key_base(self) -> Tensor:
        """Offset of each batch element's key map in the flattened keys, per query."""
        b = torch.arange(self.B, device=self.q.device).repeat_interleave(self.Hq * self.Wq)
        return b * (self.Hk * self.Wk)  # (B·Hq·Wq,)


def _pair_distances(q: Tensor, k: Tensor, qrows: Tensor, krows: Tensor, qoff: Tensor, koff: Tensor) -> Tensor:
    """Patch SSD for pairs (qrows[i], krows[i]); differentiable in q and k."""
    total = None
    for oq, ok in zip(qoff.tolist(), koff.tolist()):
        diff = k.index_select(0, krows + ok) - q.index_select(0, qrows + oq)  # (P, C)
        term = diff.square().sum(1)  # (P,)
        total = term if total is None else total + term
    return total


def _chunked_pair_distances(maps: _Maps, qrows: Tensor, krows: Tensor) -> Tensor:
    """`_pair_distances` over any number of pairs in bounded memory (no autograd)."""
    step = max(1, _PAIR_ELEMENTS // maps.C)
    out = torch.empty(qrows.numel(), dtype=torch.float32, device=qrows.device)
    for a in range(0, qrows.numel(), step):
        out[a : a + step] = _pair_distances(maps.q, maps.k, qrows[a : a + step], krows[a : a + step], maps.qoff, maps.koff)
    return out


def valid_key_centres(key_shape: tuple[int, int, int, int], patch_size: int, key_mask: Tensor | None) -> Tensor:
    """(B, Hk, Wk) bool: where a key patch may be centred (inside the map, off the mask)."""
    B, _, Hk, Wk = key_shape
    r = patch_size // 2
    valid = torch.zeros(B, Hk, Wk, dtype=torch.bool, device=key_mask.device if key_mask is not None else None)
    valid[:, r : Hk - r, r : Wk - r] = True
    if key_mask is not None:
        touched = F.max_pool2d(key_mask[:, None].float(), patch_size, stride=1, padding=r)[:, 0] > 0
        valid &= ~touched
    return valid


def _check_inputs(query: Tensor, key: Tensor, patch_size: int, neighbors: int, key_mask: Tensor | None) -> None:
    if patch_size < 1 or patch_size % 2 == 0:
        raise ValueError(f"patch_size must be odd and >= 1, got {patch_size}")
    if neighbors < 1:
        raise ValueError(f"neighbors must be >= 1, got {neighbors}")
    if query.dim() != 4 or key.dim() != 4:
        raise ValueError(f"query and key must be (B, C, H, W), got {tuple(query.shape)} and {tuple(key.shape)}")
    if query.shape[:2] != key.shape[:2]:
        raise ValueError(f"query {tuple(query.shape)} and key {tuple(key.shape)} differ in batch or channels")
    if min(key.shape[-2:]) < patch_size or min(query.shape[-2:]) < 1:
        raise ValueError(f"key map {tuple(key.shape[-2:])} is smaller than one {patch_size}×{patch_size} patch")
    if key_mask is not None and key_mask.shape != (key.shape[0], *key.shape[-2:]):
        raise ValueError(f"key_mask must be (B, Hk, Wk) = {(key.shape[0], *key.shape[-2:])}, got {tuple(key_mask.shape)}")


def patchmatch(
    query: Tensor,
    key: Tensor,
    *,
    patch_size: int = 3,
    neighbors: int = 4,
    iterations: int = 6,
    key_mask: Tensor | None = None,
    init: NNF | Tensor | None = None,
    generator: torch.Generator | None = None,
) -> NNF:
    """Approximate k-nearest-neighbour patches of every query position among the keys.

    PatchMatch with k neighbours (PSAL.md): random distinct init, then per iteration a
    jump-flood propagation of the neighbours' whole k-lists (jumps 8·2⁻ᵗ and 1 in the
    four directions), a random search around every held match in windows halving from
    the key map size down to one pixel, and the eight neighbours of the best match.
    Only candidates not already held are evaluated.
    `init` (an NNF or (B, Hq, Wq, k') indices into this key map) seeds the search.
    """
    _check_inputs(query, key, patch_size, neighbors, key_mask)
    with torch.no_grad():
        return _patchmatch(query, key, patch_size, neighbors, iterations, key_mask, init, generator)


def _patchmatch(query, key, patch_size, k, iterations, key_mask, init, generator) -> NNF:
    maps = _Maps(query, key, patch_size)
    B, Hq, Wq, Hk, Wk, r = maps.B, maps.Hq, maps.Wq, maps.Hk, maps.Wk, maps.r
    device = query.device
    valid = valid_key_centres(key.shape, patch_size, key_mask).to(device)  # (B, Hk, Wk)
    counts = valid.flatten(1).sum(1)  # (B,)
    fewest = int(counts.min())
    if fewest == 0:
        raise ValueError("every key patch is masked or crosses the border: nothing to match")
    if fewest < k:
        raise ValueError(f"neighbors={k} exceeds the {fewest} valid {patch_size}×{patch_size} key patches")
    valid_flat = valid.flatten()  # (B·Hk·Wk,)
    listed = valid.flatten(1).nonzero()[:, 1]  # valid positions, batch after batch
    starts = torch.cumsum(counts, 0) - counts  # (B,)
    qrows = maps.query_rows()  # (n,)
    kbase = maps.key_base()  # (n,)
    n = qrows.numel()
    batch = kbase // (Hk * Wk)

    def rand(*shape: int) -> Tensor:
        return torch.rand(*shape, generator=generator).to(device)

    def merge(held: Tensor, held_d: Tensor, cand: Tensor) -> tuple[Tensor, Tensor]:
        """Keep the k best distinct valid positions of held ∪ cand; evaluates only new ones."""
        # Sort by position with held entries first among equals (key 2y < 2y + 1).
        keys, order = torch.cat([held * 2, cand * 2 + 1], 1).sort(1)  # (n, k + m)
        idx = keys >> 1
        first = torch.ones_like(keys, dtype=torch.bool)
        first[:, 1:] = idx[:, 1:] != idx[:, :-1]
        dist = torch.cat([held_d, torch.full(cand.shape, math.inf, device=device)], 1).gather(1, order)
        fresh = first & (keys & 1).bool() & (idx >= 0)
        fresh &= valid_flat[kbase[:, None] + idx.clamp(min=0)]
        rows, cols = fresh.nonzero(as_tuple=True)
        if rows.numel():
            dist[rows, cols] = _chunked_pair_distances(maps, qrows[rows], kbase[rows] + idx[rows, cols])
        dist = dist.masked_fill(~first, math.inf)
        best_d, pick = dist.topk(k, 1, largest=False, sorted=True)
        return idx.gather(1, pick), best_d

    # Init: k distinct valid positions, evenly spaced in the valid list from a random start.
    count_q = counts[batch]  # (n,)
    start = (rand(n) * count_q).long()
    spread = torch.arange(k, device=device) * (count_q // k).clamp(min=1)[:, None]
    held = listed[starts[batch][:, None] + (start[:, None] + spread) % count_q[:, None]]  # (n, k)
    held_d = _chunked_pair_distances(maps, qrows.repeat_interleave(k), (kbase[:, None] + held).flatten()).view(n, k)
    if init is not None:
        seed = (init.indices if isinstance(init, NNF) else init).to(device).reshape(n, -1)
        held, held_d = merge(held, held_d, torch.where((seed >= 0) & (seed < Hk * Wk), seed, -1))

    ky_max, kx_max = Hk - 1 - r, Wk - 1 - r
    radii, window = [], max(Hk, Wk)
    while window >= 1:
        radii.append(window)
        window //= 2
    radius_t = torch.tensor(radii, device=device, dtype=torch.float32)  # (R,)

    for t in range(iterations):
        grid = held.view(B, Hq, Wq, k)
        cands = []
        for jump in sorted({max(1, 8 >> t), 1}):
            for ey, ex in ((0, 1), (0, -1), (1, 0), (-1, 0)):
                if jump * abs(ey) >= Hq or jump * abs(ex) >= Wq:
                    continue  # no neighbour that far inside the query map
                # Candidate for x: NNF(x + s·e) − s·e, the neighbour's whole k-list.
                src = torch.full_like(grid, -1)
                ys = slice(max(0, -jump * ey), Hq - max(0, jump * ey))
                xs = slice(max(0, -jump * ex), Wq - max(0, jump * ex))
                src[:, ys, xs] = grid[:, ys.start + jump * ey : ys.stop + jump * ey, xs.start + jump * ex : xs.stop + jump * ex]
                py, px = src // Wk - jump * ey, src % Wk - jump * ex
                inside = (src >= 0) & (py >= r) & (py <= ky_max) & (px >= r) & (px <= kx_max)
                cands.append(torch.where(inside, py * Wk + px, -1).view(n, k))
        # Random search around every held match, in windows halving down to one pixel.
        centres = held
        cy, cx = (centres // Wk)[:, :, None].float(), (centres % Wk)[:, :, None].float()  # (n, c, 1)
        shape = (n, centres.shape[1], len(radii))
        # Uniform over the window clipped to the valid centres (not clamped onto the border).
        lo_y, hi_y = (cy - radius_t).clamp(min=r), (cy + radius_t).clamp(max=ky_max)
        lo_x, hi_x = (cx - radius_t).clamp(min=r), (cx + radius_t).clamp(max=kx_max)
        sy = (lo_y + rand(*shape) * (hi_y - lo_y + 1)).floor().clamp(max=ky_max).long()
        sx = (lo_x + rand(*shape) * (hi_x - lo_x + 1)).floor().clamp(max=kx_max).long()
        cands.append((sy * Wk + sx).view(n, -1))
        by, bx = held[:, :1] // Wk, held[:, :1] % Wk
        for dy, dx in _NEAR:
            ny, nx = by + dy, bx + dx
            inside = (ny >= r) & (ny <= ky_max) & (nx >= r) & (nx <= kx_max)
            cands.append(torch.where(inside, ny * Wk + nx, -1))
        held, held_d = merge(held, held_d, torch.cat(cands, 1))
    return NNF(held.view(B, Hq, Wq, k), held_d.view(B, Hq, Wq, k))


def patch_distances(query: Tensor, key: Tensor, indices: Tensor, patch_size: int) -> Tensor:
    """Differentiable patch distances (B, Hq, Wq, k) for a fixed NNF, float32."""
    maps = _Maps(query, key, patch_size)
    k = indices.shape[-1]
    qrows = maps.query_rows().repeat_interleave(k)
    krows = (maps.key_base()[:, None] + indices.reshape(-1, k)).flatten()
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad):
        dist = _pair_distances(maps.q, maps.k, qrows, krows, maps.qoff, maps.koff)
    else:
        dist = _chunked_pair_distances(maps, qrows, krows)
    return dist.view(indices.shape)


def _aggregate_center(value: Tensor, indices: Tensor, logits: Tensor) -> Tensor:
    """out(x) = Σⱼ softmax(logits)ⱼ · v(yⱼ)."""
    B, Cv, Hk, Wk = value.shape
    _, Hq, Wq, k = indices.shape
    v = value.permute(0, 2, 3, 1).reshape(-1, Cv)  # (B·Hk·Wk, Cv)
    base = (torch.arange(B, device=value.device) * Hk * Wk).view(B, 1, 1, 1)
    weights = logits.softmax(-1).to(value.dtype)  # (B, Hq, Wq, k)
    rows = (indices + base).flatten()
    gathered = v.index_select(0, rows).view(B, Hq, Wq, k, Cv)
    out = (weights[..., None] * gathered).sum(3)  # (B, Hq, Wq, Cv)
    return out.permute(0, 3, 1, 2)


def _aggregate_patch(value: Tensor, indices: Tensor, logits: Tensor, patch_size: int) -> Tensor:
    """Every query patch covering x votes v(yⱼ(x−d) + d); one softmax over all p²·k votes."""
    B, Cv, Hk, Wk = value.shape
    _, Hq, Wq, k = indices.shape
    r = patch_size // 2
    # Pad the NNF so that x − d always exists; padded votes get weight 0 (logit −inf)
    # and a harmless in-range key index.
    pad_idx = F.pad(indices.permute(0, 3, 1, 2), (r, r, r, r), value=r * Wk + r).permute(0, 2, 3, 1)
    pad_log = F.pad(logits.permute(0, 3, 1, 2), (r, r, r, r), value=-math.inf).permute(0, 2, 3, 1)
    votes_idx, votes_log = [], []
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            # Position x − d in padded coordinates is (y + r − dy, x + r − dx).
            ys, xs = slice(r - dy, r - dy + Hq), slice(r - dx, r - dx + Wq)
            votes_idx.append(pad_idx[:, ys, xs] + dy * Wk + dx)
            votes_log.append(pad_log[:, ys, xs])
    return _aggregate_center(value, torch.cat(votes_idx, -1), torch.cat(votes_log, -1))  # (B, Cv, Hq, Wq)


class PSAL(nn.Module):
    """Patch-based stochastic attention: softmax(−D/T) over k PatchMatch neighbours.

    `forward(q, k, v, key_mask=None, init=None)` returns (B, Cv, Hq, Wq). The search runs
    without autograd; the distances of the found matches are recomputed differentiably, so
    gradients reach q and k through the weights and v through the gather. The last NNF is
    kept in `last_nnf` so that tiles and scales can reuse it as `init`.
    """

    def __init__(
        self,
        patch_size: int = 3,
        neighbors: int = 4,
        iterations: int = 6,
        temperature: float = 1.0,
        aggregation: str = "center",
        query_chunk: int = 1 << 16,
    ) -> None:
        super().__init__()
        if aggregation not in ("center", "patch"):
            raise ValueError(f"aggregation must be 'center' or 'patch', got {aggregation!r}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.patch_size, self.neighbors, self.iterations = patch_size, neighbors, iterations
        self.temperature, self.aggregation, self.query_chunk = temperature, aggregation, query_chunk
        self.last_nnf: NNF | None = None

    def extra_repr(self) -> str:
        return (
            f"patch_size={self.patch_size}, neighbors={self.neighbors}, iterations={self.iterations}, "
            f"temperature={self.temperature}, aggregation={self.aggregation!r}"
        )

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        key_mask: Tensor | None = None,
        init: NNF | Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        if v.shape[0] != k.shape[0] or v.shape[-2:] != k.shape[-2:]:
            raise ValueError(f"value {tuple(v.shape)} must match key {tuple(k.shape)} in batch and size")
        nnf = patchmatch(
            q.detach(), k.detach(), patch_size=self.patch_size, neighbors=self.neighbors,
            iterations=self.iterations, key_mask=key_mask, init=init, generator=generator,
        )
        self.last_nnf = nnf
        return self.attend(q, k, v, nnf.indices)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, indices: Tensor) -> Tensor:
        """Attention output for a fixed NNF; aggregates in row chunks when no gradient is needed."""
        logits = -patch_distances(q, k, indices, self.patch_size) / self.temperature  # (B, Hq, Wq, k)
        Hq, Wq = indices.shape[1:3]
        rows = Hq if torch.is_grad_enabled() else max(1, self.query_chunk // Wq)
        halo = self.patch_size // 2 if self.aggregation == "patch" else 0
        outs = []
        for a in range(0, Hq, rows):
            b = min(Hq, a + rows)
            # Patch votes come from up to r rows away: aggregate with a halo, then crop.
            lo, hi = max(0, a - halo), min(Hq, b + halo)
            out = self._aggregate(v, indices[:, lo:hi], logits[:, lo:hi])
            outs.append(out[:, :, a - lo : b - lo])
        return outs[0] if len(outs) == 1 else torch.cat(outs, 2)

    def _aggregate(self, v: Tensor, indices: Tensor, logits: Tensor) -> Tensor:
        if self.aggregation == "center":
            return _aggregate_center(v, indices, logits)
        return _aggregate_patch(v, indices, logits, self.patch_size)


def exact_knn(query: Tensor, key: Tensor, *, patch_size: int = 3, neighbors: int = 4, key_mask: Tensor | None = None) -> NNF:
    """Exhaustive k-NN patches (the reference PatchMatch approximates): O(Nq·Nk) memory, small maps only."""
    _check_inputs(query, key, patch_size, neighbors, key_mask)
    r = patch_size // 2
    B, C, Hq, Wq = query.shape
    qp = F.unfold(F.pad(query.float(), (r, r, r, r), mode="replicate") if r else query.float(), patch_size)  # (B, C·p², Nq)
    kp = F.unfold(key.float(), patch_size, padding=r)  # (B, C·p², Nk); only valid centres are kept below
    valid = valid_key_centres(key.shape, patch_size, key_mask).flatten(1)  # (B, Nk)
    dist = torch.cdist(qp.transpose(1, 2).double(), kp.transpose(1, 2).double()).square().float()  # (B, Nq, Nk)
    dist = dist.masked_fill(~valid[:, None], math.inf)
    best_d, best_i = dist.topk(neighbors, -1, largest=False, sorted=True)
    return NNF(best_i.view(B, Hq, Wq, neighbors), best_d.view(B, Hq, Wq, neighbors))
