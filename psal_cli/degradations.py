"""Camera-like degradations of clean photos: what an upscaler for real photos learns to undo.

A clean high-resolution photo becomes a low-resolution one as a camera and the web make it:
blurred by the lens (a Gaussian kernel, isotropic or anisotropic, in HR pixels), reduced by
some resampling filter, noisy (Gaussian and Poisson, colour or gray, in LR pixels) and saved
as JPEG, possibly twice over (in the spirit of Real-ESRGAN's synthesis, without its
sinc filters). Every random choice comes from the `random.Random` given, so a seed
reproduces a degradation exactly.

`CAMERA` is the evaluation pipeline of `psal eval upscale --degradation real` (each photo its
own seeded draw); `TRAINING`, what `psal train upscale --degradation real` draws from, is a
mixture of ranges: the evaluation's own with a share of clean bicubic crops, and `WIDE`, wider
than the evaluation's on every axis. `draw` turns ranges into a `Recipe`; `apply` runs a recipe.

`noise_level` goes the other way: a cheap estimate of the noise in a photo, for choosing
the network trained on degraded photos (`psal upscale`).
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from PIL import Image

from psal_cli.blur import gaussian_kernel, kernel_blur

FILTERS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR, "box": Image.Resampling.BOX}


@dataclass(frozen=True)
class Ranges:
    """The distribution degradations are drawn from. Intervals are (low, high), uniform.

    Blur σ is in high-resolution pixels (the lens sees the scene before the sensor samples
    it); noise σ is in 0–255 levels of the low-resolution image. Probabilities are per draw.
    """

    clean: float = 0.0  # probability of the clean protocol instead (Pillow bicubic, nothing else)
    blur: float = 1.0  # probability of a first-pass blur
    blur_sigma: tuple[float, float] = (0.3, 2.0)
    anisotropic: float = 0.0  # probability that a blur has two σ and a random angle
    filters: tuple[str, ...] = tuple(FILTERS)  # down-sampling filter, one at random
    noise: float = 1.0  # probability of noise
    noise_sigma: tuple[float, float] = (0.0, 8.0)  # Gaussian noise σ, 0–255 levels
    poisson: float = 0.0  # probability that the noise is Poisson (shot noise) instead
    poisson_scale: tuple[float, float] = (0.05, 1.0)  # of Poisson noise at 256 photons per unit level
    gray_noise: float = 0.0  # probability that the noise is the same on the three channels
    jpeg: float = 1.0  # probability of JPEG compression
    jpeg_quality: tuple[int, int] = (40, 90)  # inclusive
    second: float = 0.0  # probability of a second pass (blur, noise, JPEG at the low resolution)
    second_blur_sigma: tuple[float, float] = (0.2, 1.0)  # in low-resolution pixels
    second_noise_sigma: tuple[float, float] = (0.0, 4.0)
    second_jpeg_quality: tuple[int, int] = (60, 95)

    def describe(self) -> dict:
        """The ranges as JSON-ready values (what a model file records)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


# The evaluation pipeline: blur σ 0.3–2.0 px, bicubic/bilinear/box, Gaussian noise σ 0–8, JPEG 40–90.
CAMERA = Ranges()

# Wider than CAMERA on every axis, so that the network meets each evaluation case inside its
# training distribution.
WIDE = Ranges(clean=0.1, blur=0.9, blur_sigma=(0.2, 2.6), anisotropic=0.4, noise=0.9,
              noise_sigma=(0.0, 10.0), poisson=0.25, poisson_scale=(0.05, 1.0), gray_noise=0.3,
              jpeg=0.9, jpeg_quality=(30, 95), second=0.2)

# (probability, ranges) pairs, one picked per draw. Half the draws from the photos' own ranges
# (CAMERA) spend a small network's capacity where photos are; their clean share keeps it
# nearer the bicubic network on clean inputs (docs/models/upscale-real.md).
Mixture = tuple[tuple[float, Ranges], ...]
TRAINING: Mixture = ((0.5, replace(CAMERA, clean=0.3)), (0.5, WIDE))


@dataclass(frozen=True)
class Pass:
    """One pass of a degradation. `blur` is (σx, σy, θ) or None; `noise` a Gaussian σ in
    levels, `poisson` a Poisson scale (0: none); `quality` a JPEG quality or None."""

    blur: tuple[float, float, float] | None = None
    noise: float = 0.0
    poisson: float = 0.0
    gray: bool = False
    quality: int | None = None


@dataclass(frozen=True)
class Recipe:
    """A drawn degradation: the first pass (blur at the high resolution, then `filter`), an
    optional second pass at the low resolution, and the seed of its noise."""

    filter: str
    first: Pass
    second: Pass | None
    noise_seed: int

    def describe(self) -> dict:
        return asdict(self)


def _uniform(rng: random.Random, interval: tuple[float, float]) -> float:
    return rng.uniform(*interval)


def _blur(rng: random.Random, interval: tuple[float, float], anisotropic: float) -> tuple[float, float, float]:
    if rng.random() < anisotropic:
        return _uniform(rng, interval), _uniform(rng, interval), rng.uniform(0, math.pi)
    sigma = _uniform(rng, interval)
    return sigma, sigma, 0.0


def _noise(rng: random.Random, ranges: Ranges, sigma: tuple[float, float]) -> dict:
    gray = rng.random() < ranges.gray_noise
    if rng.random() < ranges.poisson:
        return {"poisson": _uniform(rng, ranges.poisson_scale), "gray": gray}
    return {"noise": _uniform(rng, sigma), "gray": gray}


def draw(rng: random.Random, ranges: Ranges) -> Recipe:
    """A random degradation from `ranges` (every choice from `rng`)."""
    if rng.random() < ranges.clean:
        return Recipe("bicubic", Pass(), None, 0)
    blur = _blur(rng, ranges.blur_sigma, ranges.anisotropic) if rng.random() < ranges.blur else None
    filter_name = rng.choice(ranges.filters)
    noise = _noise(rng, ranges, ranges.noise_sigma) if rng.random() < ranges.noise else {}
    quality = rng.randint(*ranges.jpeg_quality) if rng.random() < ranges.jpeg else None
    first = Pass(blur=blur, quality=quality, **noise)
    second = None
    if rng.random() < ranges.second:
        second = Pass(blur=_blur(rng, ranges.second_blur_sigma, ranges.anisotropic),
                      quality=rng.randint(*ranges.second_jpeg_quality),
                      **_noise(rng, ranges, ranges.second_noise_sigma))
    return Recipe(filter_name, first, second, rng.getrandbits(63))


def pick(rng: random.Random, mixture: Mixture) -> Ranges:
    """One of a mixture's ranges, each with its probability: one number from `rng`, none for a
    mixture of one (so that `((1.0, WIDE),)` replays the draws of runs made before the mixture)."""
    if not math.isclose(whole := sum(p for p, _ in mixture), 1.0):
        raise ValueError(f"a mixture's probabilities sum to 1, not {whole:g}")
    if len(mixture) == 1:
        return mixture[0][1]
    probabilities, choices = zip(*mixture)
    return rng.choices(choices, probabilities)[0]


def describe_mixture(mixture: Mixture) -> list[dict]:
    """A mixture as JSON-ready values (what a model file records)."""
    return [{"probability": probability, **ranges.describe()} for probability, ranges in mixture]


def blur(image: Image.Image, kernel: torch.Tensor) -> Image.Image:
    """An RGB image convolved with `kernel` (`blur.gaussian_kernel`), edges reflected, rounded back to 8 bits."""
    return _to_image(kernel_blur(_to_tensor(image), kernel))


def add_noise(image: Image.Image, generator: torch.Generator, sigma: float = 0.0, poisson: float = 0.0,
              gray: bool = False) -> Image.Image:
    """Gaussian noise of σ `sigma` levels, or Poisson noise (256 photons per unit level, scaled by
    `poisson`); `gray` draws one noise for the three channels. Rounded back to 8 bits."""
    x = _to_tensor(image) / 255
    shape = (1, *x.shape[1:]) if gray else x.shape
    if poisson:
        base = x.mean(0, keepdim=True) if gray else x
        noise = (torch.poisson(base * 256, generator=generator) / 256 - base) * poisson
    else:
        noise = torch.randn(shape, generator=generator) * (sigma / 255)
    return _to_image((x + noise) * 255)


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    """The image saved as JPEG at `quality` (Pillow's default 4:2:0 chroma) and decoded again."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def _to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB image as a (3, H, W) float tensor of 0–255 levels."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)


def _to_image(x: torch.Tensor) -> Image.Image:
    """A (3, H, W) tensor of 0–255 levels as an RGB image, rounded to 8 bits."""
    return Image.fromarray(x.permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy())


def _noisy_jpeg(image: Image.Image, step: Pass, generator: torch.Generator) -> Image.Image:
    if step.noise or step.poisson:
        image = add_noise(image, generator, step.noise, step.poisson, step.gray)
    return jpeg(image, step.quality) if step.quality is not None else image


def apply(hr: Image.Image, scale: int, recipe: Recipe) -> Image.Image:
    """The low-resolution image a recipe makes of `hr` (RGB, sides multiples of `scale`)."""
    generator = torch.Generator().manual_seed(recipe.noise_seed)
    image = hr if recipe.first.blur is None else blur(hr, gaussian_kernel(*recipe.first.blur))
    image = image.resize((hr.width // scale, hr.height // scale), FILTERS[recipe.filter])
    image = _noisy_jpeg(image, recipe.first, generator)
    if recipe.second is not None:
        image = _noisy_jpeg(blur(image, gaussian_kernel(*recipe.second.blur)), recipe.second, generator)
    return image


def degrade_for_training(hr: Image.Image, scale: int, rng: random.Random) -> Image.Image:
    """Training's degradation of one HR crop: a `TRAINING` draw from `rng`, applied."""
    return apply(hr, scale, draw(rng, pick(rng, TRAINING)))


def camera(hr: Image.Image, scale: int, seed: int, name: str) -> tuple[Image.Image, Recipe]:
    """The evaluation pipeline (`CAMERA`) on photo `name`: its own draw, seeded by (seed, name),
    so that a photo degrades the same whichever others are measured with it."""
    recipe = draw(random.Random(f"camera:{seed}:{name}"), CAMERA)
    return apply(hr, scale, recipe), recipe


# Immerkær's mask: it cancels any locally linear image, and white noise of σ gives 6σ (√36) out.
_NOISE_MASK = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], dtype=np.float64)
_NOISE_BLOCK = 16


def noise_level(image: Image.Image) -> float:
    """The standard deviation of the noise in the image's luminance, in 0–255 levels (estimated).

    Immerkær's estimate (the mean absolute response to a Laplacian-difference mask, times
    √(π/2)/6) on 16×16 blocks, of which the 10th percentile is kept: noise is everywhere, so
    the flattest blocks measure it while edges and textures are left out (blocks with no
    response at all, clipped or synthetic, too). Colour noise of σ per channel reads about
    0.67σ in luminance; fine texture that covers a whole photo (grass) reads as some noise.
    """
    levels = 255 / 65535 if image.mode == "I;16" else 1.0
    y = np.asarray(image if image.mode in ("L", "I;16") else image.convert("L"), dtype=np.float64) * levels
    h, w = y.shape
    response = np.abs(sum(_NOISE_MASK[i, j] * y[i: h - 2 + i, j: w - 2 + j] for i in range(3) for j in range(3)))
    rows, cols = (response.shape[0] // _NOISE_BLOCK) * _NOISE_BLOCK, (response.shape[1] // _NOISE_BLOCK) * _NOISE_BLOCK
    if not rows or not cols:
        return 0.0
    blocks = response[:rows, :cols].reshape(rows // _NOISE_BLOCK, _NOISE_BLOCK, cols // _NOISE_BLOCK, _NOISE_BLOCK)
    means = blocks.mean((1, 3)).ravel()
    means = means[means > 0]
    return float(math.sqrt(math.pi / 2) / 6 * np.percentile(means, 10)) if len(means) else 0.0
