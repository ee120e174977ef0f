"""Super-resolution: training batches, loss, `train` and the benchmark `evaluate`.

The degradation is the evaluation protocol's (shared/data/README.md): LR = HR downscaled
with Pillow bicubic. Training learns exactly that inverse; `evaluate` measures Y-channel
PSNR/SSIM with an s-pixel border removed, with bicubic and Lanczos measured in the same
run, so every figure compares with published ×2/×3/×4 results.
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from psal_cli import degradations
from psal_cli.edit import check_size
from psal_cli.engine import Options, run_network
from psal_cli.metrics import psnr, rgb_to_y, shave, ssim, to_uint8_levels
from psal_cli.choices import DEGRADATIONS, LOSSES
from psal_cli.tasks.common import Report, model_to_evaluate, resume
from psal_cli.training import (TrainOptions, fit, folders_of, image_files, load_photos_of, photo_picker, random_crop,
                               to_float, training_files)

log = logging.getLogger("psal")

BASELINES = {"bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}


def degrade(hr: Image.Image, scale: int) -> tuple[Image.Image, Image.Image]:
    """(HR cropped to a multiple of `scale`, its Pillow-bicubic LR): the protocol's pair."""
    w, h = hr.width - hr.width % scale, hr.height - hr.height % scale
    hr = hr.crop((0, 0, w, h))
    return hr, hr.resize((w // scale, h // scale), Image.Resampling.BICUBIC)


def y_metrics(sr: Tensor, hr: Tensor, scale: int) -> tuple[float, float]:
    """(PSNR, SSIM) on the Y channel (16–235) after removing `scale` border pixels."""
    a = shave(rgb_to_y(to_uint8_levels(sr)), scale)
    b = shave(rgb_to_y(hr), scale)
    return psnr(a, b, data_range=255.0), ssim(a, b, data_range=255.0)


def check_degradation(degradation: str) -> None:
    if degradation not in DEGRADATIONS:
        raise ValueError(f"unknown degradation {degradation!r} (use {' or '.join(DEGRADATIONS)})")


def make_sampler(photos: list[Tensor], scale: int, batch: int, patch: int, *, rescale: float = 1.0,
                 colors: bool = False, degradation: str = "bicubic", weights: list[float] | None = None
                 ) -> Callable[[random.Random], dict[str, Tensor]]:
    """Batches of random flipped/rotated HR crops (patch×patch) and their LR: Pillow bicubic, or
    with `degradation` "real" a draw of `degradations.TRAINING` per crop.

    `weights` makes a photo's chance of being cropped proportional to its weight (its pixel
    count, so that a 2048-px photo gives as many crops as its area holds); default uniform.

    More variety from the same photos, because a grown network fits its 400 training photos
    better than photos it never saw: with `rescale` < 1, half the crops are a larger area
    (up to patch/rescale, and no larger than the photo's short side) reduced to patch×patch
    with Pillow bicubic, the photo at another scale; `colors` permutes the RGB channels of
    every crop at random.
    """
    patch -= patch % scale
    check_degradation(degradation)
    pick = photo_picker(len(photos), weights)

    def sample(rng: random.Random) -> dict[str, Tensor]:
        lrs, hrs = [], []
        for _ in range(batch):
            photo = photos[pick(rng)]
            side = round(patch / rng.uniform(rescale, 1.0)) if rescale < 1 and rng.random() < 0.5 else patch
            image = Image.fromarray(random_crop(photo, side, rng).permute(1, 2, 0).numpy())  # (S, S, 3) uint8
            if image.size != (patch, patch):
                image = image.resize((patch, patch), Image.Resampling.BICUBIC)
            if colors:
                order = [0, 1, 2]
                rng.shuffle(order)
                bands = image.split()
                image = Image.merge("RGB", [bands[i] for i in order])
            hr, lr = degrade(image, scale)
            if degradation == "real":
                lr = degradations.degrade_for_training(hr, scale, rng)
            lrs.append(to_float(lr))
            hrs.append(to_float(hr))
        return {"image": torch.cat(lrs), "target": torch.cat(hrs)}  # (B, 3, P/s, P/s), (B, 3, P, P)

    return sample


def loss_function(name: str = "l1") -> Callable[[nn.Module, dict[str, Tensor]], Tensor]:
    """The training loss `name` (`LOSSES`) of the network's output against the HR crop.

    L1 is the usual super-resolution loss (it trains faster and sharper than L2); a last
    fine-tune with L2, the mean squared error that PSNR measures, still gains some PSNR.
    """
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r} (use {' or '.join(LOSSES)})")
    pixel_loss = getattr(F, LOSSES[name])

    def loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        return pixel_loss(model(image=batch["image"]), batch["target"])

    return loss


def upscale_tensor(model: nn.Module, lr: Tensor, seed: int = 0, views: int = 1, precision: str = "fp32") -> Tensor:
    """The model on one LR image (1, 3, h, w) through the engine, untiled (tiling changes nothing but memory).

    `seed` seeds PatchMatch's random init (reproducible figures); `views` is the engine's self-ensemble;
    `precision` the engine's (`psal eval --precision`).
    """
    options = Options(device=str(next(model.parameters()).device), tile=0, seed=seed, views=views, precision=precision)
    return run_network(model, {"image": lr}, options)


def evaluate(
    data: Path,
    scale: int = 4,
    model: Path | nn.Module | None = None,
    *,
    limit: int | None = None,
    device: str = "cpu",
    seed: int = 0,
    ensemble: bool = False,
    degradation: str = "bicubic",
    precision: str = "fp32",
) -> dict:
    """The super-resolution protocol on every image of `data`; bicubic and Lanczos alongside.

    `degradation` "real" makes each LR image with the camera-like evaluation pipeline
    (`degradations.camera`: its own draw per photo, seeded by `seed` and the photo's name)
    instead of the protocol's clean bicubic reduction; the rows name each photo's draw.

    `model` is a model file (default: the shipped weights/upscale-x<scale>) or a network;
    `seed` seeds PatchMatch on maps too large for the matrix-product search; `ensemble`
    averages the 8 flipped/transposed views (the engine's self-ensemble, `psal upscale --ensemble`);
    `precision` is the network's (`engine.Options.precision`); baselines and metrics keep full precision.
    The report's rows are {name, psnr, ssim, bicubic_psnr, ...}, its mean {psnr, ssim}.
    """
    model, name = model_to_evaluate(model, "upscale", device, scale)
    if model.config.scale != scale:
        raise ValueError(f"{name} upscales ×{model.config.scale}, not ×{scale}")
    check_degradation(degradation)
    rows, start = [], time.time()
    for path in image_files(data, limit):
        hr_image, lr_image = degrade(Image.open(path).convert("RGB"), scale)
        row = {"name": path.stem}
        if degradation == "real":
            lr_image, recipe = degradations.camera(hr_image, scale, seed, path.stem)
            row["degradation"] = recipe.describe()
        check_size(model, lr_image, what=f"{path} reduced ×{scale}")
        hr = to_float(hr_image)
        sr = upscale_tensor(model, to_float(lr_image), seed, 8 if ensemble else 1, precision)
        row["psnr"], row["ssim"] = y_metrics(sr, hr, scale)
        for base, method in BASELINES.items():
            up = to_float(lr_image.resize(hr_image.size, method))
            row[f"{base}_psnr"], row[f"{base}_ssim"] = y_metrics(up, hr, scale)
        rows.append(row)
        log.info(f"{row['name']}: {row['psnr']:.2f} dB (bicubic {row['bicubic_psnr']:.2f})")

    def mean(key: str) -> float:
        return sum(r[key] for r in rows) / len(rows)

    return Report(
        task="upscale", data=str(data), model=name,
        settings={"scale": scale, "ensemble": ensemble, "seed": seed, "degradation": degradation},
        images=rows, mean={"psnr": mean("psnr"), "ssim": mean("ssim")},
        baselines={b: {"psnr": mean(f"{b}_psnr"), "ssim": mean(f"{b}_ssim")} for b in BASELINES},
        seconds=time.time() - start,
    )


def metrics_for_file(report: Report) -> dict[str, float]:
    """The mean figures of a report as a model file records them (`psal eval --save-metrics`).

    Added to what the file holds for the data set: a self-ensemble run records
    ensemble_psnr/ensemble_ssim beside the plain figures instead of replacing them.
    """
    from psal_cli.modelfile import read_info

    kept = {}
    if Path(report.model).is_file():
        kept = read_info(report.model).metrics.get(Path(report.data).name, {})
    m, b = report.mean, report.baselines
    # The camera-like degradation's figures sit beside the clean protocol's, prefixed real_.
    real = "real_" if report.settings.get("degradation") == "real" else ""
    if report.settings["ensemble"]:
        return {**kept, f"{real}ensemble_psnr": round(m["psnr"], 3), f"{real}ensemble_ssim": round(m["ssim"], 4)}
    return {**kept, f"{real}psnr": round(m["psnr"], 3), f"{real}ssim": round(m["ssim"], 4),
            **{f"{real}{name}_{k}": round(b[name][k], 3 if k == "psnr" else 4) for name in b for k in ("psnr", "ssim")}}


def format_report(report: Report) -> str:
    """A per-image table (Y PSNR dB / SSIM) with the mean, model beside bicubic and Lanczos."""
    head = f"{'image':<20} {'model':>15} {'bicubic':>15} {'lanczos':>15}"
    how = ", self-ensemble of 8 views" if report.settings["ensemble"] else ""
    if report.settings.get("degradation") == "real":
        how += f", camera-like degradation seed {report.settings['seed']}"
    lines = [f"×{report.settings['scale']} on {report.data} ({report.model}{how}), Y-channel PSNR dB / SSIM",
             head, "-" * len(head)]

    def cell(psnr_: float, ssim_: float) -> str:
        return f"{psnr_:6.2f} / {ssim_:.4f}"

    for r in report.images:
        lines.append(f"{r['name'][:20]:<20} {cell(r['psnr'], r['ssim']):>15} "
                     f"{cell(r['bicubic_psnr'], r['bicubic_ssim']):>15} {cell(r['lanczos_psnr'], r['lanczos_ssim']):>15}")
    m, b = report.mean, report.baselines
    lines.append("-" * len(head))
    lines.append(f"{'mean':<20} {cell(m['psnr'], m['ssim']):>15} {cell(b['bicubic']['psnr'], b['bicubic']['ssim']):>15} "
                 f"{cell(b['lanczos']['psnr'], b['lanczos']['ssim']):>15}")
    return "\n".join(lines)


def _validation(files: list[Path], scale: int, crop: int, prefix: str = "val_crops",
                degradation: str = "bicubic") -> Callable[[nn.Module], dict[str, float]]:
    """Mean Y PSNR of the model and bicubic on the centre crops of a few validation photos.

    With `degradation` "real", the crops are measured twice: reduced by the camera-like
    evaluation pipeline (seed 0; figures `<prefix>_real_psnr`, ...) and by the clean protocol.
    """
    kinds = {"": "bicubic", "real_": "real"} if degradation == "real" else {"": "bicubic"}
    pairs: dict[str, list] = {kind: [] for kind in kinds}
    for path in files:
        photo = Image.open(path).convert("RGB")
        left, top = max(0, (photo.width - crop) // 2), max(0, (photo.height - crop) // 2)
        hr, lr = degrade(photo.crop((left, top, left + crop, top + crop)), scale)
        for kind, name in kinds.items():
            low = degradations.camera(hr, scale, 0, path.stem)[0] if name == "real" else lr
            pairs[kind].append((to_float(hr), to_float(low), to_float(low.resize(hr.size, Image.Resampling.BICUBIC))))
    bicubic = {kind: sum(y_metrics(up, hr, scale)[0] for hr, _, up in got) / len(got) for kind, got in pairs.items()}

    def validate(model: nn.Module) -> dict[str, float]:
        figures = {}
        for kind, got in pairs.items():
            figures[f"{prefix}_{kind}psnr"] = sum(y_metrics(upscale_tensor(model, lr), hr, scale)[0]
                                                  for hr, lr, _ in got) / len(got)
            figures[f"{prefix}_{kind}bicubic_psnr"] = bicubic[kind]
        return figures

    return validate


def train(
    data: Path | list[Path],
    out: Path,
    scale: int = 4,
    *,
    init: Path | None = None,
    steps: int = 5000,
    batch: int = 16,
    patch: int = 96,
    lr: float = 1e-3,
    loss: str = "l1",
    device: str = "cpu",
    seed: int = 0,
    attention: bool = True,
    deepen: int = 0,
    widen: int = 0,
    rescale: float = 1.0,
    colors: bool = False,
    degradation: str = "bicubic",
    config: dict | None = None,
    val: Path | None = None,
    val_images: int = 5,
    validate_every: int = 500,
    minutes: float | None = None,
) -> None:
    """Train a `psal-upscale` network (L1 or `loss`, Adam with cosine decay) and write it to `out`.

    `patch` is the HR crop side (the LR crop is patch/scale). `init` resumes from a model
    file: same scale → its config and step count carry on; another scale (×2 → ×4) →
    every tensor that fits (head, attention, body) initialises a fresh ×`scale` network.
    `deepen` adds that many identity-initialised residual blocks after attention to the
    resumed network (`PSALUpscale.deepen`), `widen` sets the channels inside every residual
    block (`PSALUpscale.widen`): more capacity from where training stands. `rescale` and
    `colors` augment the crops (`make_sampler`).
    `attention=False` trains the ablation without PSAL; `config` overrides other fields of
    a new network's `PSALUpscale.Config` (tests use tiny ones). Validation PSNR is measured every
    `validate_every` steps on `val_images` centre crops of `val` (default: `data`/../val
    when it exists), never used for training.

    `data` may be several folders; crops are then drawn in proportion to each photo's pixels.
    `degradation` "real" trains on camera-like degradations (`degradations.TRAINING`) and
    holds out every folder's `selection_split`: validation measures its centre crops, degraded
    and clean, and the model file names the held-out photos.
    """
    from psal_cli.modelfile import load_model, read_info
    from psal_cli.networks import create_model
    from psal_cli.networks.upscale import PSALUpscale

    grow = []  # how the resumed network is grown, for the log and the training history
    if deepen:
        grow.append(f"+{deepen} residual blocks after attention")
    if widen:
        grow.append(f"{widen} channels inside residual blocks")
    if grow and init is None:
        raise ValueError("deepen/widen need a network to resume (init)")
    done, meta = 0, {}
    if init is None:
        model = PSALUpscale(PSALUpscale.Config(**{**(config or {}), "scale": scale, "attention": attention}))
    elif read_info(init).config.get("scale") == scale:
        model, done, meta = resume(init, "upscale")
        if deepen:
            model = model.deepen(deepen)
        if widen:
            model = model.widen(widen)
        if grow:
            meta["grown"] = meta.get("grown", []) + [f"{change} at step {done}" for change in grow]
            log.info(f"grown ({', '.join(grow)}), the same function to start from")
    else:
        start, info = load_model(init, task="upscale")
        if grow:
            raise ValueError(f"deepen/widen resume a ×{scale} network, {init} is ×{info.config['scale']}")
        model = create_model(info.architecture, **{**info.config, "scale": scale})
        own = model.state_dict()
        fits = {k: v for k, v in start.state_dict().items() if k in own and own[k].shape == v.shape}
        model.load_state_dict(fits, strict=False)
        meta["init_from"] = f"{Path(init).name} (×{info.config['scale']}, {info.training.get('steps', 0)} steps)"
        log.info(f"initialised {len(fits)}/{len(own)} tensors from {init}")
    loss_fn = loss_function(loss)  # an unknown name fails before any photo is read
    if not 0 < rescale <= 1:
        raise ValueError(f"rescale must be in (0, 1], got {rescale:g}")
    side = (patch - patch % scale) // scale
    if not model.accepts_size("image", side, side):
        raise ValueError(f"--patch {patch} makes {side}×{side}-px inputs at ×{scale}, too few for PSAL's patches: use a larger --patch")
    check_degradation(degradation)
    folders = folders_of(data)
    files, held_out, meta["data"] = training_files(folders, hold_out=degradation == "real")
    photos = load_photos_of(files)
    small = next((f for f, photo in zip(files, photos) if min(photo.shape[-2:]) < patch), None)
    if small is not None:
        raise ValueError(f"{small} is smaller than the {patch}-px training crop: leave it out or lower --patch")
    options = TrainOptions(steps=steps, batch=batch, patch=patch, lr=lr, seed=seed, device=device,
                           validate_every=validate_every, loss=loss, minutes=minutes)
    if degradation == "real":
        # A resumed real-photo run keeps the step its degradation started from, and the ranges
        # earlier steps were drawn from when they differ from today's.
        previous = meta.get("degradation") or {}
        resumed = previous.get("name") == "real"
        ranges = degradations.describe_mixture(degradations.TRAINING)
        earlier = list(previous.get("earlier", [])) if resumed else []
        if resumed and previous.get("ranges") not in (None, ranges):
            earlier.append({"until_step": done, "ranges": previous.get("ranges")})
        meta["degradation"] = {"name": "real", "from_step": previous.get("from_step", done) if resumed else done,
                               "ranges": ranges, **({"earlier": earlier} if earlier else {}),
                               "selection": [f.name for f in held_out]}
        validate = _validation(held_out, scale, crop=256, prefix="selection", degradation="real")
    else:
        if (meta.get("degradation") or {}).get("name") == "real":
            # Clean steps on a real-photo file make it a clean one again; its record is kept.
            meta["degradation"] = {"name": "bicubic", "from_step": done, "before": meta["degradation"]}
        val = val if val is not None else folders[0].parent / "val"
        validate = _validation(image_files(val, val_images), scale, crop=192) if val.is_dir() else None
    params = sum(p.numel() for p in model.parameters())
    log.info(f"psal-upscale ×{scale}: {params} parameters, attention {model.config.attention}, "
        f"{len(photos)} photos, from step {done}: {options.summary}")
    if rescale < 1 or colors:
        meta["augmented"] = meta.get("augmented", []) + [f"rescale {rescale:g}, colors {colors} from step {done}"]
    weights = [float(p.shape[-1] * p.shape[-2]) for p in photos] if len(folders) > 1 else None
    sampler = make_sampler(photos, scale, batch, patch, rescale=rescale, colors=colors, degradation=degradation,
                           weights=weights)
    fit(model, sampler, loss_fn, options, Path(out), training_meta=meta, done_steps=done, validate=validate)
