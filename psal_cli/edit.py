"""The three edits on Pillow images: what the CLI runs per file, callable from Python.

Each function takes and returns `PIL.Image` (as read by `imageio.read_image`) and does
the pre- and post-processing every network shares: alpha is split off and put back
(resized alongside for `upscale`), gray images go through the network as RGB and come
back gray, 16-bit stays 16-bit, ICC profile and EXIF are carried over.

    >>> from psal_cli import edit, imageio, modelfile
    >>> model, _ = modelfile.load_model("weights/upscale-x4.safetensors")
    >>> big = edit.upscale(model, imageio.read_image("examples/chelsea.png"))
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from psal_cli.color import rgb_to_luma
from psal_cli.degradations import noise_level
from psal_cli.engine import OnTile, Options, check_memory, run_network
from psal_cli.imageio import from_tensor, is_gray, to_rgb, to_tensor

log = logging.getLogger("psal")
_LARGEST_MINIMUM = 1 << 12  # a bound on the search for a network's smallest square input


def check_size(model: nn.Module, image: Image.Image, input_name: str = "image", what: str = "image") -> None:
    """A clear error for an input smaller than the network handles, before it fails inside.

    The network says which sizes it handles (`accepts_size`, see networks.stages); the
    message names the smallest square one. `input_name` is its name in the network's `run`.
    """
    accepts = getattr(model, "accepts_size", None)
    w, h = image.size
    if accepts is None or accepts(input_name, h, w):
        return
    side = next((n for n in range(1, _LARGEST_MINIMUM) if accepts(input_name, n, n)), _LARGEST_MINIMUM)
    raise ValueError(f"{what} too small ({w}×{h} px): {model.architecture} needs at least {side}×{side}")


# An edit's peak memory beyond the loaded network, in bytes per input pixel, from the peak
# resident memory of whole commands at 1, 4 and 12 MP (benchmarks/speed.py: reading, the
# network's full-resolution maps and search tables, writing), with a margin for
# photo-to-photo variation. Upscaling grows with the output: a + b·scale². Inpainting adds
# its network's fill at the working size, up to work_pixels (a narrow hole on a 1 MP photo
# is filled at native size).
_MARGIN = 1.3


def memory_needed(model: nn.Module, image: Image.Image, reference: Image.Image | None = None) -> int:
    """Bytes an edit of `image` (with `reference`, for colorize) needs beyond the loaded model."""
    pixels = image.width * image.height
    task = getattr(model, "task", None)
    if task == "upscale":
        need = (400 + 40 * model.config.scale**2) * pixels
    elif task == "colorize":
        need = 250 * pixels + 250 * (reference.width * reference.height if reference else 0)
    else:
        need = 300 * pixels + 400 * min(pixels, getattr(model.config, "work_pixels", 0))
    return int(_MARGIN * need)


def ensure_memory(model: nn.Module, image: Image.Image, reference: Image.Image | None = None) -> None:
    """engine.NotEnoughMemory (a ValueError: one line) before an edit that would not fit in memory."""
    check_memory(memory_needed(model, image, reference), f"{image.width}×{image.height} px")


def upscale(model: nn.Module, image: Image.Image, options: Options | None = None,
            on_tile: OnTile | None = None) -> Image.Image:
    """Enlarge by the model's scale; alpha is resized bicubically to the same size."""
    check_size(model, image)
    ensure_memory(model, image)
    color, alpha = to_tensor(image)
    out = run_network(model, {"image": to_rgb(color)}, options or Options(), on_tile)
    if is_gray(image):
        out = rgb_to_luma(out)
    if alpha is not None:
        alpha = F.interpolate(alpha, size=out.shape[-2:], mode="bicubic", align_corners=False)
    return from_tensor(out, alpha, like=image)


# Noise σ (0–255 levels of luminance, degradations.noise_level) from which an input counts as
# noisy: colour noise of about 3 levels per channel, where clean photos read 0.1–2.
NOISY = 2.0


def upscaler_for(image: Image.Image) -> tuple[str, str]:
    """Which family of upscalers suits `image` (modelfile.UPSCALE_FAMILIES), and why in words:
    `real` for a JPEG or a visibly noisy input, `bicubic` (sharper on clean inputs) otherwise."""
    if image.format in ("JPEG", "MPO"):
        return "real", "a JPEG input"
    sigma = noise_level(image)
    if sigma >= NOISY:
        return "real", f"visible noise or fine texture, σ ≈ {sigma:.1f} levels"
    return "bicubic", f"a clean input: not JPEG, noise σ ≈ {sigma:.1f} levels"


def colorize(model: nn.Module, image: Image.Image, reference: Image.Image,
             options: Options | None = None, on_tile: OnTile | None = None) -> Image.Image:
    """Colour a gray image after a colour reference; a colour input is reduced to luminance first."""
    check_size(model, image, "gray")
    check_size(model, reference, "reference", "reference")
    ensure_memory(model, image, reference)
    color, alpha = to_tensor(image)
    gray = color if color.shape[1] == 1 else rgb_to_luma(color)
    ref = to_rgb(to_tensor(reference)[0])
    out = run_network(model, {"gray": gray, "reference": ref}, options or Options(), on_tile)
    return from_tensor(out, alpha, like=image)


def hole_mask(image: Image.Image, mask: Image.Image | None = None, *, invert: bool = False,
              from_alpha: bool = False, dilate: int = 0) -> Tensor:
    """The hole as a (1, 1, H, W) float tensor, 1 = hole.

    From `mask` (any non-zero pixel is a hole; resized nearest if its size differs, with a
    warning) or, with `from_alpha`, from the image's transparency (any alpha below opaque).
    `invert` swaps hole and known; `dilate` grows the hole by that many pixels.
    """
    if from_alpha:
        alpha = to_tensor(image)[1]
        if alpha is None:
            raise ValueError("the image has no alpha channel to take the hole from")
        hole = alpha < 1
    else:
        if mask is None:
            raise ValueError("no mask given")
        if mask.size != image.size:
            log.warning("mask is %dx%d, the image %dx%d: mask resized (nearest)",
                        *mask.size, *image.size)
            mask = mask.resize(image.size, Image.Resampling.NEAREST)
        m = to_tensor(mask)[0]
        hole = (m > 0).any(1, keepdim=True)
    if invert:
        hole = ~hole
    hole = hole.float()
    if dilate > 0:
        hole = F.max_pool2d(hole, 2 * dilate + 1, stride=1, padding=dilate)
    return hole


def inpaint(model: nn.Module, image: Image.Image, hole: Tensor, options: Options | None = None,
            on_tile: OnTile | None = None) -> Image.Image:
    """Fill the hole (see `hole_mask`); known pixels are kept exactly.

    An empty hole returns the image unchanged (with a warning); a hole covering every
    pixel is an error, since there is nothing to fill it from.
    """
    check_size(model, image)
    ensure_memory(model, image)
    color, alpha = to_tensor(image)
    if hole.shape[-2:] != color.shape[-2:]:
        raise ValueError(f"hole is {hole.shape[-1]}x{hole.shape[-2]}, the image {image.width}x{image.height}")
    if not hole.any():
        log.warning("the mask is empty: nothing to inpaint, output = input")
        return from_tensor(color, alpha, like=image)
    if hole.all():
        raise ValueError("the mask covers the whole image: nothing to inpaint from")
    rgb = to_rgb(color)
    out = run_network(model, {"image": rgb * (1 - hole), "mask": hole}, options or Options(), on_tile)
    filled = hole.bool()
    out = torch.where(filled, out.float().cpu(), rgb)
    if is_gray(image):
        out = torch.where(filled, rgb_to_luma(out), color)
    if alpha is not None:
        alpha = torch.where(filled, 1.0, alpha)  # filled pixels are opaque
    return from_tensor(out, alpha, like=image)


# -- the edits as a batch's per-file step ----------------------------------------------------
# `(item, image) -> image` callables, which run_batch (psal_cli.batch) and the Ray actors
# (psal_cli.ray) call for each file. Plain data (a model, options, companions): they
# pickle, so a Ray driver can hand one, model inside, to every worker.


class Companions(Protocol):
    """The mask or reference of each batch item (psal_cli.batch.Companions)."""

    def for_item(self, item: Any) -> Image.Image: ...


@dataclass
class Upscaler:
    """`model` enlarges every input; with `real` too (a network trained for real photos), each
    input gets the one `upscaler_for` chooses, and a line names it (`names`) and says why."""

    model: nn.Module
    options: Options
    on_tile: OnTile | None = None
    real: nn.Module | None = None
    names: tuple[str, str] = ("clean network", "real network")  # of `model` and `real`

    def __call__(self, item: Any, image: Image.Image) -> Image.Image:
        if self.real is None:
            return upscale(self.model, image, self.options, self.on_tile)
        family, why = upscaler_for(image)
        real = family == "real"
        log.info("%s (%s)", self.names[real], why)
        return upscale(self.real if real else self.model, image, self.options, self.on_tile)


@dataclass
class Colorizer:
    model: nn.Module
    options: Options
    references: Companions
    on_tile: OnTile | None = None

    def __call__(self, item: Any, image: Image.Image) -> Image.Image:
        return colorize(self.model, image, self.references.for_item(item), self.options, self.on_tile)


@dataclass
class Inpainter:
    model: nn.Module
    options: Options
    masks: Companions | None  # None: the hole is the image's transparency
    invert: bool = False
    dilate: int = 0
    on_tile: OnTile | None = None

    def __call__(self, item: Any, image: Image.Image) -> Image.Image:
        from_alpha = self.masks is None
        ensure_memory(self.model, image)  # before the full-size mask is built
        try:
            hole = hole_mask(image, None if from_alpha else self.masks.for_item(item), invert=self.invert,
                             from_alpha=from_alpha, dilate=self.dilate)
        except ValueError as e:
            if from_alpha:  # the library's message, with the option it comes from
                raise ValueError(f"--mask-from-alpha: {e}") from None
            raise
        return inpaint(self.model, image, hole, self.options, self.on_tile)
