"""PSAL: the Patch-based Stochastic Attention Layer (Cherel et al., CVIU).

The method is summarised in ../shared/PSAL.md, beside this repository (not in it).

Each query position attends to its k approximate nearest-neighbour *patches* among the
keys, found by PatchMatch, instead of to all keys: memory is O(N·k) and attention stays
global at full resolution. This module knows nothing of images, files or networks.

Conventions used throughout:
- maps are (B, C, H, W); a key position is the flat index y·Wk + x into its own key map;
- a patch is p×p (p odd, r = p // 2). Key patch centres must lie r pixels inside the key
  map and must not touch a masked key pixel. Query patches that cross the border use
  replicate padding, in the search and in the differentiable distances alike;
- distances are sums of squared differences over the patch, in float32 whatever the input
  dtype (float64 stays float64, for gradcheck).

Why the search is fast: comparing two patches costs C·p² operations (576 for C = 64, p = 3)
and PatchMatch tries ~100 candidates per query and iteration. The search therefore compares
patches in a small space instead: every patch projected on the top principal axes of the
patch space (24 numbers for natural features, one convolution per map), where a distance is
one dot product of a gathered row. It holds 3k matches per query, and the best 2k are
re-ranked with exact distances at the end, so the returned distances are exact and the
projection only has to keep the true neighbours among the 2k.

The search loop runs as torch operations on chunks of queries (every device), or, on a CPU
with Numba installed (the `fast` extra), compiled in steps of 32 queries (`search_kernel`):
the torch loop's time there goes to the overhead of many small operations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, ContextManager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Principal components of the patch space kept for the search: enough for 90 % of the
# patch variance, within [24, 96] (and at most C·p²). Features of natural images need
# 1–10 for 90 % but ~24 to rank near neighbours well; i.i.d. noise needs hundreds.
_SEARCH_DIMS = (24, 96)
_SEARCH_ENERGY = 0.9
# Patches sampled per map to estimate the principal axes.
_PCA_SAMPLES = 1024
# Queries updated per search step. A chunk already sees the matches its predecessors found
# in this iteration, and its (queries, ~100 candidates, D+1) float32 gather stays ~5 MB,
# cache-sized on a CPU; smaller chunks also carry good matches further within an iteration.
_CHUNK = 512
# On a GPU, where a chunk's ~50 small kernels cost their launches, not their arithmetic,
# a step takes up to _GPU_CHUNK queries, but an iteration never has fewer than _MIN_STEPS
# steps: good matches travel from step to step, and fewer, larger steps find worse ones.
_GPU_CHUNK = 4096
_MIN_STEPS = 128
# Query–key scores held at once by the exhaustive search on a GPU (64 MB in float32).
_EXACT_ELEMENTS = 1 << 24
# On a CPU, scores held at once by the exhaustive search: 8 MB stay in cache while their
# minima are taken, where 64 MB went out to memory and back (a third slower for few channels).
_EXACT_CPU_ELEMENTS = 1 << 21
# Values gathered per patch offset by a chunk of exact distances on a CPU (1 MB): maps of
# few channels (inpainting's blocks) then take a few large steps instead of many small ones.
_CPU_GATHER = 1 << 18
# Queries per block of the pruned exhaustive search: similar queries share one key range.
_PRUNE_BLOCK = 64
# PSAL's one size rule: maps with Hq·Wq·Hk·Wk at most this (two 128×128 maps) are searched
# exhaustively (`exact_knn`), larger ones by PatchMatch. Below it the exhaustive search is
# exact and no slower; above it its time, ∝ Hq·Wq·Hk·Wk, soon dominates.
EXACT_PAIRS = 1 << 28
# Query updates (queries × (iterations + 1)) from which the search loop runs compiled when it
# may: a process's first compiled search loads Numba and its cached code (~1.5 s), the time
# the torch loop takes for about this many updates on one CPU core.
COMPILED_STEPS = 1 << 16
# PatchMatch's longest propagation jump (`patchmatch`). Matches found this far from a query
# reach it; `PSAL.search` with a query mask therefore searches the queries this close to it
# (without that margin inpainting's fills lost accuracy: docs/models/inpaint.md, "Tried").
PROPAGATION_REACH = 8
# The eight neighbours of the best match, tried every iteration: overlapping patches are alike.
_NEAR = ((0, 1), (0, -1), (1, 0), (-1, 0), (1, 1), (1, -1), (-1, 1), (-1, -1))
_DIRECTIONS = ((0, 1), (0, -1), (1, 0), (-1, 0))


def _jumps(t: int) -> tuple[int, ...]:
    """Propagation's jumps at iteration t: PROPAGATION_REACH·2⁻ᵗ and 1, then 1 alone."""
    first = PROPAGATION_REACH >> t
    return (first, 1) if first > 1 else (1,)


_JUMP_SETS = tuple(dict.fromkeys(_jumps(t) for t in range(PROPAGATION_REACH.bit_length() + 1)))

# A held entry is the int64 (search distance as an order-preserving int32) << 32 | key
# position: sorting entries ranks them and brings a key's repeats side by side. _INF_ORDER
# is +inf's; an empty slot has an infinite distance and key −1.
_INF_ORDER = 0x7F800000
_EMPTY = _INF_ORDER << 32 | 0xFFFFFFFF


@dataclass
class NNF:
    """A nearest-neighbour field: the k best key patches for every query position."""

    indices: Tensor  # (B, Hq, Wq, k) int64 flat key positions y·Wk + x
    distances: Tensor  # (B, Hq, Wq, k) float32, ascending


def _work_dtype(x: Tensor) -> torch.dtype:
    """float32 for half, bfloat16 and float32 inputs; float64 stays float64."""
    return torch.promote_types(x.dtype, torch.float32)


def full_precision(x: Tensor) -> ContextManager:
    """Autocast off: under `--half` (float16 autocast) a search's matrix products would mix
    float16 with its float32 tables, and float16 distances would rank matches wrongly."""
    return torch.autocast(x.device.type, enabled=False)


class _Maps:
    """Query and key maps as channels-last rows, flattened over the batch.

    Pairs are then plain row gathers: the key pixel y + d is row `krow(y) + koff[d]`, the
    query pixel x + d is row `query_pixels(x)[:, d]`, its coordinates clamped to the map
    (replicate padding without a padded copy). For channels-last maps the rows are views,
    not copies: on a large map PSAL then holds little beyond its inputs.
    """

    def __init__(self, query: Tensor, key: Tensor, patch_size: int) -> None:
        r = patch_size // 2
        self.B, self.C, self.Hq, self.Wq = query.shape
        self.Hk, self.Wk = key.shape[-2:]
        self.r = r
        dtype = _work_dtype(query)
        # contiguous(): for B = 1 reshape would return a strided view, and row gathers from it
        # read one float per cache line.
        self.q = query.to(dtype).permute(0, 2, 3, 1).contiguous().view(-1, self.C)  # (B·Hq·Wq, C)
        self.k = key.to(dtype).permute(0, 2, 3, 1).contiguous().view(-1, self.C)  # (B·Hk·Wk, C)
        offsets = range(-r, r + 1)
        self.koff = [dy * self.Wk + dx for dy in offsets for dx in offsets]  # p² Python ints: no device sync to read them
        self.dy = torch.tensor([dy for dy in offsets for _ in offsets], device=query.device)  # (p²,)
        self.dx = torch.tensor([dx for _ in offsets for dx in offsets], device=query.device)

    def query_map(self) -> Tensor:
        return self.q.view(self.B, self.Hq, self.Wq, self.C).permute(0, 3, 1, 2)

    def key_map(self) -> Tensor:
        return self.k.view(self.B, self.Hk, self.Wk, self.C).permute(0, 3, 1, 2)

    def query_pixels(self, index: Tensor) -> Tensor:
        """(n, p²) rows of the pixels of the query patches centred at flat positions `index`."""
        Hq, Wq = self.Hq, self.Wq
        b, y, x = index // (Hq * Wq), index // Wq % Hq, index % Wq
        yy = (y[:, None] + self.dy).clamp(0, Hq - 1)
        xx = (x[:, None] + self.dx).clamp(0, Wq - 1)
        return (b[:, None] * Hq + yy) * Wq + xx

    def key_base(self, index: Tensor) -> Tensor:
        """Offset of each query's batch element in the flattened keys."""
        return index // (self.Hq * self.Wq) * (self.Hk * self.Wk)


def _patch_ssd(maps: _Maps, qindex: Tensor, krows: Tensor) -> Tensor:
    """Exact patch SSD of query qindex[i] against keys krows[i, j]: (n, m); differentiable.

    The query pixel is gathered once per offset and broadcast over its m candidates.
    """
    n, m = krows.shape
    qpixels = maps.query_pixels(qindex)  # (n, p²)
    total = None
    for d, ok in enumerate(maps.koff):
        kpix = maps.k.index_select(0, (krows + ok).flatten()).view(n, m, -1)  # (n, m, C)
        qpix = maps.q.index_select(0, qpixels[:, d])  # (n, C)
        term = (kpix - qpix[:, None]).square().sum(-1)  # (n, m)
        total = term if total is None else total + term
    return total


def _search_chunk(device: torch.device, queries: int) -> int:
    """Queries per PatchMatch step: `_CHUNK` on the CPU; elsewhere as many as keep
    `_MIN_STEPS` steps per iteration, within [`_CHUNK`, `_GPU_CHUNK`]."""
    if device.type == "cpu":
        return _CHUNK
    return min(_GPU_CHUNK, max(_CHUNK, queries // _MIN_STEPS))


def _distance_rows(maps: _Maps, candidates: int) -> int:
    """Queries per chunk of an exact-distance pass (rows are independent: any chunking gives
    the same result). On the CPU a chunk gathers about `_CPU_GATHER` values per patch
    offset (cache-sized), at least `_CHUNK` queries; on a GPU each chunk's ~50 small kernel
    launches set the time, so a chunk there gathers up to `_EXACT_ELEMENTS` values at once."""
    if maps.q.device.type == "cpu":
        return max(_CHUNK, _CPU_GATHER // (candidates * maps.C))
    return max(_CHUNK, _EXACT_ELEMENTS // (candidates * maps.C))


def valid_key_centres(key_shape: tuple[int, int, int, int], patch_size: int, key_mask: Tensor | None,
                      device: torch.device | None = None) -> Tensor:
    """(B, Hk, Wk) bool: where a key patch may be centred (inside the map, off the mask), on
    the mask's device (without a mask: `device`)."""
    B, _, Hk, Wk = key_shape
    r = patch_size // 2
    valid = torch.zeros(B, Hk, Wk, dtype=torch.bool, device=key_mask.device if key_mask is not None else device)
    valid[:, r : Hk - r, r : Wk - r] = True
    if key_mask is not None:
        touched = F.max_pool2d(key_mask[:, None].float(), patch_size, stride=1, padding=r)[:, 0] > 0
        valid &= ~touched
    return valid


def _with_context(query_mask: Tensor | None) -> Tensor | None:
    """The queries within `PROPAGATION_REACH` positions of `query_mask` (B, Hq, Wq)."""
    if query_mask is None:
        return None
    reach = PROPAGATION_REACH
    return F.max_pool2d(query_mask[:, None].float(), 2 * reach + 1, 1, reach)[:, 0] > 0


def _check_inputs(query: Tensor, key: Tensor, patch_size: int, neighbors: int, key_mask: Tensor | None) -> None:
    if patch_size < 1 or patch_size % 2 == 0:
        raise ValueError(f"patch_size must be odd and >= 1, got {patch_size}")
    if neighbors < 1:
        raise ValueError(f"neighbors must be >= 1, got {neighbors}")
    if query.dim() != 4 or key.dim() != 4:
        raise ValueError(f"query and key must be (B, C, H, W), got {tuple(query.shape)} and {tuple(key.shape)}")
    if query.shape[:2] != key.shape[:2]:
        raise ValueError(f"query {tuple(query.shape)} and key {tuple(key.shape)} differ in batch or channels")
    for name, x in (("query", query), ("key", key)):
        if min(x.shape[-2:]) < patch_size:
            raise ValueError(f"{name} map {tuple(x.shape[-2:])} is smaller than one {patch_size}×{patch_size} patch")
    if key_mask is not None and key_mask.shape != (key.shape[0], *key.shape[-2:]):
        raise ValueError(f"key_mask must be (B, Hk, Wk) = {(key.shape[0], *key.shape[-2:])}, got {tuple(key_mask.shape)}")


def patchmatch(
    query: Tensor,
    key: Tensor,
    *,
    patch_size: int = 3,
    neighbors: int = 4,
    iterations: int = 8,
    key_mask: Tensor | None = None,
    init: NNF | Tensor | None = None,
    generator: torch.Generator | None = None,
    compiled: bool | None = None,
    propagated: int | None = None,
    query_mask: Tensor | None = None,
) -> NNF:
    """Approximate k-nearest-neighbour patches of every query position among the keys.

    PatchMatch with k neighbours (PSAL.md) holding 3k matches per query: random distinct
    init, then per iteration a jump-flood propagation of the neighbours' best `propagated`
    matches (default 2k)
    (jumps 8·2⁻ᵗ and 1 in the four directions), a random search around the best match in
    windows halving from the key map size down to one pixel (the two smallest around the
    others) and the eight neighbours of the best match. Queries are updated in chunks,
    forward then backward on alternate iterations, so good matches travel within one
    iteration. Distances are compared in the projected patch space (`_search_tables`),
    and a query keeps the best 3k distinct of its held and fresh candidates
    (`_Search.merge`); the best 2k are re-ranked with exact distances and the best k returned.
    `init` (an NNF or (B, Hq, Wq, k') indices into this key map) seeds the search.
    `query_mask` (B, Hq, Wq) bool: the queries the caller will use. Only those are searched
    (propagation then runs within them); the others get placeholder neighbours (their batch
    element's first valid key, at its true distance), as in `exact_knn`.
    The default 8 iterations find the exact nearest patch for about 4 queries in 5 on
    natural-image features (docs/benchmarks.md); the networks set their own.

    `compiled`: run the search loop compiled (`search_kernel`, Numba, the `fast` extra) or
    as torch operations; None chooses the compiled loop on a CPU where Numba is installed,
    for searches of at least `COMPILED_STEPS` query updates.
    Both run the same search, the torch loop in steps of 512 queries on a CPU, the compiled
    one in steps of 32: matches of the same quality, not the same matches.
    """
    _check_inputs(query, key, patch_size, neighbors, key_mask)
    if query_mask is not None and query_mask.shape != (query.shape[0], *query.shape[-2:]):
        raise ValueError(f"query_mask must be (B, Hq, Wq) = {(query.shape[0], *query.shape[-2:])}, "
                         f"got {tuple(query_mask.shape)}")
    propagated = 2 * neighbors if propagated is None else propagated
    if not 1 <= propagated <= 3 * neighbors:
        raise ValueError(f"propagated must be within [1, 3·neighbors = {3 * neighbors}], got {propagated}")
    with torch.no_grad(), full_precision(query):
        queries = query.shape[0] * query.shape[2] * query.shape[3] if query_mask is None else int(query_mask.sum())
        steps = queries * (iterations + 1)
        return _patchmatch(query, key, patch_size, neighbors, iterations, key_mask, init, generator,
                           _kernel(query.device, compiled, steps), propagated, query_mask)


def _kernel(device: torch.device, compiled: bool | None, steps: int = COMPILED_STEPS):
    """The `search_kernel` module if the search runs compiled, else None (see `patchmatch`);
    `steps`: the search's query updates (queries × (iterations + 1))."""
    if compiled is False or (compiled is None and (device.type != "cpu" or steps < COMPILED_STEPS)):
        return None
    if device.type != "cpu":
        raise ValueError(f"the compiled search runs on the CPU, not on {device}")
    try:
        from psal_cli import search_kernel
    except ImportError:
        if compiled:
            raise ImportError("the compiled search needs Numba: pip install 'psal-cli[fast]'") from None
        return None
    return search_kernel


def _search_tables(maps: _Maps, valid: Tensor, patch_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """The principal axes of the patch space, and every key patch projected on them.

    Returns the query projection (p²·C, D) and bias (D,) for patches flattened as
    (pixel, channel) rows, and the float32 key table [z_k, |z_k|²] (B·Hk·Wk + 1, D + 1),
    so that |z_q − z_k|² = |z_q|² + [−2·z_q, 1] · row_k: one gathered row and one dot
    product per candidate. Invalid key centres and the extra last row (the "no candidate"
    sentinel) have an infinite norm: any candidate there loses. The axes come from ~1k
    patches of each map, one set for the whole batch (batch elements thus nudge each
    other's search, never its exact distances). Query projections are made per chunk
    (`_Search.query_rows`); the key table is filled in bands of rows, so the search holds
    4·(D + 1) bytes per key (100 MB at 1 MP) and no full-map temporaries. The table stays
    float32: a float16 one would halve the memory, but on a CPU converting the gathered
    rows costs more than gathering twice the bytes.
    """
    C, p, r = maps.C, patch_size, maps.r
    samples = []
    for x in (maps.query_map(), maps.key_map()):
        count = x.shape[0] * (x.shape[2] - p + 1) * (x.shape[3] - p + 1)
        stride = max(1, math.isqrt(count // _PCA_SAMPLES))
        samples.append(F.unfold(x.float(), p, stride=stride).transpose(1, 2).reshape(-1, C * p * p))  # (s, C·p²)
    x = torch.cat(samples)
    mean = x.mean(0)
    x = x - mean
    variance, axes = torch.linalg.eigh((x.T @ x).cpu().double())  # ascending
    explained = variance.flip(0).cumsum(0) / variance.sum().clamp(min=1e-30)
    needed = int((explained < _SEARCH_ENERGY).sum()) + 1
    dims = min(max(needed, _SEARCH_DIMS[0]), _SEARCH_DIMS[1], C * p * p)
    device = maps.q.device
    basis = axes[:, -dims:].T.float().to(device)  # (D, C·p²), (channel, pixel) order
    weight, bias = basis.view(dims, C, p, p), -(basis @ mean.to(device))

    B, Hk, Wk = maps.B, maps.Hk, maps.Wk
    table = torch.zeros(B * Hk * Wk + 1, dims + 1, device=device)
    grid = table[:-1].view(B, Hk, Wk, dims + 1)
    keys, band = maps.key_map(), max(1, (1 << 22) // (Wk * (C + dims)))  # ~16 MB of conv per band
    for b in range(B):
        for y0 in range(r, Hk - r, band):
            y1 = min(Hk - r, y0 + band)
            z = F.conv2d(keys[b : b + 1, :, y0 - r : y1 + r].float(), weight, bias)[0].permute(1, 2, 0)  # (rows, Wk − 2r, D)
            grid[b, y0:y1, r : Wk - r, :dims] = z
            grid[b, y0:y1, r : Wk - r, dims] = z.square().sum(-1)
    table[:-1, dims].masked_fill_(~valid.flatten(), math.inf)
    table[-1, dims] = math.inf
    projection = basis.view(dims, C, p * p).transpose(1, 2).reshape(dims, -1).T.contiguous()  # (p²·C, D)
    return projection, bias, table


class _Search:
    """One PatchMatch run's search tables, geometry and candidate generators.

    Query positions are flat (B·Hq·Wq) rows; `rows` is a slice of those searched (`searched`,
    in order; all of them by default), one chunk, and `held` the (rows, 3k) entries held for
    them (search distance and key position packed in an int64, `_EMPTY`'s comment), best
    first; an empty slot (fewer valid keys than 3k) has key −1. Everything per query is made per chunk: beyond its
    inputs the search holds the key table and `held`.
    """

    def __init__(self, maps: _Maps, valid: Tensor, patch_size: int, held: int, generator: torch.Generator | None,
                 searched: Tensor | None = None) -> None:
        self.maps, self.held_n, self.generator, self.searched = maps, held, generator, searched
        device = maps.q.device
        if generator is not None and device.type != "cpu":
            # One draw of the caller's generator seeds one on the device: drawing each step's
            # numbers on the host and copying them stalled a GPU's queue (docs/benchmarks.md).
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(int(torch.randint(0, 1 << 62, (1,), generator=generator)))
        self.projection, self.bias, self.table = _search_tables(maps, valid, patch_size)
        self.sentinel = self.table.shape[0] - 1
        self.n = maps.B * maps.Hq * maps.Wq
        self.count = self.n if searched is None else searched.numel()  # queries searched
        Hk, Wk, r = maps.Hk, maps.Wk, maps.r
        # Valid centres lie in [r, Hk − 1 − r] × [r, Wk − 1 − r].
        self.lo, self.hi_y, self.hi_x = r, Hk - 1 - r, Wk - 1 - r
        radii, window = [], max(Hk, Wk)
        while window >= 1:
            radii.append(window)
            window //= 2
        self.radii = torch.tensor(radii, device=device, dtype=torch.float32)  # (R,)
        self.near = torch.tensor(_NEAR, device=device, dtype=torch.int32)  # (8, 2)
        # Propagation's offsets (4J, 2) per jump set, made once: a small tensor made from the
        # host at every step would be a copy and a wait for a GPU.
        self.offsets = {jumps: torch.tensor([(s * ey, s * ex) for s in jumps for ey, ex in _DIRECTIONS],
                                            device=device, dtype=torch.int32)
                        for jumps in _JUMP_SETS}
        self.sync_free = device.type != "cpu"  # no host synchronisation inside the search (`merge`)

    def index(self, rows: slice) -> Tensor:
        """Flat positions (c,) int32 of the searched queries `rows`."""
        if self.searched is not None:
            return self.searched[rows]
        return torch.arange(rows.start, min(rows.stop, self.n), device=self.maps.q.device, dtype=torch.int32)

    def rand(self, *shape: int) -> Tensor:
        return torch.rand(*shape, generator=self.generator, device=self.maps.q.device)

    def inside(self, y: Tensor, x: Tensor) -> Tensor:
        return (y >= self.lo) & (y <= self.hi_y) & (x >= self.lo) & (x <= self.hi_x)

    def query_rows(self, index: Tensor) -> Tensor:
        """[−2·z_q, 1] (c, D + 1) for the query patches at `index`: their dot product with a table row."""
        maps = self.maps
        pixels = maps.q.index_select(0, maps.query_pixels(index).flatten()).view(index.numel(), -1)  # (c, p²·C)
        rows = torch.ones(index.numel(), self.projection.shape[1] + 1, device=index.device)
        torch.addmm(self.bias, pixels.float(), self.projection, alpha=-2, beta=-2, out=rows[:, :-1])
        return rows

    def entries(self, rows: slice, cand: Tensor) -> Tensor:
        """Candidates (c, m) of the queries `rows` (−1 = none) as entries (`_EMPTY`'s comment)."""
        index = self.index(rows)
        at = torch.where(cand >= 0, self.maps.key_base(index)[:, None] + cand, self.sentinel)
        z = self.table.index_select(0, at.flatten()).view(*cand.shape, -1)  # (c, m, D + 1)
        # |z_q − z_k|² less |z_q|², the same for all of a query's candidates. (1, D+1)·(D+1, m)
        # per query: on a CPU faster than (m, D+1)·(D+1, 1) or a multiply and sum.
        dist = torch.bmm(self.query_rows(index)[:, None], z.mT)[:, 0]  # (c, m)
        bits = dist.view(torch.int32)
        order = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # negative floats count down
        return order.long() << 32 | cand.long() & 0xFFFFFFFF

    def merge(self, held: Tensor, fresh: Tensor) -> Tensor:
        """The held_n best distinct entries (c, held_n) among `held` (c, held_n, sorted) and `fresh` (c, m).

        Only fresh entries better than the worst held one can enter, and of those at most the
        best 2·held_n (a selection, not a sort): the sort, the costly step, then sees at most
        3·held_n columns instead of ~held_n + 100 when some query of the chunk still
        improves a lot. The 2·held_n leave room for repeats of a key among them.
        """
        better = fresh < held[:, -1:]
        # The narrowest block that holds every query's improvements; on a GPU the widest
        # (the same merge: the extra slots are empty and dropped), since reading a width
        # back would stop the device's queue at every step.
        width = min(fresh.shape[1], 2 * self.held_n)
        if not self.sync_free:
            width = min(int(better.sum(1).max()), width)
        block = torch.where(better, fresh, _EMPTY).topk(width, 1, largest=False, sorted=False).values
        merged = torch.cat([held, block], 1).sort(1).values  # repeats of a key end up side by side
        keys = merged.int()
        keep = merged < _INF_ORDER << 32  # finite distances only
        keep[:, 1:] &= keys[:, 1:] != keys[:, :-1]
        slot = keep.cumsum(1) - 1
        slot = torch.where(keep & (slot < self.held_n), slot, self.held_n)
        out = torch.full((fresh.shape[0], self.held_n + 1), _EMPTY, device=fresh.device, dtype=torch.int64)
        return out.scatter_(1, slot, merged)[:, : self.held_n]

    def propagate(self, rows: slice, held: Tensor, jumps: tuple[int, ...], slots: int) -> Tensor:
        """Candidates NNF(x + s·e) − s·e from the neighbours' best `slots` matches: (c, 4·J·slots)."""
        Hq, Wq, Wk = self.maps.Hq, self.maps.Wq, self.maps.Wk
        index = self.index(rows)
        qb, qy, qx = index // (Hq * Wq), index // Wq % Hq, index % Wq
        step = self.offsets[jumps]
        sy, sx = qy[:, None] + step[:, 0], qx[:, None] + step[:, 1]  # (c, 4J)
        source = (qb[:, None] * Hq + sy.clamp(0, Hq - 1)) * Wq + sx.clamp(0, Wq - 1)
        src = held[:, :slots][source].int()  # (c, 4J, slots)
        py, px = src // Wk - step[:, :1], src % Wk - step[:, 1:]
        ok = ((sy >= 0) & (sy < Hq) & (sx >= 0) & (sx < Wq))[..., None] & (src >= 0) & self.inside(py, px)
        return torch.where(ok, py * Wk + px, -1).flatten(1)

    def random_search(self, held: Tensor) -> Tensor:
        """One uniform candidate per window: every radius around the best match, the two smallest around the others."""
        c, Wk = held.shape[0], self.maps.Wk
        small = self.radii[-2:]
        radius = torch.cat([self.radii, small.repeat(self.held_n - 1)]).expand(c, -1)  # (c, R + 2(L−1))
        y = torch.cat([(held[:, :1] // Wk).expand(-1, len(self.radii)), (held[:, 1:] // Wk).repeat_interleave(len(small), 1)], 1)
        x = torch.cat([(held[:, :1] % Wk).expand(-1, len(self.radii)), (held[:, 1:] % Wk).repeat_interleave(len(small), 1)], 1)
        # Uniform over the window clipped to the valid centres (not clamped onto the border).
        lo_y, hi_y = (y - radius).clamp(min=self.lo), (y + radius).clamp(max=self.hi_y)
        lo_x, hi_x = (x - radius).clamp(min=self.lo), (x + radius).clamp(max=self.hi_x)
        u = self.rand(2, *radius.shape)
        ry = (lo_y + u[0] * (hi_y - lo_y + 1)).floor().clamp(max=self.hi_y).int()
        rx = (lo_x + u[1] * (hi_x - lo_x + 1)).floor().clamp(max=self.hi_x).int()
        return ry * Wk + rx

    def around_best(self, held: Tensor) -> Tensor:
        """The eight neighbours of the best match: (c, 8)."""
        Wk = self.maps.Wk
        y, x = held[:, :1] // Wk + self.near[:, 0], held[:, :1] % Wk + self.near[:, 1]
        return torch.where(self.inside(y, x), y * Wk + x, -1)


def _patchmatch(query, key, patch_size, k, iterations, key_mask, init, generator, kernel, propagated,
                query_mask=None) -> NNF:
    maps = _Maps(query, key, patch_size)
    B, Hq, Wq, Hk, Wk = maps.B, maps.Hq, maps.Wq, maps.Hk, maps.Wk
    device = query.device
    valid = valid_key_centres(key.shape, patch_size, key_mask, device).to(device)  # (B, Hk, Wk)
    counts = valid.flatten(1).sum(1)  # (B,)
    fewest = int(counts.min())
    if fewest == 0:
        raise ValueError("every key patch is masked or crosses the border: nothing to match")
    if fewest < k:
        raise ValueError(f"neighbors={k} exceeds the {fewest} valid {patch_size}×{patch_size} key patches")
    n = B * Hq * Wq
    searched = None if query_mask is None else query_mask.to(device).reshape(n).nonzero()[:, 0].int()  # (s,)
    search = _Search(maps, valid, patch_size, 3 * k, generator, searched)

    # Init: 3k distinct valid positions (as many as exist), evenly spaced in the valid list
    # from a random start, merged with the caller's seed.
    listed = (valid.flatten().nonzero()[:, 0] % (Hk * Wk)).int()  # valid positions, batch after batch
    del valid
    starts = torch.cumsum(counts, 0) - counts  # (B,)
    seed = None
    if init is not None:
        seed = (init.indices if isinstance(init, NNF) else init).to(device).reshape(n, -1)
    # Queries not searched hold their batch element's first valid key alone: a placeholder.
    first = None if query_mask is None else listed[starts][torch.arange(n, device=device) // (Hq * Wq)]  # (n,)
    idle = None if query_mask is None else ~query_mask.to(device).reshape(n)
    if kernel is not None:
        indices, distances = _compiled_search(kernel, search, listed, starts, counts, seed, first, idle, k,
                                              iterations, propagated)
        return _placed(NNF(indices.view(B, Hq, Wq, k), distances.view(B, Hq, Wq, k)), idle)
    held = _torch_search(search, listed, starts, counts, seed, k, iterations, propagated)
    del search, listed  # the key table
    if idle is not None:
        held[idle, 0] = first[idle].long()

    # Exact re-ranking of the best 2k; empty slots point at the best match and are ruled out.
    indices = torch.empty(n, k, device=device, dtype=torch.int64)
    distances = torch.empty(n, k, device=device, dtype=_work_dtype(query))
    step = _distance_rows(maps, 2 * k)
    for a in range(0, n, step):
        rows = slice(a, a + step)
        index = torch.arange(a, min(a + step, n), device=device)
        found = held[rows, : 2 * k].int()
        filled = found >= 0
        cand = torch.where(filled, found, found[:, :1]).long()  # (c, 2k)
        exact = _patch_ssd(maps, index, maps.key_base(index)[:, None] + cand).masked_fill(~filled, math.inf)
        distances[rows], pick = exact.topk(k, 1, largest=False, sorted=True)
        indices[rows] = cand.gather(1, pick)
    return _placed(NNF(indices.view(B, Hq, Wq, k), distances.view(B, Hq, Wq, k)), idle)


def _placed(nnf: NNF, idle: Tensor | None) -> NNF:
    """The NNF with every neighbour of the `idle` queries (n,) their placeholder, the first."""
    if idle is not None:
        for x in (nnf.indices, nnf.distances):
            rows = x.view(idle.numel(), -1)
            rows[idle] = rows[idle][:, :1].expand(-1, rows.shape[1])
    return nnf


def _torch_search(search: _Search, listed: Tensor, starts: Tensor, counts: Tensor, seed: Tensor | None, k: int,
                  iterations: int, propagated: int) -> Tensor:
    """The search loop in torch operations, chunk by chunk: the held entries (n, 3k)."""
    maps, device = search.maps, search.maps.q.device
    Hq, Wq, Hk, Wk = maps.Hq, maps.Wq, maps.Hk, maps.Wk
    chunk = _search_chunk(device, search.count)
    chunks = range(0, search.count, chunk)
    held = torch.full((search.n, 3 * k), _EMPTY, device=device, dtype=torch.int64)
    for a in chunks:
        rows = slice(a, a + chunk)
        index = search.index(rows).long()
        batch = index // (Hq * Wq)
        count = counts[batch]  # (c,)
        start = (search.rand(batch.numel()) * count).long()
        spread = torch.arange(3 * k, device=device) * (count // (3 * k)).clamp(min=1)[:, None]
        cand = listed[starts[batch][:, None] + (start[:, None] + spread) % count[:, None]]  # (c, 3k)
        at = rows if search.searched is None else index  # held's rows of the chunk
        if seed is not None:
            mine = seed[at]
            cand = torch.cat([cand, torch.where((mine >= 0) & (mine < Hk * Wk), mine, -1).int()], 1)
        held[at] = search.merge(held[at], search.entries(rows, cand))

    for t in range(iterations):
        jumps = _jumps(t)
        for a in chunks if t % 2 == 0 else reversed(chunks):
            rows = slice(a, a + chunk)
            at = rows if search.searched is None else search.index(rows).long()
            mine = held[at]
            keys = mine.int()
            fresh = [search.propagate(rows, held, jumps, propagated), search.random_search(keys), search.around_best(keys)]
            held[at] = search.merge(mine, search.entries(rows, torch.cat(fresh, 1)))
    return held


def _compiled_search(kernel, search: _Search, listed: Tensor, starts: Tensor, counts: Tensor, seed: Tensor | None,
                     placeholder: Tensor | None, idle: Tensor | None, k: int, iterations: int,
                     propagated: int) -> tuple[Tensor, Tensor]:
    """The same search loop and re-ranking compiled (`search_kernel`): indices and distances (n, k).
    The `idle` queries (n,) bool are not searched and hold their `placeholder` key (n,) alone."""
    maps = search.maps
    step = 1 << 14
    # Rows of the searched queries, filled in place (no second full-size copy); others are never read.
    qrows = torch.empty(search.n, search.table.shape[1])
    for a in range(0, search.count, step):
        index = search.index(slice(a, a + step))
        qrows[index.long()] = search.query_rows(index)
    seeds = seed.int() if seed is not None else torch.empty(search.n, 0, dtype=torch.int32, device="cpu")
    # One draw from the caller's generator seeds the kernel's counter-based random numbers.
    draw = int(torch.randint(0, 1 << 62, (1,), generator=search.generator))
    shape, threads = (maps.B, maps.Hq, maps.Wq, maps.Hk, maps.Wk), torch.get_num_threads()
    active = torch.ones(search.n, dtype=torch.bool) if idle is None else ~idle
    held = kernel.search(search.table.numpy(), qrows.numpy(), listed.numpy(), starts.numpy(), counts.numpy(),
                         seeds.numpy(), active.numpy(), shape, maps.r, 3 * k, iterations, propagated,
                         search.radii.int().numpy(), draw, threads)
    del qrows, search.table
    if idle is not None:
        torch.from_numpy(held)[idle, 0] = placeholder[idle]
    indices, distances = kernel.rerank(maps.q.numpy(), maps.k.numpy(), held, k, shape, maps.r, threads)
    return torch.from_numpy(indices), torch.from_numpy(distances)


def patch_distances(query: Tensor, key: Tensor, indices: Tensor, patch_size: int,
                    positions: Tensor | None = None) -> Tensor:
    """Differentiable patch distances (B, Hq, Wq, k) for a fixed NNF (B, Hq, Wq, k), float32
    (float64 for float64 maps); with `positions`, flat query positions (n,) (b·Hq·Wq + y·Wq + x),
    only theirs: indices (n, k) → (n, k), each row as the full call gives it."""
    maps = _Maps(query, key, patch_size)
    k = indices.shape[-1]
    index = torch.arange(indices[..., 0].numel(), device=indices.device) if positions is None else positions  # (n,)
    krows = maps.key_base(index)[:, None] + indices.reshape(-1, k)  # (n, k)
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad):
        return _patch_ssd(maps, index, krows).view(indices.shape)
    step = _distance_rows(maps, k)
    out = torch.cat([_patch_ssd(maps, index[a : a + step], krows[a : a + step]) for a in range(0, index.numel(), step)])
    return out.view(indices.shape)


def _aggregate_center(value: Tensor, indices: Tensor, logits: Tensor) -> Tensor:
    """out(x) = Σⱼ softmax(logits)ⱼ · v(yⱼ)."""
    B, Cv, Hk, Wk = value.shape
    _, Hq, Wq, k = indices.shape
    v = value.permute(0, 2, 3, 1).contiguous().view(-1, Cv)  # (B·Hk·Wk, Cv), rows contiguous for the gather
    base = (torch.arange(B, device=value.device) * Hk * Wk).view(B, 1, 1, 1)
    weights = logits.softmax(-1).to(value.dtype)  # (B, Hq, Wq, k)
    rows = (indices + base).flatten()
    gathered = v.index_select(0, rows).view(B, Hq, Wq, k, Cv)
    out = (weights[..., None] * gathered).sum(3)  # (B, Hq, Wq, Cv)
    return out.permute(0, 3, 1, 2)


def _aggregate_patch(value: Tensor, indices: Tensor, logits: Tensor, patch_size: int) -> Tensor:
    """Every query patch covering x votes v(yⱼ(x−d) + d); one softmax over all p²·k votes."""
    Wk = value.shape[-1]
    Hq, Wq = indices.shape[1:3]
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


def _aggregate_at(value: Tensor, indices: Tensor, logits: Tensor, patch_size: int, positions: Tensor) -> Tensor:
    """`_aggregate_patch` (`_aggregate_center` for patch_size 1) at flat query positions (n,)
    (b·Hq·Wq + y·Wq + x) only: (n, Cv), each row as the full map's."""
    B, Cv, Hk, Wk = value.shape
    _, Hq, Wq, k = indices.shape
    r = patch_size // 2
    # The NNF padded as `_aggregate_patch` pads it; the query covering x at offset d is then a
    # fixed offset from x in the padded layout, so one add gives all p² of them.
    pad_idx = F.pad(indices.permute(0, 3, 1, 2), (r, r, r, r), value=r * Wk + r).permute(0, 2, 3, 1).reshape(-1, k)
    pad_log = F.pad(logits.permute(0, 3, 1, 2), (r, r, r, r), value=-math.inf).permute(0, 2, 3, 1).reshape(-1, k)
    Wp = Wq + 2 * r
    d = torch.arange(-r, r + 1, device=indices.device)
    dy, dx = d.repeat_interleave(patch_size), d.repeat(patch_size)  # (p²,), in `_aggregate_patch`'s order
    b, y, x = positions // (Hq * Wq), positions // Wq % Hq, positions % Wq
    source = ((b * (Hq + 2 * r) + y + r) * Wp + x + r)[:, None] - (dy * Wp + dx)  # (n, p²)
    idx = pad_idx[source] + (dy * Wk + dx)[:, None]  # (n, p², k) key positions voted
    weights = pad_log[source].flatten(1).softmax(-1).to(value.dtype)  # (n, p²·k)
    v = value.permute(0, 2, 3, 1).reshape(-1, Cv)  # (B·Hk·Wk, Cv)
    gathered = v.index_select(0, (idx.flatten(1) + (b * Hk * Wk)[:, None]).flatten()).view(*weights.shape, Cv)
    return (weights[..., None] * gathered).sum(1)


class PSAL(nn.Module):
    """Patch-based stochastic attention: softmax(−D/T) over k PatchMatch neighbours.

    When Hq·Wq·Hk·Wk ≤ `EXACT_PAIRS` the neighbours come from the exhaustive search
    instead (`exact_knn`): on maps that small it is both exact and faster.

    `forward(q, k, v, key_mask=None, init=None, generator=None, query_mask=None)` returns
    (B, Cv, Hq, Wq) (`search` says what `query_mask` allows). The search runs without
    autograd; when q or k needs a gradient the distances of the found matches are
    recomputed differentiably, so gradients reach q and k through the weights and v through
    the gather. A caller that needs the NNF (to reuse it as `init`, or its distances) calls
    `search`, then `attend`.
    """

    def __init__(
        self,
        patch_size: int = 3,
        neighbors: int = 4,
        iterations: int = 8,
        temperature: float = 1.0,
        aggregation: str = "center",
        query_chunk: int = 1 << 16,
        propagated: int | None = None,
    ) -> None:
        super().__init__()
        if aggregation not in ("center", "patch"):
            raise ValueError(f"aggregation must be 'center' or 'patch', got {aggregation!r}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.patch_size, self.neighbors, self.iterations = patch_size, neighbors, iterations
        self.temperature, self.aggregation, self.query_chunk = temperature, aggregation, query_chunk
        self.propagated = propagated  # PatchMatch's propagated matches per neighbour (None: 2k, `patchmatch`)

    def extra_repr(self) -> str:
        return (
            f"patch_size={self.patch_size}, neighbors={self.neighbors}, iterations={self.iterations}, "
            f"temperature={self.temperature}, aggregation={self.aggregation!r}"
            + (f", propagated={self.propagated}" if self.propagated is not None else "")
        )

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        key_mask: Tensor | None = None,
        init: NNF | Tensor | None = None,
        generator: torch.Generator | None = None,
        query_mask: Tensor | None = None,
    ) -> Tensor:
        if v.shape[0] != k.shape[0] or v.shape[-2:] != k.shape[-2:]:
            raise ValueError(f"value {tuple(v.shape)} must match key {tuple(k.shape)} in batch and size")
        nnf = self.search(q, k, key_mask, init, generator, query_mask)
        return self.attend(q, k, v, nnf.indices, nnf.distances)

    def search(
        self,
        q: Tensor,
        k: Tensor,
        key_mask: Tensor | None = None,
        init: NNF | Tensor | None = None,
        generator: torch.Generator | None = None,
        query_mask: Tensor | None = None,
    ) -> NNF:
        """The NNF `forward` attends with, without attending: exhaustive on maps of up to
        `EXACT_PAIRS` query–key pairs, else PatchMatch (`init`, `generator`: its seed).
        `query_mask` (B, Hq, Wq): the caller uses the output only there. The exhaustive search
        skips the other queries (`exact_knn`); PatchMatch searches the queries within
        `PROPAGATION_REACH` positions of the mask, from which good matches propagate into it.

        Lets a network free q and k before it aggregates a large map in bands (`attend`).
        """
        if q.shape[-2] * q.shape[-1] * k.shape[-2] * k.shape[-1] <= EXACT_PAIRS:
            with torch.no_grad():
                return exact_knn(q.detach(), k.detach(), patch_size=self.patch_size, neighbors=self.neighbors,
                                 key_mask=key_mask, query_mask=query_mask)
        return patchmatch(
            q.detach(), k.detach(), patch_size=self.patch_size, neighbors=self.neighbors,
            iterations=self.iterations, key_mask=key_mask, init=init, generator=generator,
            propagated=self.propagated, query_mask=_with_context(query_mask),
        )

    def attend(
        self,
        q: Tensor | None,
        k: Tensor | None,
        v: Tensor,
        indices: Tensor,
        distances: Tensor | None = None,
        finish: Callable[[Tensor, slice], Tensor] | None = None,
        positions: Tensor | None = None,
    ) -> Tensor:
        """Attention output for a fixed NNF; aggregates in bands of rows when no gradient is needed.

        `distances` (the NNF's own) are reused unless q or k needs a gradient through them;
        q and k may then be None. `finish(band, rows)` maps each band of output rows before
        it is stored (a network's projections, a residual), so that no full-size
        intermediate is held for a large map. `positions` (n,), flat query positions
        (b·Hq·Wq + y·Wq + x): the output only there, (n, Cv), for a caller that needs a
        sparse part of the map (`distances` are then required, and `finish` is not applied).
        """
        if positions is not None:
            logits = -distances / self.temperature
            size = 1 if self.aggregation == "center" else self.patch_size
            step = self.query_chunk
            return torch.cat([_aggregate_at(v, indices, logits, size, positions[a : a + step])
                              for a in range(0, positions.numel(), step)]) if positions.numel() else v.new_empty(0, v.shape[1])
        if distances is None or (torch.is_grad_enabled() and (q is not None and q.requires_grad or k is not None and k.requires_grad)):
            distances = patch_distances(q, k, indices, self.patch_size)
        logits = -distances / self.temperature  # (B, Hq, Wq, k)
        Hq, Wq = indices.shape[1:3]
        rows = Hq if torch.is_grad_enabled() else max(1, self.query_chunk // Wq)
        if rows < Hq:  # every band gathers rows of v: lay them out once, not once per band
            v = v.contiguous(memory_format=torch.channels_last)
        halo = self.patch_size // 2 if self.aggregation == "patch" else 0
        out = None
        for a in range(0, Hq, rows):
            b = min(Hq, a + rows)
            # Patch votes come from up to r rows away: aggregate with a halo, then crop.
            lo, hi = max(0, a - halo), min(Hq, b + halo)
            band = self._aggregate(v, indices[:, lo:hi], logits[:, lo:hi])[:, :, a - lo : b - lo]
            if finish is not None:
                band = finish(band, slice(a, b))
            if rows >= Hq:
                return band
            if out is None:
                out = band.new_empty(*band.shape[:2], Hq, Wq)
            out[:, :, a:b] = band
        return out

    def _aggregate(self, v: Tensor, indices: Tensor, logits: Tensor) -> Tensor:
        if self.aggregation == "center":
            return _aggregate_center(v, indices, logits)
        return _aggregate_patch(v, indices, logits, self.patch_size)


def exact_knn(
    query: Tensor, key: Tensor, *, patch_size: int = 3, neighbors: int = 4, key_mask: Tensor | None = None,
    prune: bool = False, query_mask: Tensor | None = None,
) -> NNF:
    """Exhaustive k-NN patches: what PatchMatch approximates, by matrix products over query chunks.

    O(Nq·Nk·C·p²) time but O(chunk·Nk) memory: on small maps (training crops) it is faster
    than PatchMatch and exact. Candidates are ranked with ‖q‖² − 2q·k + ‖k‖² and the
    returned distances recomputed as exact sums of squared differences.

    `prune` skips, for each block of queries, the keys that the patch means alone rule out
    (`_pruned_scan`): just as exact, and much faster for patches of few channels (gray
    pixels), whose means tell patches apart; feature patches gain nothing from it.

    `query_mask` (B, Hq, Wq) bool: search only the queries set in it (in any batch item);
    the others get placeholder neighbours (the first valid key, its true distance), for a
    caller that uses the output only on the mask (an inpainting hole).
    """
    _check_inputs(query, key, patch_size, neighbors, key_mask)
    with torch.no_grad(), full_precision(query):
        return _exact_knn(query, key, patch_size, neighbors, key_mask, prune, query_mask)


def _exact_knn(query: Tensor, key: Tensor, patch_size: int, neighbors: int, key_mask: Tensor | None,
               prune: bool, query_mask: Tensor | None = None) -> NNF:
    r = patch_size // 2
    B, _, Hq, Wq = query.shape
    dtype = _work_dtype(query)
    padded = F.pad(query.to(dtype), (r, r, r, r), mode="replicate") if r else query.to(dtype)
    qp = F.unfold(padded, patch_size).transpose(1, 2)  # (B, Nq, C·p²)
    searched = None if query_mask is None else query_mask.flatten(1).any(0).nonzero()[:, 0]  # (n,)
    if searched is not None:
        qp = qp[:, searched]
    kp = F.unfold(key.to(dtype), patch_size, padding=r)  # (B, C·p², Nk); invalid centres masked below
    valid = valid_key_centres(key.shape, patch_size, key_mask, query.device).to(query.device).flatten(1)  # (B, Nk)
    if int(valid.sum(1).min()) < neighbors:
        raise ValueError(f"neighbors={neighbors} exceeds the number of valid {patch_size}×{patch_size} key patches")
    if prune:
        indices = torch.stack([_pruned_scan(qp[b], kp[b].T, valid[b], neighbors) for b in range(B)])
    else:
        bias = kp.square().sum(1).masked_fill(~valid, math.inf)[:, None]  # (B, 1, Nk)
        held = _EXACT_CPU_ELEMENTS if query.device.type == "cpu" else _EXACT_ELEMENTS
        step = max(1, held // kp.shape[-1])
        indices = torch.cat(
            [_smallest(torch.baddbmm(bias, qp[:, a : a + step], kp, alpha=-2), neighbors)
             for a in range(0, qp.shape[1], step)] or [qp.new_empty(B, 0, neighbors, dtype=torch.int64)], 1)  # (B, Nq or n, k)
    if searched is not None:
        first = valid.int().argmax(1)  # (B,): the first valid key
        placeholders = first.view(B, 1, 1).expand(B, Hq * Wq, neighbors).clone()
        placeholders[:, searched] = indices
        indices = placeholders
    distances = patch_distances(query.to(dtype), key.to(dtype), indices.view(B, Hq, Wq, neighbors), patch_size)
    distances, order = distances.sort(-1)
    return NNF(indices.view(B, Hq, Wq, neighbors).gather(-1, order), distances)


def _smallest(scores: Tensor, k: int, group: int = 64) -> Tensor:
    """Indices (..., k) of the k smallest scores of each row (..., N): exactly topk's, up to ties.

    A CPU's topk over long rows costs more than the matrix product that made them. The k
    smallest lie in at most k groups of `group` consecutive scores, and those groups have
    the k smallest group minima: so a row's minima per group (one fast reduction), the k
    best groups, and topk over their k·group scores only.
    """
    n = scores.shape[-1]
    groups = n // group
    if groups < 4 * k:
        return scores.topk(k, -1, largest=False).indices
    main = groups * group
    minima = scores[..., :main].unflatten(-1, (groups, group)).amin(-1)  # (..., groups)
    best = minima.topk(k, -1, largest=False, sorted=False).indices  # (..., k)
    within = torch.arange(group, device=scores.device)
    candidates = (best[..., None] * group + within).flatten(-2)  # (..., k·group)
    if main < n:  # the last scores, fewer than a group: always candidates
        tail = torch.arange(main, n, device=scores.device).expand(*candidates.shape[:-1], n - main)
        candidates = torch.cat([candidates, tail], -1)
    pick = scores.gather(-1, candidates).topk(k, -1, largest=False).indices
    return candidates.gather(-1, pick)


def _pruned_scan(q: Tensor, k: Tensor, valid: Tensor, neighbors: int) -> Tensor:
    """The `neighbors` nearest valid keys (flat positions, (Nq, k)) of queries q (Nq, D) among k (Nk, D).

    With D values per patch, ‖q − k‖² ≥ D·(mean q − mean k)². Keys are sorted by mean; a
    first pass bounds each query's k-th distance with the keys of about its own mean, a
    second scans, for blocks of queries with similar bounds and means, only the keys whose
    mean can still beat those bounds.
    """
    D, Nq = q.shape[1], q.shape[0]
    keys = valid.nonzero()[:, 0]
    k_mean, order = k[keys].mean(1).sort()
    keys = keys[order]
    k = k[keys]
    k_norm, Nv = k.square().sum(1), keys.numel()
    q_mean = q.mean(1)

    def scan(rows: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        """k best (distances, sorted key rows) among the keys with mean in [lo, hi], at least k of them."""
        a = int(torch.searchsorted(k_mean, lo.view(1)))
        b = max(int(torch.searchsorted(k_mean, hi.view(1), right=True)), a + neighbors)
        a, b = max(0, min(a, Nv - neighbors)), min(Nv, b)
        qb = q[rows]
        dist, idx = torch.addmm(k_norm[a:b][None], qb, k[a:b].T, alpha=-2).topk(neighbors, 1, largest=False)
        return (dist + qb.square().sum(1, keepdim=True)).clamp(min=0), idx + a

    by_mean = q_mean.argsort()
    bound = torch.empty_like(q_mean)
    for a in range(0, Nq, _PRUNE_BLOCK):
        rows = by_mean[a : a + _PRUNE_BLOCK]
        bound[rows] = scan(rows, q_mean[rows].min(), q_mean[rows].max())[0].amax(1)
    radius = (bound * (1 + 1e-5) / D).sqrt() + 1e-6  # a little wide: the bound is rounded
    tier = torch.log2(radius).floor()
    found = torch.empty(Nq, neighbors, dtype=torch.int64, device=q.device)
    order = by_mean[tier[by_mean].argsort(stable=True)]  # by tier, then by mean
    for a in range(0, Nq, _PRUNE_BLOCK):
        rows = order[a : a + _PRUNE_BLOCK]
        _, idx = scan(rows, (q_mean[rows] - radius[rows]).min(), (q_mean[rows] + radius[rows]).max())
        found[rows] = keys[idx]
    return found
