"""PatchMatch's search loop compiled with Numba: the optional `fast` extra, on the CPU.

The search of `attention.patchmatch` (the same projected tables, random init, held list of
3k matches, jump-flood propagation, random search and exact re-ranking of the best 2k),
compiled instead of run as torch operations: on a CPU the torch loop's time goes to the
~50 small operations of each step, not to arithmetic, so it takes 512 queries per step;
compiled, a step takes `_STEP`. Each step proposes every query's candidates from the
matches held before it, then merges them, as the torch loop's chunks do. (One query per
step, PatchMatch's own order, found matches as close, but the colorizer's figures fell by
0.05–0.07 dB with them.)

Rows of the query map are cut into bands of `_BAND` rows, scanned forward then backward on
alternate iterations. Bands of one parity run in parallel, then the other's: a band reads
its neighbours' matches only across a band of the other parity, and random numbers come from
a counter hash of (seed, iteration, query), so the result depends on the seed alone, not on
the threads or their timing. The threads are Python's, running compiled functions that
release the GIL: Numba's own parallel loops bring a second OpenMP runtime, whose idle
threads slowed torch's next operations several times.

Imported only when a large search runs (`attention.COMPILED_STEPS`): Numba's import and its
cached compiled code cost ~1.5 s on a process's first search.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numba import njit

# Rows per band: more than the longest propagation jump (8), so that bands of one parity
# never read each other's matches; small, so that two threads share the work evenly.
_BAND = 16
# Queries per step: small steps carry good matches further within an iteration; with 32 the
# networks' figures are the torch loop's (docs/benchmarks.md).
_STEP = 32
# The eight neighbours of the best match, as attention's.
_NEAR_Y = np.array([0, 0, 1, -1, 1, 1, -1, -1], dtype=np.int64)
_NEAR_X = np.array([1, -1, 0, 0, 1, -1, 1, -1], dtype=np.int64)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
# Float reassociation (a vectorised dot product) but no finite-math assumption: invalid
# keys have an infinite norm, and must lose.
_MATH = {"reassoc", "contract", "nsz", "arcp"}


@njit(cache=True, inline="always")
def _mix(x):
    """splitmix64's finaliser: a well-mixed 64-bit hash of x."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


@njit(cache=True, inline="always")
def _uniform(state):
    """(uniform in [0, 1), next state)."""
    state = state + _GOLDEN
    return float(_mix(state) >> np.uint64(11)) * (1.0 / 9007199254740992.0), state


@njit(cache=True, inline="always")
def _holds(held_i, q, c):
    """Whether query q already holds key c."""
    found = False
    for j in range(held_i.shape[1]):
        found |= held_i[q, j] == c
    return found


@njit(cache=True, inline="always")
def _insert(dists, keys, q, d, c):
    """Key c at distance d into row q of (dists, keys), kept sorted ascending; the last entry drops out."""
    j = dists.shape[1] - 1
    while j > 0 and dists[q, j - 1] > d:
        dists[q, j] = dists[q, j - 1]
        keys[q, j] = keys[q, j - 1]
        j -= 1
    dists[q, j] = d
    keys[q, j] = c


@njit(cache=True, fastmath=_MATH, inline="always")
def _consider(q, base, table, qrow, held_d, held_i, cand, m, dist):
    """Keep the best of candidates cand[:m] (key positions in the query's batch element)
    among query q's held matches, which stay sorted, best first, and distinct.

    In three passes, so that the costly step, reading a table row from anywhere in memory,
    runs as one loop of independent loads the CPU overlaps: drop candidates already held
    (neighbours propagate mostly those), measure the rest, then insert the better ones.
    """
    held = held_d.shape[1]
    fresh = 0
    for i in range(m):
        c = cand[i]
        cand[fresh] = c
        fresh += not _holds(held_i, q, c)
    for i in range(fresh):
        row = base + cand[i]
        d = np.float32(0.0)
        for c in range(table.shape[1]):
            d += qrow[c] * table[row, c]
        dist[i] = d
    for i in range(fresh):
        d, c = dist[i], cand[i]
        # An infinite (invalid) key never enters; nor a candidate proposed twice in this step.
        if d < held_d[q, held - 1] and not _holds(held_i, q, c):
            _insert(held_d, held_i, q, d, c)


@njit(cache=True, fastmath=_MATH)
def _propose(q, t, held_i, listed, starts, counts, seeds, Hq, Wq, Hk, Wk, r, slots, radii, seed, cand):
    """Query q's candidates of step t (−1: the random init) into cand: their count."""
    held = held_i.shape[1]
    b, y, x = q // (Hq * Wq), q // Wq % Hq, q % Wq
    lo, hi_y, hi_x = r, Hk - 1 - r, Wk - 1 - r
    state = _mix(seed ^ (np.uint64(q) * _GOLDEN) ^ np.uint64(t + 1))
    m = 0
    if t < 0:
        # 3k distinct valid positions evenly spaced in the valid list from a random start, and the caller's seed.
        count = counts[b]
        u, state = _uniform(state)
        start = int(u * count)
        spread = max(1, count // held)
        for j in range(held):
            cand[m] = listed[starts[b] + (start + j * spread) % count]
            m += 1
        for j in range(seeds.shape[1]):
            s = seeds[q, j]
            if s >= 0 and s < Hk * Wk:
                cand[m] = s
                m += 1
        return m
    # Propagation: the neighbours' best `slots` matches, shifted back (jumps 8·2⁻ᵗ and 1).
    first = 8 >> t
    for jump in range(2 if first > 1 else 1):
        s = first if jump == 0 and first > 1 else 1
        for e in range(4):  # the four directions: the first four of the eight neighbours
            ey, ex = _NEAR_Y[e], _NEAR_X[e]
            sy, sx = y + s * ey, x + s * ex
            if sy < 0 or sy >= Hq or sx < 0 or sx >= Wq:
                continue
            source = (b * Hq + sy) * Wq + sx
            for j in range(slots):
                src = held_i[source, j]
                if src < 0:
                    break
                py, px = src // Wk - s * ey, src % Wk - s * ex
                if py >= lo and py <= hi_y and px >= lo and px <= hi_x:
                    cand[m] = py * Wk + px
                    m += 1
    # Random search: every window around the best match, the two smallest around the others.
    for j in range(held):
        at = held_i[q, j]
        if at < 0:
            break
        cy, cx = at // Wk, at % Wk
        for i in range(0 if j == 0 else max(0, radii.shape[0] - 2), radii.shape[0]):
            radius = radii[i]
            y0, y1 = max(cy - radius, lo), min(cy + radius, hi_y)
            x0, x1 = max(cx - radius, lo), min(cx + radius, hi_x)
            u, state = _uniform(state)
            ry = min(y0 + int(u * (y1 - y0 + 1)), hi_y)
            u, state = _uniform(state)
            rx = min(x0 + int(u * (x1 - x0 + 1)), hi_x)
            cand[m] = ry * Wk + rx
            m += 1
    # The eight neighbours of the best match.
    best = held_i[q, 0]
    if best >= 0:
        cy, cx = best // Wk, best % Wk
        for e in range(8):
            ny, nx = cy + _NEAR_Y[e], cx + _NEAR_X[e]
            if ny >= lo and ny <= hi_y and nx >= lo and nx <= hi_x:
                cand[m] = ny * Wk + nx
                m += 1
    return m


@njit(cache=True, nogil=True, fastmath=_MATH)
def _sweep(table, qrows, held_d, held_i, listed, starts, counts, seeds, active, B, Hq, Wq, Hk, Wk, r, slots, radii, seed,
           t, first_band, band_step):
    """Step t (−1: the init) of every `active` query in bands first_band, first_band + band_step, …"""
    rows = B * Hq
    held = held_i.shape[1]
    capacity = max(held + seeds.shape[1], 8 * slots + radii.shape[0] + 2 * held + 8)  # candidates of one step
    cand = np.empty((_STEP, capacity), dtype=np.int64)
    proposed = np.empty(_STEP, dtype=np.int64)
    dist = np.empty(capacity, dtype=np.float32)
    for band in range(first_band, (rows + _BAND - 1) // _BAND, band_step):
        first, last = band * _BAND * Wq, min(rows, (band + 1) * _BAND) * Wq
        for a in range(0, last - first, _STEP):
            size = min(_STEP, last - first - a)
            for i in range(size):
                q = first + a + i if t % 2 == 0 else last - 1 - a - i
                proposed[i] = 0 if not active[q] else _propose(q, t, held_i, listed, starts, counts, seeds, Hq, Wq, Hk,
                                                               Wk, r, slots, radii, seed, cand[i])
            for i in range(size):
                q = first + a + i if t % 2 == 0 else last - 1 - a - i
                _consider(q, q // (Hq * Wq) * Hk * Wk, table, qrows[q], held_d, held_i, cand[i], proposed[i], dist)


@njit(cache=True, nogil=True, fastmath=_MATH)
def _rerank(q_pix, k_pix, held_i, indices, distances, Hq, Wq, Hk, Wk, r, zero, first, last):
    """The best k (indices, distances) of queries first…last − 1 among their first 2k held
    matches by exact patch SSD: query pixels clamped to the map (replicate padding), as
    `attention._patch_ssd`."""
    k = indices.shape[1]
    for q in range(first, last):
        b, y, x = q // (Hq * Wq), q // Wq % Hq, q % Wq
        for j in range(k):
            distances[q, j] = np.inf
            indices[q, j] = held_i[q, 0]
        for j in range(2 * k):
            cand = held_i[q, j]
            if cand < 0:
                break
            ky, kx = cand // Wk, cand % Wk
            d = zero
            for dy in range(-r, r + 1):
                qy = min(max(y + dy, 0), Hq - 1)
                for dx in range(-r, r + 1):
                    qx = min(max(x + dx, 0), Wq - 1)
                    qrow = (b * Hq + qy) * Wq + qx
                    krow = b * Hk * Wk + (ky + dy) * Wk + kx + dx
                    for c in range(q_pix.shape[1]):
                        e = q_pix[qrow, c] - k_pix[krow, c]
                        d += e * e
            if d < distances[q, k - 1]:
                _insert(distances, indices, q, d, cand)


def _in_parallel(threads: int, work) -> None:
    """work(i, threads) for i < threads, on that many threads (the compiled functions release the GIL)."""
    if threads == 1:
        work(0, 1)
        return
    with ThreadPoolExecutor(threads) as pool:
        for done in [pool.submit(work, i, threads) for i in range(threads)]:
            done.result()


def search(table: np.ndarray, qrows: np.ndarray, listed: np.ndarray, starts: np.ndarray, counts: np.ndarray,
           seeds: np.ndarray, active: np.ndarray, shape: tuple[int, int, int, int, int], r: int, held: int,
           iterations: int, slots: int, radii: np.ndarray, seed: int, threads: int) -> np.ndarray:
    """The held key positions (n, held) int32, best first (−1: empty), of PatchMatch from a random init.

    table (keys + 1, D + 1) and qrows (n, D + 1) float32 as `attention._search_tables` and
    `_Search.query_rows` make them; listed/starts/counts: each batch element's valid key
    positions; seeds (n, s) the caller's initial matches (−1: none); active (n,) bool: the
    queries searched (the others hold nothing, and propagate nothing); shape (B, Hq, Wq, Hk, Wk).
    """
    B, Hq, Wq, Hk, Wk = shape
    n = B * Hq * Wq
    held_d = np.full((n, held), np.inf, dtype=np.float32)
    held_i = np.full((n, held), -1, dtype=np.int32)
    listed, starts, counts, seeds = (x.astype(np.int64) for x in (listed, starts, counts, seeds))
    radii, seed = radii.astype(np.int64), np.uint64(seed)
    for t in range(-1, iterations):
        for parity in range(2):
            _in_parallel(threads, lambda i, threads: _sweep(
                table, qrows, held_d, held_i, listed, starts, counts, seeds, active, B, Hq, Wq, Hk, Wk, r, slots, radii,
                seed, t, parity + 2 * i, 2 * threads))
    return held_i


def rerank(q_pix: np.ndarray, k_pix: np.ndarray, held: np.ndarray, k: int, shape: tuple[int, int, int, int, int],
           r: int, threads: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (n, k) int64 and exact distances (n, k) of the best k of the first 2k `held`
    (a `search` result); q_pix, k_pix: the maps' pixels as rows (B·H·W, C), float32 or float64."""
    B, Hq, Wq, Hk, Wk = shape
    n = held.shape[0]
    indices = np.empty((n, k), dtype=np.int64)
    distances = np.empty((n, k), dtype=q_pix.dtype)
    step = -(-n // threads)
    _in_parallel(threads, lambda i, threads: _rerank(
        q_pix, k_pix, held, indices, distances, Hq, Wq, Hk, Wk, r, q_pix.dtype.type(0), i * step, min(n, (i + 1) * step)))
    return indices, distances
