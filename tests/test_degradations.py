"""Camera-like degradations: seeded draws inside their ranges, and each step doing what it says."""

from __future__ import annotations

import io
import math
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from psal_cli import degradations as d
from psal_cli.blur import gaussian_kernel

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def photo(size: tuple[int, int] = (96, 64)) -> Image.Image:
    return Image.open(EXAMPLES / "chelsea.png").convert("RGB").crop((0, 0, *size))


def test_a_seed_reproduces_a_draw_and_its_image() -> None:
    hr = photo()
    first, again = d.draw(random.Random(7), d.WIDE), d.draw(random.Random(7), d.WIDE)
    assert first == again and first != d.draw(random.Random(8), d.WIDE)
    assert np.array_equal(np.asarray(d.apply(hr, 4, first)), np.asarray(d.apply(hr, 4, again)))
    lr, recipe = d.camera(hr, 4, 3, "cat")
    lr_again, recipe_again = d.camera(hr, 4, 3, "cat")
    assert recipe == recipe_again and np.array_equal(np.asarray(lr), np.asarray(lr_again))
    # A photo's own draw: another seed or another name is another degradation.
    assert d.camera(hr, 4, 4, "cat")[1] != recipe and d.camera(hr, 4, 3, "dog")[1] != recipe
    assert lr.size == (24, 16)


def test_the_evaluation_draws_stay_in_the_camera_ranges_and_cover_them() -> None:
    recipes = [d.draw(random.Random(i), d.CAMERA) for i in range(400)]
    sigmas = [r.first.blur[0] for r in recipes]
    assert all(r.first.blur[0] == r.first.blur[1] for r in recipes)  # isotropic
    assert 0.3 <= min(sigmas) < 0.4 and 1.9 < max(sigmas) <= 2.0
    assert {r.filter for r in recipes} == {"bicubic", "bilinear", "box"}
    noise = [r.first.noise for r in recipes]
    assert 0 <= min(noise) < 0.5 and 7.5 < max(noise) <= 8
    quality = [r.first.quality for r in recipes]
    assert min(quality) == 40 and max(quality) == 90
    assert all(r.second is None and r.first.poisson == 0 and not r.first.gray for r in recipes)


def test_wide_draws_cover_the_evaluation_and_more() -> None:
    recipes = [d.draw(random.Random(i), d.WIDE) for i in range(1000)]
    clean = [r for r in recipes if r == d.Recipe("bicubic", d.Pass(), None, 0)]
    assert 60 < len(clean) < 140  # WIDE.clean = 0.1
    blurs = [r.first.blur for r in recipes if r.first.blur]
    assert min(min(b[:2]) for b in blurs) < d.CAMERA.blur_sigma[0] and max(max(b[:2]) for b in blurs) > d.CAMERA.blur_sigma[1]
    assert any(b[0] != b[1] for b in blurs) and all(0 <= b[2] < math.pi for b in blurs)
    quality = [r.first.quality for r in recipes if r.first.quality]
    assert min(quality) < 40 and max(quality) > 90
    assert any(r.first.poisson for r in recipes) and any(r.first.gray for r in recipes)
    assert 120 < sum(r.second is not None for r in recipes) < 260  # WIDE.second = 0.2 of the 0.9 not clean
    assert max(r.first.noise for r in recipes) <= d.WIDE.noise_sigma[1]


def test_training_picks_each_range_of_its_mixture_by_its_probability() -> None:
    mixture = ((0.2, d.CAMERA), (0.5, d.WIDE), (0.3, d.Ranges(clean=1.0)))
    picks = [d.pick(random.Random(i), mixture) for i in range(2000)]
    shares = [sum(p is ranges for p in picks) / len(picks) for _, ranges in mixture]
    assert shares == pytest.approx([0.2, 0.5, 0.3], abs=0.04)
    # Training's draw is the pick, then a draw of the picked ranges, from the same generator.
    hr = Image.open(EXAMPLES / "coffee.png").convert("RGB").crop((0, 0, 64, 48))
    rng = random.Random(7)
    expected = d.apply(hr, 4, d.draw(rng, d.pick(rng, d.TRAINING)))
    assert np.array_equal(np.asarray(d.degrade_for_training(hr, 4, random.Random(7))), np.asarray(expected))
    assert sum(p for p, _ in d.TRAINING) == pytest.approx(1.0)
    draws = [d.draw(rng, d.pick(rng, d.TRAINING)) for rng in map(random.Random, range(2000))]
    assert sum(r == d.Recipe("bicubic", d.Pass(), None, 0) for r in draws) / len(draws) == pytest.approx(0.2, abs=0.03)
    with pytest.raises(ValueError, match="sum to 1"):
        d.pick(random.Random(0), ((0.5, d.CAMERA), (0.3, d.WIDE)))


def test_a_mixture_of_one_draws_as_its_ranges_alone() -> None:
    """Runs made before the mixture drew from WIDE directly: a mixture of WIDE alone replays them."""
    for seed in range(20):
        alone, mixed = random.Random(seed), random.Random(seed)
        assert d.draw(mixed, d.pick(mixed, ((1.0, d.WIDE),))) == d.draw(alone, d.WIDE)
        assert mixed.random() == alone.random()


@pytest.mark.parametrize("sigmas", [(1.5, 1.5, 0.0), (2.0, 0.8, 0.6)])
def test_gaussian_kernel_has_the_covariance_asked_for(sigmas: tuple[float, float, float]) -> None:
    k = gaussian_kernel(*sigmas).double()
    assert k.sum().item() == pytest.approx(1, abs=1e-6)
    r = torch.arange(k.shape[0], dtype=torch.float64) - k.shape[0] // 2
    y, x = torch.meshgrid(r, r, indexing="ij")
    cov = [[(k * x * x).sum(), (k * x * y).sum()], [(k * x * y).sum(), (k * y * y).sum()]]
    sx, sy, theta = sigmas
    c, s = math.cos(theta), math.sin(theta)
    # Σ = R diag(σx², σy²) Rᵀ for axes turned by θ (truncation at 3σ loses ~3 % of the variance).
    want = [[c * c * sx**2 + s * s * sy**2, c * s * (sx**2 - sy**2)], [c * s * (sx**2 - sy**2), s * s * sx**2 + c * c * sy**2]]
    for i in range(2):
        for j in range(2):
            assert cov[i][j].item() == pytest.approx(want[i][j], abs=0.05 * sx**2)


def test_blur_is_a_convolution_with_reflected_edges() -> None:
    hr = photo((50, 37))
    k = gaussian_kernel(1.8, 0.9, 0.7)
    x = torch.from_numpy(np.asarray(hr, dtype=np.float32)).permute(2, 0, 1)[:, None]
    r = k.shape[0] // 2
    direct = F.conv2d(F.pad(x, (r, r, r, r), mode="reflect"), k[None, None])[:, 0].permute(1, 2, 0)
    got = torch.from_numpy(np.asarray(d.blur(hr, k), dtype=np.float32))
    assert (got - direct).abs().max() <= 0.5 + 1e-3  # the same up to rounding to 8 bits


def test_noise_has_the_asked_deviation_and_gray_noise_is_one_for_all_channels() -> None:
    gray = Image.new("RGB", (200, 200), (128, 128, 128))
    noisy = np.asarray(d.add_noise(gray, torch.Generator().manual_seed(0), sigma=6.0), dtype=np.float64)
    assert noisy.std() == pytest.approx(6.0, rel=0.05)
    assert not np.array_equal(noisy[..., 0], noisy[..., 1])
    one = np.asarray(d.add_noise(gray, torch.Generator().manual_seed(0), sigma=6.0, gray=True))
    assert np.array_equal(one[..., 0], one[..., 1]) and np.array_equal(one[..., 1], one[..., 2])
    # Poisson (shot) noise: the variance grows with the level (256 photons per unit, scaled).
    dark, bright = (Image.new("RGB", (200, 200), (v, v, v)) for v in (32, 224))
    stds = [np.asarray(d.add_noise(im, torch.Generator().manual_seed(1), poisson=1.0), dtype=np.float64).std()
            for im in (dark, bright)]
    for std, level in zip(stds, (32, 224)):
        assert std == pytest.approx(math.sqrt(level / 255 * 256) / 256 * 255, rel=0.1)


def test_jpeg_is_really_applied_after_the_filter() -> None:
    hr = photo()
    recipe = d.Recipe("box", d.Pass(quality=45), None, 0)
    buffer = io.BytesIO()
    hr.resize((24, 16), Image.Resampling.BOX).save(buffer, format="JPEG", quality=45)
    by_hand = np.asarray(Image.open(buffer).convert("RGB"))
    got = np.asarray(d.apply(hr, 4, recipe))
    assert np.array_equal(got, by_hand)
    plain = np.asarray(d.apply(hr, 4, replace(recipe, first=d.Pass())))
    assert np.array_equal(plain, np.asarray(hr.resize((24, 16), Image.Resampling.BOX)))
    assert not np.array_equal(got, plain)


def test_a_clean_draw_is_the_benchmark_protocol() -> None:
    hr = photo()
    clean = d.Recipe("bicubic", d.Pass(), None, 0)
    assert np.array_equal(np.asarray(d.apply(hr, 2, clean)), np.asarray(hr.resize((48, 32), Image.Resampling.BICUBIC)))


def test_the_second_pass_degrades_further() -> None:
    hr = photo()
    first = d.Pass(blur=(1.0, 1.0, 0.0), quality=80)
    once = d.Recipe("bilinear", first, None, 5)
    twice = replace(once, second=d.Pass(blur=(1.0, 1.0, 0.0), noise=3.0, quality=50))
    clean = np.asarray(hr.resize((24, 16), Image.Resampling.BILINEAR), dtype=np.float64)
    error = [np.abs(np.asarray(d.apply(hr, 4, r), dtype=np.float64) - clean).mean() for r in (once, twice)]
    assert error[1] > error[0] > 0


def test_ranges_are_recorded_as_json() -> None:
    import json

    described = json.loads(json.dumps(d.WIDE.describe()))
    assert described["jpeg_quality"] == list(d.WIDE.jpeg_quality) and described["clean"] == d.WIDE.clean
    mixture = json.loads(json.dumps(d.describe_mixture(d.TRAINING)))
    assert [(m["probability"], m["clean"]) for m in mixture] == [(p, r.clean) for p, r in d.TRAINING]


def test_noise_level_measures_added_noise_and_not_edges() -> None:
    y, x = np.mgrid[0:240, 0:320].astype(np.float64)
    smooth = 128 + 60 * np.sin(x / 11) * np.cos(y / 13) + 40 * (x > 160)  # gradients and a hard edge
    rng = np.random.default_rng(0)
    for sigma in (0.0, 2.0, 5.0, 10.0):
        noisy = Image.fromarray((smooth + rng.normal(0, sigma, smooth.shape)).round().clip(0, 255).astype(np.uint8))
        # The 10th percentile of block estimates sits a little below σ; rounding to 8 bits adds ~0.3.
        assert d.noise_level(noisy) == pytest.approx(sigma, abs=0.3 + 0.15 * sigma)
    assert d.noise_level(Image.new("RGB", (64, 64), (40, 50, 60))) == 0.0
    assert d.noise_level(Image.new("L", (10, 10))) == 0.0  # smaller than one block
