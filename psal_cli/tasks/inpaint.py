"""Inpainting: seeded hole masks, training batches, loss, `train` and the benchmark `evaluate`.

Masks follow the protocol of shared/data/README.md: `thin` free-form strokes covering
5–15 % of the pixels, `thick` strokes 25–40 %, `box` one rectangle of 20–30 % of the area.
Evaluation masks are a pure function of (seed, family, image index), so every method and
every run sees the same holes; training draws from the same generator with its own
random state, so the network practises exactly the kinds of holes it is judged on.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import Tensor, nn

from psal_cli.choices import MASK_FAMILIES as FAMILIES
from psal_cli.color import rgb_to_luma
from psal_cli.engine import autocast, network_precision
from psal_cli.metrics import psnr, ssim, to_uint8_levels
from psal_cli.networks.stages import Direct
from psal_cli.tasks.common import Report, model_to_evaluate, resume
from psal_cli.training import (TrainOptions, fit, folders_of, image_files, load_photos_of, photo_picker, random_crop,
                               to_float, training_files)

log = logging.getLogger("psal")

RING = 8  # width in pixels of the known ring against which hole sharpness is compared


def _stroke(draw: ImageDraw.ImageDraw, h: int, w: int, width: int, rng: np.random.Generator) -> None:
    """One free-form brush stroke: a random walk of 3–8 segments with rounded joints."""
    y, x = rng.uniform(0, h), rng.uniform(0, w)
    angle = rng.uniform(0, 2 * math.pi)
    points = [(x, y)]
    for _ in range(int(rng.integers(3, 9))):
        angle += rng.uniform(-1.2, 1.2)
        length = rng.uniform(0.05, 0.25) * max(h, w)
        x = float(np.clip(x + length * math.cos(angle), 0, w - 1))
        y = float(np.clip(y + length * math.sin(angle), 0, h - 1))
        points.append((x, y))
    draw.line(points, fill=255, width=width)
    for px, py in points:
        draw.ellipse((px - width / 2, py - width / 2, px + width / 2, py + width / 2), fill=255)


def make_mask(family: str, h: int, w: int, rng: np.random.Generator, width_scale: float | None = None) -> np.ndarray:
    """A (h, w) bool hole of the given family (True = hole), drawn from `rng`.

    Stroke widths are the family's (in pixels of a 481×321 photo) times `width_scale`
    (default: min(1, shorter side / 321), so small test images get proportionate strokes).
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown mask family {family!r} (known: {', '.join(FAMILIES)})")
    (lo, hi), widths = FAMILIES[family]
    mask = np.zeros((h, w), dtype=bool)
    if widths is None:
        area = rng.uniform(lo, hi) * h * w
        aspect = rng.uniform(0.5, 2.0)  # width / height
        bh = int(np.clip(round(math.sqrt(area / aspect)), 1, h))
        bw = int(np.clip(round(area / bh), 1, w))
        bh = int(np.clip(round(area / bw), 1, h))  # the width was clipped: keep the area
        y, x = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
        mask[y : y + bh, x : x + bw] = True
        return mask
    target = rng.uniform(lo, hi)
    width_scale = min(1.0, min(h, w) / 321) if width_scale is None else width_scale
    canvas = Image.new("L", (w, h))
    for _ in range(500):  # strokes that would overshoot `hi` are redrawn; the bound only stops pathologies
        trial = canvas.copy()
        width = max(1, round(rng.uniform(*widths) * width_scale))
        _stroke(ImageDraw.Draw(trial), h, w, width, rng)
        fraction = np.asarray(trial).astype(bool).mean()
        if fraction <= hi:
            canvas = trial
            if fraction >= target:
                break
    return np.asarray(canvas) > 0


def eval_mask(family: str, h: int, w: int, index: int, seed: int = 0) -> np.ndarray:
    """The evaluation hole of image number `index`: deterministic in (seed, family, index)."""
    return make_mask(family, h, w, np.random.default_rng([seed, list(FAMILIES).index(family), index]))


def make_sampler(photos: list[Tensor], batch: int, patch: int, *, largest: int | None = None, weighted: bool = False
                 ) -> Callable[[random.Random], dict[str, Tensor]]:
    """Batches of random crops, each with a hole of a random family.

    A photo with a long side over `largest` is first reduced to it (training passes the
    side of the network's largest working size, `work_pixels`: it fills a narrow hole at
    about a megapixel, a wide one smaller), so a 2048-px photo is seen at the scales it is
    filled at, not as a zoom into smooth detail.
    Photos are then reduced by a random factor in [0.35, 1] (scale variety, and more
    context per crop: the evaluation's boxes are larger than a crop), but never below the
    crop: a photo is not enlarged, which would train on blocky pixels. Stroke widths shrink
    by the same factor, so the strokes are those of the evaluation seen at that scale.
    `weighted` draws photos in proportion to their pixels once reduced to `largest`.
    """
    photos = [_at_most(photo, largest) for photo in photos] if largest else photos
    pick = photo_picker(len(photos), [float(p.shape[-1] * p.shape[-2]) for p in photos] if weighted else None)

    def sample(rng: random.Random) -> dict[str, Tensor]:
        images, masks = [], []
        for _ in range(batch):
            photo = photos[pick(rng)]
            h, w = photo.shape[-2:]
            factor = rng.uniform(min(1.0, max(0.35, patch / min(h, w))), 1.0)
            size = (max(patch, round(h * factor)), max(patch, round(w * factor)))
            reduced = F.interpolate(photo[None].float(), size=size, mode="area")[0]
            images.append(random_crop(reduced, patch, rng) / 255)
            family = rng.choice(list(FAMILIES))
            hole = make_mask(family, patch, patch, np.random.default_rng(rng.getrandbits(63)), width_scale=factor)
            masks.append(torch.from_numpy(hole)[None].float())
        target, mask = torch.stack(images).clamp(0, 1), torch.stack(masks)  # (B, 3, P, P), (B, 1, P, P)
        return {"image": target * (1 - mask), "mask": mask, "target": target}

    return sample


def _at_most(photo: Tensor, side: int) -> Tensor:
    """A (3, H, W) uint8 photo with its long side reduced to `side` (area average) if it is longer."""
    h, w = photo.shape[-2:]
    if max(h, w) <= side:
        return photo
    factor = side / max(h, w)
    size = (round(h * factor), round(w * factor))
    return F.interpolate(photo[None].float(), size=size, mode="area")[0].round().clamp(0, 255).byte()


def hole_l1(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Mean absolute error over hole pixels of the learned fill (known pixels are copied, so they carry no loss)."""
    mask = batch["mask"]
    out = model.fill(Direct(), batch["image"], mask)
    return ((out - batch["target"]).abs() * mask).sum() / (3 * mask.sum()).clamp(min=1)


def train(
    data: Path | list[Path],
    out: Path,
    *,
    init: Path | None = None,
    steps: int = 5000,
    batch: int = 8,
    patch: int = 128,
    lr: float = 1e-3,
    device: str = "cpu",
    seed: int = 0,
    checkpoint_every: int = 100,
    minutes: float | None = None,
) -> None:
    """Train a `psal-inpaint` network (hole L1, Adam with cosine decay) and write it to `out`.

    `patch` is the training crop side; holes are drawn from the evaluation families.
    `init` resumes from a model file: its config and step count carry on. Only the learned
    fill is trained; the full-resolution detail transfer has no weights. `data` may be
    several folders; crops are then drawn in proportion to each photo's pixels (`make_sampler`).
    """
    from psal_cli.networks import create_model

    done, meta = 0, {}
    if init is not None:
        model, done, meta = resume(init, "inpaint")
    else:
        torch.manual_seed(seed)
        model = create_model("psal-inpaint")
    folders = folders_of(data)
    files, _, described = training_files(folders, hold_out=False)
    photos = load_photos_of(files)
    options = TrainOptions(steps=steps, batch=batch, patch=patch, lr=lr, lr_final=lr / 50, seed=seed,
                           device=device, log_every=25, checkpoint_every=checkpoint_every, minutes=minutes)
    params = sum(p.numel() for p in model.parameters())
    log.info(f"psal-inpaint: {params} parameters, {len(photos)} photos, from step {done}: {options.summary}")
    largest = math.isqrt(model.config.work_pixels)
    sampler = make_sampler(photos, batch, patch, largest=largest, weighted=len(folders) > 1)
    fit(model, sampler, hole_l1, options, Path(out),
        training_meta={**meta, "data": described, "loss": "L1 over hole pixels",
                       "masks": "thin/thick/box as in evaluation"},
        done_steps=done)


_LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)


def sharpness_ratio(image: Tensor, hole: Tensor) -> float:
    """Mean squared 3×3 Laplacian of the luminance (0–255) inside the hole over the same in a known ring.

    Only pixels whose whole 3×3 neighbourhood lies in the hole (resp. in the known part)
    count, so the seam itself never does; the ring is the known pixels within RING pixels
    of the hole. A blurry fill scores near 0, the true image near its own texture's ratio.
    """
    lap = F.conv2d(rgb_to_luma(image.double()) * 255, _LAPLACIAN.double())  # (1, 1, H-2, W-2)
    inside = -F.max_pool2d(-hole.double(), 3, 1)  # all nine pixels are hole   (1, 1, H-2, W-2)
    outside = 1 - F.max_pool2d(hole.double(), 3, 1)  # all nine are known
    near = F.max_pool2d(hole.double(), 2 * RING + 1, 1, RING)[..., 1:-1, 1:-1]  # within RING of the hole
    ring = outside * near
    energy = lap.square()
    if inside.sum() == 0 or ring.sum() == 0:
        return math.nan
    inner = (energy * inside).sum() / inside.sum()
    outer = (energy * ring).sum() / ring.sum()
    return (inner / outer.clamp(min=1e-12)).item()


def inpaint_metrics(out: Tensor, truth: Tensor, hole: Tensor) -> dict[str, float]:
    """PSNR (dB) and SSIM over the whole RGB image (8-bit levels), MAE (0–255) inside the hole, sharpness ratio."""
    out = to_uint8_levels(out)
    mae = ((out - truth).abs() * hole).sum() / (3 * hole.sum())
    return {"psnr": psnr(out, truth), "ssim": ssim(out * 255, truth * 255, data_range=255.0),
            "mae": 255 * mae.item(), "sharpness": sharpness_ratio(out, hole)}


def mean_fill(image: Tensor, hole: Tensor) -> Tensor:
    """The simplest baseline: every hole pixel takes the mean colour of the known pixels."""
    known = 1 - hole
    mean = (image * known).sum((2, 3), keepdim=True) / known.sum((2, 3), keepdim=True)
    return image * known + mean * hole


def _to_uint8(image: Tensor, hole: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) uint8 RGB and (H, W) uint8 mask (255 = hole) of a (1, 3, H, W) image and its hole."""
    rgb = (image[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return np.ascontiguousarray(rgb), (hole[0, 0].numpy() > 0).astype(np.uint8) * 255


def _from_uint8(rgb: np.ndarray) -> Tensor:
    return torch.from_numpy(rgb.astype(np.float32) / 255).permute(2, 0, 1)[None]


def opencv_inpaint(image: Tensor, hole: Tensor, method: str) -> Tensor | None:
    """OpenCV's `telea` or `ns` (Navier–Stokes) inpainting, radius 5; None without opencv (a benchmark-only extra)."""
    try:
        import cv2
    except ImportError:
        return None
    flag = {"telea": cv2.INPAINT_TELEA, "ns": cv2.INPAINT_NS}[method]
    return _from_uint8(cv2.inpaint(*_to_uint8(image, hole), 5, flag))


def patchmatch_inpaint(image: Tensor, hole: Tensor) -> Tensor | None:
    """Multi-scale PatchMatch inpainting with 15×15 patches (the `pypatchmatch` package, a benchmark-only
    extra; it builds its C++ library against OpenCV at first use); None when it is not installed."""
    try:
        from patchmatch import patch_match
    except ImportError:
        return None
    if not patch_match.patchmatch_available:
        return None
    rgb, mask = _to_uint8(image, hole)
    return _from_uint8(patch_match.inpaint(rgb, mask, patch_size=7))  # patch_size is the radius


def inpaint_tensor(model: nn.Module, image: Tensor, hole: Tensor, seed: int = 0, precision: str = "fp32") -> Tensor:
    """The model on one image (1, 3, H, W) with hole pixels zeroed, untiled; known pixels kept.

    `precision` as `engine.Options.precision` (`auto` keeps this network in float32).
    """
    device = next(model.parameters()).device
    # The searches seeded: reproducible figures.
    with torch.no_grad(), autocast(device, network_precision(model, precision)):
        out = model.run(Direct(torch.Generator().manual_seed(seed)), image=(image * (1 - hole)).to(device),
                        mask=hole.to(device)).cpu()
    return torch.where(hole.bool(), out, image)


METRICS = ("psnr", "ssim", "mae", "sharpness")
# The classical methods beside the known-mean fill: (image, hole) -> fill, or None when their
# package (a benchmark-only extra) is not installed.
CLASSICAL = {"telea": partial(opencv_inpaint, method="telea"), "ns": partial(opencv_inpaint, method="ns"),
             "patchmatch": patchmatch_inpaint}


def evaluate(
    data: Path,
    masks: str = "thick",
    model: Path | nn.Module | None = None,
    *,
    limit: int | None = None,
    seed: int = 0,
    device: str = "cpu",
    patchmatch: bool = False,
    precision: str = "fp32",
) -> dict:
    """The inpainting protocol on every image of `data` with the `masks` family; baselines alongside.

    Image number i (sorted by name) gets `eval_mask(masks, H, W, i, seed)`; every method
    sees it with hole pixels zeroed. Per method: PSNR, SSIM (whole RGB image, 8-bit
    levels), hole MAE (0–255) and the sharpness ratio (`sharpness_ratio`); the true
    image's ratio is reported beside it, and `sharpness_rel` = mean over images of
    method ratio / true ratio (1 = as sharp as the photo). Baselines: the known-mean fill,
    OpenCV Telea and Navier–Stokes (when opencv is installed) and, with `patchmatch`,
    PatchMatch inpainting (`patchmatch_inpaint`, slow). `model` is a model file (default:
    the shipped weights/inpaint) or a network; `precision` is the network's (`inpaint_tensor`).
    """
    if masks not in FAMILIES:
        raise ValueError(f"unknown mask family {masks!r} (known: {', '.join(FAMILIES)})")
    model, name = model_to_evaluate(model, "inpaint", device)
    classical = {method: fill for method, fill in CLASSICAL.items() if patchmatch or method != "patchmatch"}
    rows, start, skipped = [], time.time(), set()
    for index, path in enumerate(image_files(data, limit)):
        truth = to_float(Image.open(path).convert("RGB"))
        h, w = truth.shape[-2:]
        hole = torch.from_numpy(eval_mask(masks, h, w, index, seed))[None, None].float()
        seen = truth * (1 - hole)
        row = {"name": path.stem, "hole": hole.mean().item(), "true_sharpness": sharpness_ratio(truth, hole)}
        outputs = {"model": inpaint_tensor(model, seen, hole, seed, precision), "mean": mean_fill(seen, hole)}
        for method, baseline in classical.items():
            out = baseline(seen, hole)
            if out is not None:
                outputs[method] = out
            elif method not in skipped:  # said once: the report simply has no such column
                skipped.add(method)
                log.warning('%s not measured: unavailable (pip install "psal-cli[eval]")', method)
        for method, out in outputs.items():
            got = inpaint_metrics(out, truth, hole)
            got["sharpness_rel"] = got["sharpness"] / row["true_sharpness"]
            row.update({(k if method == "model" else f"{method}_{k}"): v for k, v in got.items()})
        rows.append(row)
        log.info(f"{row['name']}: {row['psnr']:.2f} dB, MAE {row['mae']:.1f}, sharpness {row['sharpness_rel']:.0%}"
                + (f" (telea {row['telea_psnr']:.2f} dB, MAE {row['telea_mae']:.1f})" if "telea_psnr" in row else ""))

    def mean(key: str) -> float:
        values = [r[key] for r in rows if not math.isnan(r[key])]
        return sum(values) / len(values) if values else math.nan

    keys = (*METRICS, "sharpness_rel")
    return Report(
        task="inpaint", data=str(data), model=name, settings={"masks": masks, "seed": seed}, images=rows,
        mean={**{k: mean(k) for k in keys}, "true_sharpness": mean("true_sharpness"), "hole": mean("hole")},
        baselines={b: {k: mean(f"{b}_{k}") for k in keys} for b in ("mean", *CLASSICAL) if f"{b}_psnr" in rows[0]},
        seconds=time.time() - start,
    )


def format_report(report: Report) -> str:
    """A per-image table (PSNR dB / hole MAE / sharpness % of the truth's) with the means, model beside the baselines."""
    methods = ["model", *report.baselines]
    head = f"{'image':<14} {'hole':>5}" + "".join(f" {m:>22}" for m in methods)
    title = (f"inpaint, {report.settings['masks']} masks on {report.data} ({report.model}): "
             "PSNR dB / hole MAE 0-255 / sharpness % of the true image's")
    lines = [title, head, "-" * len(head)]

    def cell(values: dict, prefix: str = "") -> str:
        return f"{values[prefix + 'psnr']:6.2f} /{values[prefix + 'mae']:5.1f} /{100 * values[prefix + 'sharpness_rel']:4.0f}%"

    for r in report.images:
        lines.append(f"{r['name'][:14]:<14} {100 * r['hole']:4.1f}%" + f" {cell(r):>22}"
                     + "".join(f" {cell(r, b + '_'):>22}" for b in report.baselines))
    m = report.mean
    lines.append("-" * len(head))
    lines.append(f"{'mean':<14} {100 * m['hole']:4.1f}%" + f" {cell(m):>22}"
                 + "".join(f" {cell(report.baselines[b]):>22}" for b in report.baselines))
    lines.append(f"SSIM: model {m['ssim']:.4f}" + "".join(f", {b} {v['ssim']:.4f}" for b, v in report.baselines.items())
                 + f"; true image sharpness ratio {m['true_sharpness']:.3f}")
    return "\n".join(lines)


def metrics_for_file(report: Report) -> dict:
    """What `psal eval --save-metrics` records for this data set: every mask family measured so far.

    The CLI stores the result under the data set's name, so the figures of the families
    already in the model file are kept and this family's are added beside them.
    """
    from psal_cli.modelfile import read_info

    def rounded(values: dict) -> dict:
        return {k: round(v, 4) for k, v in values.items()}

    earlier = {}
    if Path(report.model).is_file():
        earlier = read_info(report.model).metrics.get(Path(report.data).name, {})
    figures = {**rounded(report.mean), **{name: rounded(v) for name, v in report.baselines.items()},
               "images": len(report.images), "seed": report.settings["seed"]}
    return {**earlier, report.settings["masks"]: figures}
