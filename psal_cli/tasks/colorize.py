"""Guided colorization: training pairs, loss, training entry point and the BSD100 evaluation.

Training pairs come from single photos: the target is a square crop, the reference another
crop of the same photo that partly overlaps it, seen at another scale, slightly rotated and
possibly mirrored, so the network learns to find the target's content in a reference framed
differently and to colour what the reference does not show. The loss is L1 on CbCr.

Evaluation follows shared/data/README.md: target = left 70 % of the width, reference = right
70 % (plain, and flipped horizontally); the method sees the target as an 8-bit gray image
(Pillow "L") and the colour reference. RGB PSNR of the 8-bit result and the mean absolute
error of CIELAB a, b against the true target, for the network and, in the same run, for two
baselines: Reinhard et al. 2001 colour transfer (Lab statistics) and the colour of the
exhaustive nearest 5×5 luminance patch of the reference.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from psal_cli.attention import exact_knn
from psal_cli.color import lab_to_rgb, rgb_to_lab, rgb_to_ycbcr, ycbcr_to_rgb
from psal_cli.engine import autocast, network_precision
from psal_cli.metrics import psnr, to_uint8_levels
from psal_cli.networks.colorize import PSALColorize, quantize8
from psal_cli.networks.stages import Direct
from psal_cli.tasks.common import Report, model_to_evaluate, resume
from psal_cli.training import TrainOptions, data_description, fit, image_files, load_photos

log = logging.getLogger("psal")

CROP = 0.7  # target and reference each take 70 % of the width


# -- training ------------------------------------------------------------------------------

def _reference_view(photo: Tensor, centre: tuple[float, float], size: int, scale: float, angle: float,
                    mirror: bool) -> Tensor:
    """A size×size view of `photo` (3, H, W float) around `centre` (y, x) in photo pixels:
    `scale` photo pixels per output pixel, rotated by `angle` radians, optionally mirrored."""
    _, H, W = photo.shape
    o = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    oy, ox = torch.meshgrid(o, o, indexing="ij")  # (size, size)
    if mirror:
        ox = -ox
    cos, sin = math.cos(angle) * scale, math.sin(angle) * scale
    x = centre[1] + cos * ox - sin * oy
    y = centre[0] + sin * ox + cos * oy
    grid = torch.stack([x / (W - 1) * 2 - 1, y / (H - 1) * 2 - 1], -1)[None]  # (1, size, size, 2)
    return F.grid_sample(photo[None], grid, mode="bilinear", align_corners=True)[0]


def sample_pair(photo: Tensor, size: int, rng: random.Random) -> tuple[Tensor, Tensor]:
    """(target, reference) RGB crops in [0, 1], each (3, size, size), from one uint8 photo.

    The reference overlaps the target by a random amount (from nearly all to nothing),
    at a scale of 0.75–1.33×, rotated by up to ±10° half of the time, mirrored half of the time.
    """
    rgb = photo.float() / 255
    _, H, W = rgb.shape
    size = min(size, H, W)
    ty, tx = rng.randrange(H - size + 1), rng.randrange(W - size + 1)
    target = rgb[:, ty : ty + size, tx : tx + size]
    scale = math.exp(rng.uniform(math.log(0.75), math.log(4 / 3)))
    angle = math.radians(rng.uniform(-10, 10)) if rng.random() < 0.5 else 0.0
    half = scale * size / 2 * (abs(math.cos(angle)) + abs(math.sin(angle)))  # half-extent in the photo
    half = min(half, (H - 1) / 2, (W - 1) / 2)
    shift = lambda: rng.choice((-1, 1)) * rng.uniform(0, 0.8) * size
    cy = min(max(ty + (size - 1) / 2 + shift(), half), H - 1 - half)
    cx = min(max(tx + (size - 1) / 2 + shift(), half), W - 1 - half)
    reference = _reference_view(rgb, (cy, cx), size, scale, angle, rng.random() < 0.5)
    return target, quantize8(reference.clamp(0, 1))


def make_sampler(photos: list[Tensor], batch: int, size: int) -> Callable[[random.Random], dict[str, Tensor]]:
    """Batches for `training.fit`: gray (B,1,s,s) 8-bit levels, reference (B,3,s,s), target CbCr − 0.5."""

    def sample(rng: random.Random) -> dict[str, Tensor]:
        targets, references = zip(*(sample_pair(photos[rng.randrange(len(photos))], size, rng) for _ in range(batch)))
        ycc = rgb_to_ycbcr(torch.stack(targets))  # (B, 3, s, s)
        return {"gray": quantize8(ycc[:, :1]), "reference": torch.stack(references), "target": ycc[:, 1:] - 0.5}

    return sample


def chroma_l1(model: PSALColorize, batch: dict[str, Tensor]) -> Tensor:
    """L1 on CbCr before gamut clipping (clipping would stop the gradient of saturated pixels)."""
    return (model.predict_chroma(Direct(), batch["gray"], batch["reference"]) - batch["target"]).abs().mean()


def train(
    data: Path,
    out: Path,
    *,
    init: Path | None = None,
    steps: int = 4000,
    batch: int = 8,
    patch: int = 64,
    lr: float = 1e-3,
    device: str = "cpu",
    seed: int = 0,
    limit: int | None = None,
    minutes: float | None = None,
) -> Path:
    """Train (or, with `init`, resume) a colorization network on the photos in `data`.

    `patch` is the side of the target and reference crops; `limit` uses only the first
    photos (quick runs). A resumed run keeps the init file's config and step count.
    Checkpoints go to `out` every 250 steps; returns `out`.
    """
    earlier = {}
    if init is not None:
        model, done, earlier = resume(init, "colorize")
    else:
        torch.manual_seed(seed)
        model, done = PSALColorize(PSALColorize.Config()), 0
    photos = load_photos(Path(data), limit)
    options = TrainOptions(steps=steps, batch=batch, patch=patch, lr=lr, seed=seed, device=device, minutes=minutes)
    log.info(f"colorize: {sum(p.numel() for p in model.parameters())} parameters, {len(photos)} photos, "
        f"from step {done}: {options.summary}")
    meta = {**earlier, "data": data_description(data, len(photos), limit), "init": str(init or "")}
    fit(model, make_sampler(photos, batch, patch), chroma_l1, options, Path(out),
        training_meta=meta, done_steps=done)
    return Path(out)


# -- evaluation ----------------------------------------------------------------------------

def reinhard(gray: Tensor, reference: Tensor) -> Tensor:
    """Reinhard et al. 2001 colour transfer to a gray target: match Lab means and deviations.

    A gray target has a = b = 0 with zero deviation, so it receives the reference's mean a, b;
    its own L is kept (matching L statistics would change the luminance we must preserve).
    """
    lab = rgb_to_lab(gray.expand(-1, 3, -1, -1))
    ab = rgb_to_lab(reference)[:, 1:].mean((2, 3), keepdim=True)  # (B, 2, 1, 1)
    return lab_to_rgb(torch.cat([lab[:, :1], ab.expand_as(lab[:, 1:])], 1)).clamp(0, 1)


def nearest_patch(gray: Tensor, reference: Tensor, patch_size: int = 5) -> Tensor:
    """Copy the CbCr of the centre of the exhaustive nearest luminance patch, keep the target Y."""
    ycc = rgb_to_ycbcr(reference)
    nnf = exact_knn(quantize8(gray), quantize8(ycc[:, :1]), patch_size=patch_size, neighbors=1, prune=True)
    B = reference.shape[0]
    chroma = ycc[:, 1:].flatten(2)  # (B, 2, Hr·Wr)
    index = nnf.indices.view(B, 1, -1).expand(-1, 2, -1)  # (B, 2, H·W)
    copied = chroma.gather(2, index).view(B, 2, *gray.shape[-2:])
    return ycbcr_to_rgb(torch.cat([gray, copied], 1)).clamp(0, 1)


def scores(out: Tensor, truth: Tensor, gray: Tensor) -> dict[str, float]:
    """RGB PSNR (dB) and Lab a, b MAE of the 8-bit output; y_err = mean |ΔY| in 8-bit levels."""
    out = to_uint8_levels(out)
    ab = (rgb_to_lab(out.double())[:, 1:] - rgb_to_lab(truth.double())[:, 1:]).abs().mean().item()
    y_err = ((rgb_to_ycbcr(out.double())[:, :1] - gray.double()).abs().mean() * 255).item()
    return {"psnr": psnr(out, truth), "ab_mae": ab, "y_err": y_err}


def load_view(path: Path, size: int | None) -> Tensor:
    """A photo as (1, 3, H, W) float in [0, 1], longest side resized to `size` (bicubic) if given."""
    img = Image.open(path).convert("RGB")
    if size and max(img.size) != size:
        s = size / max(img.size)
        img = img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))), Image.BICUBIC)
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float() / 255


def split(photo: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(true target RGB, its Pillow "L" gray, reference RGB): left and right 70 % of the width."""
    W = photo.shape[-1]
    w = round(CROP * W)
    target, reference = photo[..., :w], photo[..., W - w :]
    rgb8 = (target[0] * 255).round().byte().permute(1, 2, 0).numpy()
    gray = torch.from_numpy(np.array(Image.fromarray(rgb8).convert("L")))[None, None].float() / 255
    return target, gray, reference


def evaluate(
    data: Path,
    model: Path | nn.Module | None = None,
    *,
    limit: int | None = None,
    size: int | None = 320,
    nearest: bool = True,
    device: str = "cpu",
    seed: int = 0,
    precision: str = "fp32",
) -> dict:
    """The guided-colorization protocol on the photos of `data` (BSD100: shared/data/val).

    `size` resizes every photo so its longest side is that many pixels first (None: full
    size); `limit` takes the first photos only; `nearest` also runs the exhaustive
    nearest-patch baseline (O(N²), pruned: a few seconds per 320-px image). `model` is a model
    file, a loaded network, or None for the installed default; `precision` is the network's
    (`engine.Options.precision`), not the baselines'. The report's mean and baselines hold {"plain": {psnr, ab_mae, y_err, seconds}, "flipped": {...}}.
    """
    model, name = model_to_evaluate(model, "colorize", device)
    dev = torch.device(device)
    files, start = image_files(data, limit), time.time()

    def psal(gray: Tensor, reference: Tensor) -> Tensor:
        with autocast(dev, network_precision(model, precision)):
            out = model.run(Direct(torch.Generator().manual_seed(seed)), gray=gray.to(dev), reference=reference.to(dev))
        return out.cpu()

    methods: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
        "psal": psal,
        "reinhard": reinhard,
    }
    if nearest:
        methods["nearest"] = nearest_patch
    rows = []
    for i, path in enumerate(files):
        target, gray, reference = split(load_view(path, size))
        row: dict = {"image": path.stem, "size": list(target.shape[-2:])}
        for variant, ref in (("plain", reference), ("flipped", reference.flip(-1))):
            row[variant] = {}
            for name, method in methods.items():
                start = time.time()
                with torch.no_grad():
                    out = method(gray, ref)
                row[variant][name] = {**scores(out, target, gray), "seconds": time.time() - start}
        rows.append(row)
        log.info(f"[{i + 1}/{len(files)}] {path.stem}: " + "  ".join(
                f"{v} " + " ".join(f"{n} {row[v][n]['psnr']:.2f}/{row[v][n]['ab_mae']:.2f}" for n in methods)
                for v in ("plain", "flipped")))

    def mean(name: str) -> dict[str, dict[str, float]]:
        return {v: {m: float(np.mean([r[v][name][m] for r in rows])) for m in ("psnr", "ab_mae", "y_err", "seconds")}
                for v in ("plain", "flipped")}

    return Report(task="colorize", data=str(data), model=name, settings={"size": size, "seed": seed}, images=rows,
                  mean=mean("psal"), baselines={m: mean(m) for m in methods if m != "psal"},
                  seconds=time.time() - start)


def format_report(report: Report) -> str:
    """A readable table: PSNR (dB) / a,b MAE per method and reference variant, then y_err and time."""
    size = f"longest side {report.settings['size']} px" if report.settings["size"] else "full size"
    lines = [f"guided colorization, {len(report.images)} images, {size} (PSNR dB / Lab a,b MAE; higher / lower is better)",
             f"{'method':<10} {'plain':>15} {'flipped':>15} {'|dY|':>8} {'s/image':>8}"]
    for name, m in {"psal": report.mean, **report.baselines}.items():
        cells = [f"{m[v]['psnr']:6.2f} / {m[v]['ab_mae']:5.2f}" for v in ("plain", "flipped")]
        lines.append(f"{name:<10} {cells[0]:>15} {cells[1]:>15} {max(m['plain']['y_err'], m['flipped']['y_err']):8.2f} "
                     f"{m['plain']['seconds'] + m['flipped']['seconds']:8.2f}")
    return "\n".join(lines)


def metrics_for_file(report: Report) -> dict[str, float]:
    """Flat figures for the model file's metadata (what `psal models` shows)."""
    tag = f"bsd100_{report.settings['size'] or 'full'}"
    flat = {}
    for name, m in {"psal": report.mean, **report.baselines}.items():
        for v in ("plain", "flipped"):
            prefix = tag if name == "psal" else f"{tag}_{name}"
            flat[f"{prefix}_{v}_psnr"] = round(m[v]["psnr"], 3)
            flat[f"{prefix}_{v}_ab_mae"] = round(m[v]["ab_mae"], 3)
    return flat
