"""PSAL layer: PatchMatch against exact k-NN on natural crops, masks, sizes, gradients, errors."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from psal_cli import attention
from psal_cli.attention import (
    NNF,
    PSAL,
    exact_knn,
    patch_distances,
    patchmatch,
    valid_key_centres,
)

DATA = Path(__file__).resolve().parent / "data"


def crop(name: str) -> torch.Tensor:
    """A 64×64 photo crop from tests/data as (1, 3, 64, 64) in [0, 1]."""
    rgb = np.asarray(Image.open(DATA / f"{name}_64.png").convert("RGB"), dtype=np.float32) / 255
    return torch.from_numpy(rgb).permute(2, 0, 1)[None].contiguous()


def features(x: torch.Tensor, channels: int) -> torch.Tensor:
    """A fixed random 3×3 conv + ReLU: conv-like features of a photo."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(channels, x.shape[1], 3, 3, generator=g) / math.sqrt(9 * x.shape[1])
    return F.relu(F.conv2d(x, weight, padding=1))


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


try:
    import numba  # noqa: F401  (the `fast` extra: PatchMatch's search loop compiled)

    LOOPS = [False, True]
except ImportError:
    LOOPS = [False, pytest.param(True, marks=pytest.mark.skip(reason="Numba is not installed (the fast extra)"))]


@pytest.fixture(params=LOOPS, ids=["torch loop", "compiled loop"])
def compiled(request: pytest.FixtureRequest) -> bool:
    """PatchMatch's search loop as torch operations (every device) or compiled (the CPU with Numba)."""
    return request.param


def quality(found: NNF, exact: NNF, patch_size: int = 3) -> tuple[float, float]:
    """(recall@1, mean found distance / mean exact distance) over queries whose patch lies inside the map."""
    r = patch_size // 2
    inner = (slice(None), slice(r, -r or None), slice(r, -r or None))
    d, e = found.distances[inner], exact.distances[inner]
    recall = (d[..., 0] <= e[..., 0] * (1 + 1e-4) + 1e-6).float().mean().item()
    return recall, (d.mean() / e.mean()).item()


# (name, query, key): query and key from different photos or regions; RGB or conv features.
NATURAL = {
    "rgb 48 vs 64, two photos": lambda: (crop("astronaut")[..., 8:56, 8:56], crop("chelsea")),
    "rgb 64 vs 40, two regions": lambda: (crop("coffee"), crop("coffee")[..., 24:, :40]),
    "conv C=16, two photos": lambda: (features(crop("chelsea"), 16)[..., :48, :], features(crop("astronaut"), 16)),
    "conv C=8, 40 vs 64": lambda: (features(crop("astronaut"), 8)[..., 10:50, 20:60], features(crop("coffee"), 8)),
}


@pytest.mark.parametrize("case", NATURAL)
def test_patchmatch_is_close_to_exact_knn_on_photos(case: str, compiled: bool) -> None:
    query, key = NATURAL[case]()
    recall, ratio = quality(patchmatch(query, key, generator=seeded(), compiled=compiled), exact_knn(query, key))
    assert recall >= 0.6 and ratio <= 1.05, (recall, ratio)


def test_propagated_matches_reach_either_search_loop_and_keep_the_quality(compiled: bool,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """`propagated` (the upscaler's 6 of k = 4) is what the loop propagates; the matches stay good;
    out of [1, 3k] it is a clear error."""
    seen = []
    if compiled:
        from psal_cli import search_kernel

        search = search_kernel.search
        monkeypatch.setattr(search_kernel, "search", lambda *a: seen.append(a[11]) or search(*a))
    else:
        propagate = attention._Search.propagate
        monkeypatch.setattr(attention._Search, "propagate",
                            lambda self, rows, held, jumps, slots: seen.append(slots) or propagate(self, rows, held, jumps, slots))
    query, key = NATURAL["conv C=16, two photos"]()
    for propagated, expected in ((6, 6), (None, 8)):
        seen.clear()
        found = patchmatch(query, key, generator=seeded(), compiled=compiled, propagated=propagated)
        assert seen and set(seen) == {expected}
        recall, ratio = quality(found, exact_knn(query, key))
        assert recall >= 0.6 and ratio <= 1.05, (propagated, recall, ratio)
    for wrong in (0, 13):
        with pytest.raises(ValueError, match="propagated"):
            patchmatch(query, key, compiled=compiled, propagated=wrong)


@pytest.mark.parametrize("case", NATURAL)
def test_a_gpus_larger_search_steps_keep_the_quality(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU PatchMatch updates up to `_GPU_CHUNK` queries per step: here each whole map in one."""
    monkeypatch.setattr(attention, "_search_chunk", lambda device, queries: attention._GPU_CHUNK)
    query, key = NATURAL[case]()
    assert query.shape[-2] * query.shape[-1] <= attention._GPU_CHUNK
    recall, ratio = quality(patchmatch(query, key, generator=seeded(), compiled=False), exact_knn(query, key))
    assert recall >= 0.6 and ratio <= 1.05, (recall, ratio)


def test_a_gpu_keeps_enough_search_steps_per_iteration() -> None:
    """Larger steps on a GPU (fewer launches), but never so few per iteration that good
    matches stop travelling: as many as the CPU's on maps up to 128 of its steps."""
    gpu, cpu = torch.device("cuda"), torch.device("cpu")  # only the device's type is read
    for queries in (100, 20_000, 68_000, 300_000, 10**6, 10**7):
        chunk, steps = attention._search_chunk(gpu, queries), -(-queries // attention._CHUNK)
        assert attention._CHUNK <= chunk <= attention._GPU_CHUNK
        assert -(-queries // chunk) >= min(steps, attention._MIN_STEPS)
        assert attention._search_chunk(cpu, queries) == attention._CHUNK
    assert attention._search_chunk(gpu, 10**7) == attention._GPU_CHUNK


@pytest.mark.parametrize("case", NATURAL)
def test_the_gpus_merge_without_host_synchronisation_finds_the_same_matches(case: str,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU the merge takes a fixed-width block instead of reading the widest
    improvement back from the device: the same matches, run here on the CPU."""
    query, key = NATURAL[case]()
    narrow = patchmatch(query, key, generator=seeded(), compiled=False)
    init = attention._Search.__init__

    def sync_free(self, *args, **kwargs) -> None:
        init(self, *args, **kwargs)
        self.sync_free = True

    monkeypatch.setattr(attention._Search, "__init__", sync_free)
    wide = patchmatch(query, key, generator=seeded(), compiled=False)
    assert torch.equal(wide.indices, narrow.indices) and torch.equal(wide.distances, narrow.distances)


def test_patchmatch_distance_ratio_on_random_maps(compiled: bool) -> None:
    g = seeded(1)
    query, key = torch.randn(2, 8, 32, 32, generator=g), torch.randn(2, 8, 40, 36, generator=g)
    _, ratio = quality(patchmatch(query, key, generator=seeded(), compiled=compiled), exact_knn(query, key))
    assert ratio <= 1.10


def naive_knn(query: torch.Tensor, key: torch.Tensor, p: int, k: int, mask: torch.Tensor) -> tuple[list, list]:
    """Per query, the k best (distance, key index) by a python loop over every valid key centre."""
    r = p // 2
    _, _, Hq, Wq = query.shape
    Hk, Wk = key.shape[-2:]
    q = F.pad(query, (r, r, r, r), mode="replicate")[0]
    indices, distances = [], []
    for y, x in itertools.product(range(Hq), range(Wq)):
        scored = []
        for ky, kx in itertools.product(range(r, Hk - r), range(r, Wk - r)):
            if mask[0, ky - r : ky + r + 1, kx - r : kx + r + 1].any():
                continue
            d = ((q[:, y : y + p, x : x + p] - key[0, :, ky - r : ky + r + 1, kx - r : kx + r + 1]) ** 2).sum()
            scored.append((d.item(), ky * Wk + kx))
        best = sorted(scored)[:k]
        distances.append([d for d, _ in best])
        indices.append([i for _, i in best])
    return indices, distances


@pytest.mark.parametrize("prune", [False, True])
def test_exact_knn_matches_a_python_loop(prune: bool) -> None:
    g = seeded(2)
    query, key = torch.randn(1, 2, 5, 6, generator=g), torch.randn(1, 2, 7, 6, generator=g)
    mask = torch.zeros(1, 7, 6, dtype=torch.bool)
    mask[0, 0, 0] = mask[0, 5, 4] = True
    indices, distances = naive_knn(query, key, 3, 2, mask)
    nnf = exact_knn(query, key, patch_size=3, neighbors=2, key_mask=mask, prune=prune)
    assert nnf.indices.flatten(0, 2).tolist() == indices
    assert torch.allclose(nnf.distances.flatten(0, 2), torch.tensor(distances), rtol=1e-5)


@pytest.mark.parametrize("prune", [False, True])
def test_exact_knn_searches_the_query_mask_as_the_python_loop_does(prune: bool) -> None:
    """Queries set in the mask of either batch item get the loop's neighbours; the others a
    placeholder: the first valid key, with its true distance."""
    g = seeded(5)
    query, key = torch.randn(2, 2, 5, 6, generator=g), torch.randn(2, 2, 7, 6, generator=g)
    wanted = torch.zeros(2, 5, 6, dtype=torch.bool)
    wanted[0, 1:3, 2:5] = wanted[1, 4, 0] = True
    mask = torch.zeros(2, 7, 6, dtype=torch.bool)
    mask[:, 0, 0] = True  # the first valid centre, (1, 1), is masked: the placeholder is (1, 2)
    nnf = exact_knn(query, key, patch_size=3, neighbors=2, key_mask=mask, prune=prune, query_mask=wanted)
    for b in range(2):
        indices, distances = naive_knn(query[b : b + 1], key[b : b + 1], 3, 2, mask[b : b + 1])
        for i, (found, far) in enumerate(zip(nnf.indices[b].flatten(0, 1).tolist(), nnf.distances[b].flatten(0, 1))):
            if wanted.flatten(1).any(0)[i]:
                assert found == indices[i] and torch.allclose(far, torch.tensor(distances[i]), rtol=1e-5)
            else:
                assert found == [8, 8]
    assert torch.equal(nnf.distances, patch_distances(query, key, nnf.indices, 3).sort(-1).values)


def test_masked_keys_are_never_returned(compiled: bool) -> None:
    query = torch.cat([features(crop("chelsea"), 8)[..., :40, :40], features(crop("coffee"), 8)[..., 20:60, 10:50]])
    key = torch.cat([features(crop("astronaut"), 8), features(crop("chelsea"), 8)])
    mask = torch.zeros(2, 64, 64, dtype=torch.bool)
    mask[0, 10:40, 20:50] = True  # a hole
    mask[0, torch.arange(0, 64, 7), torch.arange(0, 64, 7)] = True  # and scattered pixels
    mask[1, :, 30:] = True  # another mask for the second batch element
    nnf = patchmatch(query, key, key_mask=mask, generator=seeded(), compiled=compiled)
    touched = F.max_pool2d(mask[:, None].float(), 3, stride=1, padding=1)[:, 0].flatten(1) > 0  # (B, Hk·Wk)
    assert not touched.gather(1, nnf.indices.flatten(1)).any()
    recall, ratio = quality(nnf, exact_knn(query, key, key_mask=mask))
    assert recall >= 0.6 and ratio <= 1.05


def test_valid_key_centres_stay_inside_and_off_the_mask() -> None:
    mask = torch.zeros(1, 6, 7, dtype=torch.bool)
    mask[0, 4, 1] = True
    expected = torch.zeros(1, 6, 7, dtype=torch.bool)
    expected[0, 1:5, 1:6] = True  # centres whose 3×3 patch lies inside the map
    expected[0, 3:5, 1:3] = False  # and does not touch the masked pixel (4, 1)
    assert torch.equal(valid_key_centres((1, 2, 6, 7), 3, mask), expected)


@pytest.mark.parametrize("exact_pairs", [0, 1 << 30], ids=["patchmatch", "exhaustive"])
@pytest.mark.parametrize("key_size", [(24, 20), (80, 72)], ids=["smaller key", "larger key"])
def test_cross_attention_between_maps_of_different_sizes(key_size: tuple[int, int], exact_pairs: int,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attention, "EXACT_PAIRS", exact_pairs)
    g = seeded(3)
    Hk, Wk = key_size
    q, k, v = torch.randn(2, 6, 40, 40, generator=g), torch.randn(2, 6, Hk, Wk, generator=g), torch.randn(2, 5, Hk, Wk, generator=g)
    layer = PSAL(neighbors=3)
    out = layer(q, k, v, generator=seeded())
    assert out.shape == (2, 5, 40, 40) and out.isfinite().all()
    nnf = layer.search(q, k, generator=seeded())
    assert torch.equal(out, layer.attend(q, k, v, nnf.indices, nnf.distances))  # what forward attended with
    assert nnf.indices.shape == nnf.distances.shape == (2, 40, 40, 3)
    assert nnf.indices.dtype == torch.int64 and nnf.distances.dtype == torch.float32
    y, x = nnf.indices // Wk, nnf.indices % Wk
    assert ((y >= 1) & (y <= Hk - 2) & (x >= 1) & (x <= Wk - 2)).all()
    assert (nnf.distances.diff(dim=-1) >= 0).all()
    assert (nnf.indices.sort(-1).values.diff(dim=-1) != 0).all()  # no repeated match
    assert torch.allclose(nnf.distances, patch_distances(q, k, nnf.indices, 3), rtol=1e-4)


@pytest.mark.parametrize("patch_size", [1, 3, 5])
def test_pruned_exact_knn_equals_the_full_scan(patch_size: int) -> None:
    """Pruning by patch mean skips keys, never a neighbour: gray photos (where it prunes most)
    and a batch of random features with masked keys."""
    gray = torch.stack([crop(name)[0, :1, :40, :48] for name in ("chelsea", "coffee")])
    feats = torch.randn(2, 3, 20, 23, generator=seeded(10))
    mask = torch.rand(2, 20, 23, generator=seeded(11)) < 0.1
    for query, key, key_mask in ((gray, gray.flip(-1), None), (feats, feats.flip(-2), mask)):
        full = exact_knn(query, key, patch_size=patch_size, neighbors=3, key_mask=key_mask)
        pruned = exact_knn(query, key, patch_size=patch_size, neighbors=3, key_mask=key_mask, prune=True)
        # Equal but where near-ties rank differently with the rounding of a shorter scan.
        assert torch.allclose(pruned.distances, full.distances, rtol=1e-5, atol=1e-7)


SEARCHES = {
    "patchmatch": lambda q, k, mask: patchmatch(q, k, neighbors=3, key_mask=mask, generator=seeded(), compiled=False),
    "exact": lambda q, k, mask: exact_knn(q, k, neighbors=3, key_mask=mask),
    "exact, pruned": lambda q, k, mask: exact_knn(q, k, neighbors=3, key_mask=mask, prune=True),
    "exact, no mask": lambda q, k, mask: exact_knn(q, k, neighbors=3),
    "patchmatch, no mask": lambda q, k, mask: patchmatch(q, k, neighbors=3, generator=seeded(), compiled=False),
}


@pytest.mark.parametrize("search", SEARCHES)
def test_searches_make_every_tensor_on_the_inputs_device(search: str) -> None:
    """Under torch's default device `meta`, a tensor a search makes without naming its inputs'
    device lands there, and the first operation mixing it with them fails: the device mix-ups
    a GPU run would hit, caught on a CPU-only machine."""
    g = seeded(9)
    q, k = torch.randn(2, 4, 12, 10, generator=g), torch.randn(2, 4, 9, 11, generator=g)
    mask = torch.zeros(2, 9, 11, dtype=torch.bool)
    mask[:, 3:5, 4] = True
    expected = SEARCHES[search](q, k, mask)
    with torch.device("meta"):
        found = SEARCHES[search](q, k, mask)
        layer = PSAL(neighbors=3, aggregation="patch", query_chunk=20)  # banded aggregation too
        with torch.no_grad():
            out = layer.attend(None, None, k, found.indices, found.distances)
    assert found.indices.device == found.distances.device == out.device == q.device
    assert torch.equal(found.indices, expected.indices) and torch.equal(found.distances, expected.distances)


def test_distances_at_chosen_positions_are_those_rows_of_the_full_call() -> None:
    g = torch.Generator().manual_seed(4)
    q, k = torch.randn(2, 5, 30, 34, generator=g), torch.randn(2, 5, 25, 28, generator=g)
    indices = torch.randint(1, 24, (2, 30, 34, 3), generator=g) * 28 + torch.randint(1, 27, (2, 30, 34, 3), generator=g)
    positions = torch.tensor([0, 5, 33, 30 * 34 + 7, 2 * 30 * 34 - 1])
    full = patch_distances(q, k, indices, 3).view(-1, 3)
    assert torch.equal(patch_distances(q, k, indices.view(-1, 3)[positions], 3, positions=positions), full[positions])


@pytest.mark.parametrize("rows", [7, 512, 10**6])
def test_distance_passes_do_not_depend_on_their_chunks(rows: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A GPU runs the exact-distance passes in larger chunks than the CPU: same numbers."""
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 6, 30, 34, generator=g), torch.randn(2, 6, 25, 28, generator=g)
    y, x = torch.randint(1, 24, (2, 30, 34, 3), generator=g), torch.randint(1, 27, (2, 30, 34, 3), generator=g)
    indices = y * 28 + x  # valid key centres
    distances, nnf = patch_distances(q, k, indices, 3), patchmatch(q, k, neighbors=3, generator=seeded(), compiled=False)
    monkeypatch.setattr(attention, "_distance_rows", lambda maps, candidates: rows)
    assert torch.equal(patch_distances(q, k, indices, 3), distances)
    again = patchmatch(q, k, neighbors=3, generator=seeded(), compiled=False)
    assert torch.equal(again.indices, nnf.indices) and torch.equal(again.distances, nnf.distances)


@pytest.mark.parametrize("aggregation", ["center", "patch"])
def test_gradcheck_for_q_k_and_v(aggregation: str) -> None:
    g = seeded(4)
    q = torch.randn(1, 2, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 3, 6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    layer = PSAL(neighbors=2, temperature=4.0, aggregation=aggregation)
    indices = patchmatch(q.detach(), k.detach(), neighbors=2, generator=seeded()).indices
    assert torch.autograd.gradcheck(lambda q, k, v: layer.attend(q, k, v, indices), (q, k, v))


def test_forward_gradients_reach_q_k_and_v() -> None:
    g = seeded(5)
    q, k, v = (torch.randn(2, 4, 12, 12, generator=g, requires_grad=True) for _ in range(3))
    PSAL(temperature=10.0, aggregation="patch")(q, k, v, generator=seeded()).square().sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (q, k, v))


def test_same_seed_gives_identical_output(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attention, "EXACT_PAIRS", 0)
    q, k = features(crop("astronaut"), 8), features(crop("chelsea"), 8)
    layer = PSAL(aggregation="patch")
    assert torch.equal(layer(q, k, k, generator=seeded(7)), layer(q, k, k, generator=seeded(7)))
    nnf, again = layer.search(q, k, generator=seeded(7)), layer.search(q, k, generator=seeded(7))
    assert torch.equal(nnf.indices, again.indices) and torch.equal(nnf.distances, again.distances)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype: torch.dtype, compiled: bool) -> None:
    q, k = features(crop("chelsea"), 8)[..., :32, :32], features(crop("coffee"), 8)[..., :40, :40]
    out = PSAL()(q.to(dtype), k.to(dtype), k.to(dtype), generator=seeded())
    assert out.dtype == dtype and out.shape == (1, 8, 32, 32) and out.isfinite().all()
    nnf = patchmatch(q.to(dtype), k.to(dtype), generator=seeded(), compiled=compiled)
    assert nnf.distances.dtype == torch.float32
    _, ratio = quality(nnf, exact_knn(q.to(dtype).float(), k.to(dtype).float()))
    assert ratio <= 1.05


def test_small_maps_use_the_exhaustive_search(monkeypatch: pytest.MonkeyPatch) -> None:
    q, k = features(crop("coffee"), 8)[..., :24, :24], features(crop("astronaut"), 8)[..., :30, :30]
    layer = PSAL(iterations=1)  # PatchMatch this short misses some exact matches of these maps
    monkeypatch.setattr(attention, "EXACT_PAIRS", 24 * 24 * 30 * 30)
    assert torch.equal(layer.search(q, k).indices, exact_knn(q, k).indices)
    monkeypatch.setattr(attention, "EXACT_PAIRS", 24 * 24 * 30 * 30 - 1)  # one pair more than the rule: PatchMatch
    assert not torch.equal(layer.search(q, k, generator=seeded()).indices, exact_knn(q, k).indices)


def test_init_from_an_exact_nnf_is_kept(compiled: bool) -> None:
    q, k = features(crop("coffee"), 8)[..., :32, :32], features(crop("astronaut"), 8)
    exact = exact_knn(q, k)
    recall, ratio = quality(patchmatch(q, k, iterations=0, init=exact, generator=seeded(), compiled=compiled), exact)
    assert recall == 1.0 and ratio == pytest.approx(1.0)


def naive_attention(q, k, v, nnf: NNF, p: int, temperature: float, aggregation: str) -> torch.Tensor:
    """PSAL.md's formulas, one query pixel at a time."""
    r = p // 2
    _, _, Hq, Wq = q.shape
    Wk = k.shape[-1]
    out = torch.zeros(1, v.shape[1], Hq, Wq, dtype=v.dtype)
    offsets = itertools.product(range(-r, r + 1), repeat=2) if aggregation == "patch" else [(0, 0)]
    offsets = list(offsets)
    for y, x in itertools.product(range(Hq), range(Wq)):
        logits, values = [], []
        for dy, dx in offsets:
            sy, sx = y - dy, x - dx  # the query patch centred at x − d covers x
            if not (0 <= sy < Hq and 0 <= sx < Wq):
                continue
            for j in range(nnf.indices.shape[-1]):
                match = int(nnf.indices[0, sy, sx, j])
                logits.append(-nnf.distances[0, sy, sx, j] / temperature)
                values.append(v[0, :, match // Wk + dy, match % Wk + dx])
        weights = torch.stack(logits).softmax(0)
        out[0, :, y, x] = (weights[:, None] * torch.stack(values)).sum(0)
    return out


@pytest.mark.parametrize("aggregation", ["center", "patch"])
def test_aggregation_equals_the_formula_in_a_loop(aggregation: str) -> None:
    g = seeded(6)
    q, k, v = torch.randn(1, 3, 6, 7, generator=g), torch.randn(1, 3, 8, 9, generator=g), torch.randn(1, 2, 8, 9, generator=g)
    layer = PSAL(neighbors=3, temperature=5.0, aggregation=aggregation)
    out = layer(q, k, v, generator=seeded())
    expected = naive_attention(q, k, v, layer.search(q, k, generator=seeded()), 3, 5.0, aggregation)
    assert torch.allclose(out, expected, atol=1e-5)


@pytest.mark.parametrize("aggregation", ["center", "patch"])
def test_row_chunked_attention_equals_unchunked(aggregation: str) -> None:
    g = seeded(8)
    q, k, v = torch.randn(2, 4, 20, 16, generator=g), torch.randn(2, 4, 24, 24, generator=g), torch.randn(2, 3, 24, 24, generator=g)
    whole, chunked = PSAL(aggregation=aggregation), PSAL(aggregation=aggregation, query_chunk=3 * 16)
    with torch.no_grad():
        assert torch.allclose(whole(q, k, v, generator=seeded()), chunked(q, k, v, generator=seeded()), atol=1e-6)


Q, K = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 10, 10)
INVALID = {
    "even patch size": lambda: patchmatch(Q, K, patch_size=4),
    "patch size < 1": lambda: patchmatch(Q, K, patch_size=0),
    "neighbors < 1": lambda: patchmatch(Q, K, neighbors=0),
    "more neighbors than key patches": lambda: patchmatch(Q, K, patch_size=7, neighbors=17),
    "everything masked": lambda: patchmatch(Q, K, key_mask=torch.ones(1, 10, 10, dtype=torch.bool)),
    "masked down to one patch": lambda: patchmatch(Q, K, neighbors=2, key_mask=F.pad(torch.zeros(1, 3, 3), (0, 7, 0, 7), value=1).bool()),
    "channel mismatch": lambda: patchmatch(Q, torch.randn(1, 3, 10, 10)),
    "batch mismatch": lambda: patchmatch(Q, torch.randn(2, 4, 10, 10)),
    "not (B, C, H, W)": lambda: patchmatch(Q[0], K[0]),
    "key smaller than a patch": lambda: patchmatch(Q, K[..., :2, :]),
    "query smaller than a patch": lambda: patchmatch(Q[..., :2], K),
    "mask shape": lambda: patchmatch(Q, K, key_mask=torch.zeros(1, 8, 8, dtype=torch.bool)),
    "exact_knn, too many neighbors": lambda: exact_knn(Q, K, patch_size=7, neighbors=17),
    "value size": lambda: PSAL()(Q, K, torch.randn(1, 2, 9, 10)),
    "aggregation": lambda: PSAL(aggregation="mean"),
    "temperature": lambda: PSAL(temperature=0.0),
}


@pytest.mark.parametrize("case", INVALID)
def test_invalid_arguments_raise_value_error(case: str) -> None:
    with pytest.raises(ValueError):
        INVALID[case]()


def test_channels_last_maps_give_the_same_nnf(compiled: bool) -> None:
    """The engine hands PSAL channels-last maps (rows without a copy): same result as NCHW."""
    query, key = features(crop("chelsea"), 8)[..., :40, :], features(crop("astronaut"), 8)
    plain = patchmatch(query, key, generator=seeded(), compiled=compiled)
    cl = patchmatch(query.contiguous(memory_format=torch.channels_last), key.contiguous(memory_format=torch.channels_last), generator=seeded(), compiled=compiled)
    assert torch.equal(plain.indices, cl.indices) and torch.allclose(plain.distances, cl.distances)


@pytest.mark.parametrize("scale", [1e-6, 1e5])
def test_search_is_invariant_to_the_feature_scale(scale: float, compiled: bool) -> None:
    """The float16 search table is scaled to the features: tiny or huge maps match alike."""
    query, key = features(crop("chelsea"), 8)[..., :40, :], features(crop("astronaut"), 8)
    plain = patchmatch(query, key, generator=seeded(), compiled=compiled)
    scaled = patchmatch(query * scale, key * scale, generator=seeded(), compiled=compiled)
    same = scaled.indices == plain.indices
    assert same.float().mean() > 0.98
    assert torch.allclose(scaled.distances[same] / scale**2, plain.distances[same], rtol=1e-3, atol=1e-5)


@pytest.mark.skipif(not isinstance(LOOPS[1], bool), reason="Numba is not installed")
def test_the_compiled_loop_does_not_depend_on_the_threads() -> None:
    """Bands of one parity run in parallel and never read each other: a seed gives one result."""
    query, key = features(crop("chelsea"), 8), features(crop("astronaut"), 8)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = patchmatch(query, key, generator=seeded(), compiled=True)
        torch.set_num_threads(2)
        two = patchmatch(query, key, generator=seeded(), compiled=True)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one.indices, two.indices) and torch.equal(one.distances, two.distances)


@pytest.mark.skipif(not isinstance(LOOPS[1], bool), reason="Numba is not installed")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_compiled_loop_returns_exact_distances_of_valid_distinct_keys(dtype: torch.dtype) -> None:
    """Its re-ranking against the torch layer's differentiable distances, on two batch elements
    of their own key masks and a query map larger than the key map."""
    g = seeded(6)
    query, key = torch.randn(2, 5, 50, 44, generator=g, dtype=dtype), torch.randn(2, 5, 31, 37, generator=g, dtype=dtype)
    mask = torch.zeros(2, 31, 37, dtype=torch.bool)
    mask[0, 5:20, 8:30] = True
    mask[1, :, :10] = True
    nnf = patchmatch(query, key, neighbors=4, key_mask=mask, generator=seeded(), compiled=True)
    assert nnf.distances.dtype == dtype and nnf.indices.dtype == torch.int64
    assert torch.allclose(nnf.distances, patch_distances(query, key, nnf.indices, 3), rtol=1e-5)
    assert (nnf.distances.diff(dim=-1) >= 0).all() and (nnf.indices.sort(-1).values.diff(dim=-1) != 0).all()
    valid = valid_key_centres(key.shape, 3, mask).flatten(1)
    assert valid.gather(1, nnf.indices.flatten(1)).all()


def test_the_compiled_loop_runs_on_the_cpu_only() -> None:
    with pytest.raises(ValueError, match="CPU"):
        attention._kernel(torch.device("cuda"), True)
    assert attention._kernel(torch.device("cuda"), None) is None
    assert attention._kernel(torch.device("cpu"), False) is None


@pytest.mark.parametrize("width", [40, 1000, 12345, 12288])
def test_grouped_top_k_selects_what_topk_selects(width: int) -> None:
    """`attention._smallest` (the k best through group minima) against torch's topk: the same
    scores chosen on rows with ties, masked (infinite) keys and a tail shorter than a group."""
    g = torch.Generator().manual_seed(width)
    scores = torch.randint(0, 50, (3, 40, width), generator=g).float()  # many ties
    scores[0, :, ::3] = math.inf
    scores[1, :5] = math.inf
    scores[1, :5, -2:] = -1.0  # the best at the very end of the row
    picked = attention._smallest(scores, 4)
    truth = scores.topk(4, -1, largest=False).values
    assert (picked.sort(-1).values.diff(dim=-1) != 0).all()  # four distinct keys per row
    assert torch.equal(scores.gather(-1, picked).sort(-1).values, truth.sort(-1).values)


def test_patchmatch_searches_the_query_mask_and_gives_the_others_a_placeholder(compiled: bool) -> None:
    """Queries in the mask get matches as close as an unmasked search finds; the others the
    exhaustive search's placeholder (the first valid key, at its true distance)."""
    query, key = NATURAL["conv C=16, two photos"]()
    wanted = torch.zeros(query.shape[0], *query.shape[-2:], dtype=torch.bool)
    wanted[:, 12:36, 8:56] = True
    key_mask = torch.zeros(key.shape[0], *key.shape[-2:], dtype=torch.bool)
    key_mask[:, :2] = True  # the first valid centre is masked: the placeholder is not key 0
    found = patchmatch(query, key, generator=seeded(), compiled=compiled, key_mask=key_mask, query_mask=wanted)
    exact = exact_knn(query, key, key_mask=key_mask, query_mask=wanted)
    inside = (slice(None), slice(12, 36), slice(8, 56))
    recall = (found.distances[inside][..., 0] <= exact.distances[inside][..., 0] * (1 + 1e-4) + 1e-6).float().mean()
    assert recall >= 0.6 and found.distances[inside].mean() <= 1.05 * exact.distances[inside].mean()
    assert torch.equal(found.indices[~wanted], exact.indices[~wanted])
    assert torch.allclose(found.distances[~wanted], exact.distances[~wanted], rtol=1e-5)


def test_psal_searches_the_queries_within_reach_of_its_query_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    """PatchMatch under `PSAL.search` gets the mask grown by the longest propagation jump
    (Chebyshev distance ≤ PROPAGATION_REACH), so matches found beside it still reach it."""
    seen = []
    search = attention.patchmatch
    monkeypatch.setattr(attention, "patchmatch", lambda *a, **kw: seen.append(kw["query_mask"]) or search(*a, **kw))
    monkeypatch.setattr(attention, "EXACT_PAIRS", 0)
    q = torch.randn(1, 4, 40, 50, generator=seeded())
    wanted = torch.zeros(1, 40, 50, dtype=torch.bool)
    wanted[0, 20, 10] = wanted[0, 3, 45] = True
    PSAL(patch_size=3, neighbors=2).search(q, q, query_mask=wanted, generator=seeded())
    y, x = torch.arange(40).view(-1, 1), torch.arange(50).view(1, -1)
    reach = attention.PROPAGATION_REACH
    near = lambda cy, cx: ((y - cy).abs() <= reach) & ((x - cx).abs() <= reach)
    assert torch.equal(seen[0][0], near(20, 10) | near(3, 45))


@pytest.mark.parametrize("aggregation", ["center", "patch"])
def test_attention_at_positions_equals_the_full_map_there(aggregation: str) -> None:
    g = seeded(3)
    psal = PSAL(patch_size=5, neighbors=2, aggregation=aggregation)
    v = torch.randn(2, 3, 30, 40, generator=g)
    indices = torch.randint(2, 28, (2, 20, 25, 2), generator=g) * 40 + torch.randint(2, 38, (2, 20, 25, 2), generator=g)
    distances = torch.rand(2, 20, 25, 2, generator=g)
    positions = torch.randperm(2 * 20 * 25, generator=g)[:300]
    with torch.no_grad():
        full = psal.attend(None, None, v, indices, distances)
        part = psal.attend(None, None, v, indices, distances, positions=positions)
    assert torch.allclose(part, full.permute(0, 2, 3, 1).reshape(-1, 3)[positions], atol=1e-6)
