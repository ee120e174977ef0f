"""The training loop shared by every network: sample a batch, step Adam, checkpoint, resume.

Each task (psal_cli/tasks/) supplies what differs: how a batch is made from the photos
and the loss. The photo helpers here (which files, as tensors) serve its evaluation too.
Checkpoints are ordinary model files (safetensors with metadata), so a run resumes from
any of them with `--init` and a shipped weights file is a checkpoint.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import random
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from psal_cli.imageio import FORMATS

log = logging.getLogger("psal")

SHARED_TRAIN = "BSDS500 train+test (shared/data/train, 400 photos)"


UNTIL_THE_CLOCK = 10**9  # `steps` of a run that `minutes` alone ends: no step cap


@dataclass
class TrainOptions:
    steps: int = 20000
    batch: int = 16
    patch: int = 64  # side of the training crop, in output (target) pixels
    lr: float = 5e-4  # peak learning rate; cosine decay to lr_final over this run's steps
    lr_final: float = 1e-5
    seed: int = 0
    device: str = "cpu"
    log_every: int = 50
    checkpoint_every: int = 250
    validate_every: int = 1000
    loss: str | None = None  # the loss's name where a task offers a choice (recorded with the run)
    # A wall-clock budget: the cosine schedule runs over this time (or `steps`, whichever ends
    # first) and training stops when it is spent: "train for an hour" on any machine.
    minutes: float | None = None

    @property
    def summary(self) -> str:
        """How long the run is and its recipe, for its first log line (the defaults are each task's)."""
        length = f"{self.steps} step{'s' if self.steps != 1 else ''}"
        if self.minutes:
            length = f"{self.minutes:g} minutes" + (f" (at most {length})" if self.steps != UNTIL_THE_CLOCK else "")
        return f"{length}, batches of {self.batch} crops of {self.patch} px, peak learning rate {self.lr:g}"


def image_files(folder: Path, limit: int | None = None) -> list[Path]:
    """The images of a folder that psal reads (imageio.FORMATS), sorted by name; the first `limit`."""
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in FORMATS)
    if not files:
        raise ValueError(f"no images found in {folder}")
    return files[:limit] if limit else files


def load_photos(folder: Path, limit: int | None = None) -> list[Tensor]:
    """Every photo of a folder as a (3, H, W) uint8 tensor, sorted by name (held in memory)."""
    return load_photos_of(image_files(folder, limit))


def load_photos_of(files: list[Path]) -> list[Tensor]:
    """These photos as (3, H, W) uint8 tensors, decoded once and held in memory."""
    return [torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1).contiguous() for f in files]


def to_float(image: Image.Image) -> Tensor:
    """(1, 3, H, W) float in [0, 1] of an RGB Pillow image."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]


def data_description(data: Path, photos: int, limit: int | None = None) -> str:
    """What a model file records as its training data: the shared set by name when `data` is
    shared/data/train used whole, else the folder given and how many photos it gave."""
    shared = Path(data).resolve().parts[-3:] == ("shared", "data", "train") and not limit
    return SHARED_TRAIN if shared else f"{data} ({photos} photos)"


def photo_picker(count: int, weights: list[float] | None = None) -> Callable[[random.Random], int]:
    """A draw of a photo's index among `count`: uniform, or in proportion to `weights` (pixel
    counts, so that a large photo gives as many crops as its area holds)."""
    if not weights:
        return lambda rng: rng.randrange(count)
    cumulative = list(itertools.accumulate(weights))
    return lambda rng: rng.choices(range(count), cum_weights=cumulative)[0]


def selection_split(files: list[Path]) -> tuple[list[Path], list[Path]]:
    """(training files, held-out selection files) of one folder's sorted photos: every tenth
    photo, from the first, is held out to choose among checkpoints and never trained on."""
    return [f for i, f in enumerate(files) if i % 10], [f for i, f in enumerate(files) if not i % 10]


def folders_of(data: Path | list[Path]) -> list[Path]:
    """The training folders of a `--data` given once (a path) or several times (a list)."""
    return [Path(d) for d in (data if isinstance(data, (list, tuple)) else [data])]


def training_files(folders: list[Path], hold_out: bool) -> tuple[list[Path], list[Path], str]:
    """(photos to train on, held-out photos, the data as the model file records it) of these
    folders; with `hold_out`, every folder's `selection_split` is held out."""
    files, held_out, described = [], [], []
    for folder in folders:
        mine, selection = selection_split(image_files(folder)) if hold_out else (image_files(folder), [])
        files += mine
        held_out += selection
        # Not the shared set by name once photos of it are held out.
        described.append(f"{folder} ({len(mine)} photos)" if selection else data_description(folder, len(mine)))
    return files, held_out, " + ".join(described)


def random_crop(photo: Tensor, size: int, rng: random.Random) -> Tensor:
    """A size×size crop at a random place, randomly flipped and rotated by a multiple of 90°."""
    _, h, w = photo.shape
    size = min(size, h, w)
    y, x = rng.randrange(h - size + 1), rng.randrange(w - size + 1)
    crop = photo[:, y : y + size, x : x + size]
    if rng.random() < 0.5:
        crop = crop.flip(-1)
    return torch.rot90(crop, rng.randrange(4), (-2, -1))


def batches(sample: Callable[[random.Random], dict[str, Tensor]], seed: int, first: int, workers: int = 0
            ) -> Iterator[dict[str, Tensor]]:
    """The batches of steps first, first + 1, ...: step s's is `sample(Random(f"{seed}:{s}"))`.

    A batch depends on the seed and the step alone, so `workers` threads can make the next
    ones while the network trains on this one (a GPU step is shorter than making 64 crops
    with Pillow, which releases the GIL), and a run gets the same batches with any number
    of workers, resumed or not.
    """
    def make(step: int) -> dict[str, Tensor]:
        return sample(random.Random(f"{seed}:{step}"))

    step = first
    if workers == 0:
        while True:
            yield make(step)
            step += 1
    with ThreadPoolExecutor(workers, thread_name_prefix="batches") as pool:
        ahead = deque(pool.submit(make, s) for s in range(first, first + 2 * workers))
        try:
            while True:
                batch = ahead.popleft().result()
                ahead.append(pool.submit(make, step + 2 * workers))
                step += 1
                yield batch
        finally:
            for future in ahead:
                future.cancel()


def batch_workers(device: torch.device) -> int:
    """Threads making batches ahead: none on the CPU (the step itself uses the cores), up to
    4 beside an accelerator."""
    return 0 if device.type == "cpu" else min(4, os.cpu_count() or 1)


def fit(
    model: nn.Module,
    sample: Callable[[random.Random], dict[str, Tensor]],
    loss_fn: Callable[[nn.Module, dict[str, Tensor]], Tensor],
    options: TrainOptions,
    out: Path,
    *,
    training_meta: dict,
    done_steps: int = 0,
    validate: Callable[[nn.Module], dict[str, float]] | None = None,
) -> None:
    """Train `model` for `options.steps` more steps or `options.minutes`, whichever ends first,
    writing `out` every checkpoint_every steps and at the end.

    `sample(rng)` returns one batch (inputs and "target", on the CPU); `loss_fn(model, batch)`
    the scalar loss. `done_steps` counts earlier runs, so the metadata keeps the total, and
    `training_meta["runs"]` (the resumed file's) gets this run appended: a model file that
    several runs improved in turn says how every one of its steps was trained.
    """
    from psal_cli.modelfile import save_model  # checkpoints are ordinary model files (psal_cli.modelfile)

    out.parent.mkdir(parents=True, exist_ok=True)  # only now: a run refused earlier leaves no folder
    device = torch.device(options.device)
    model.to(device).train()
    torch.manual_seed(options.seed + done_steps)
    optimizer = torch.optim.Adam(model.parameters(), lr=options.lr)
    metrics: dict[str, float] = {}
    start, seen_loss, seen = time.time(), 0.0, 0

    earlier = list(training_meta.get("runs", []))
    curve = list(training_meta.get("curve", []))  # every validation's figures: the learning curve
    recorded = asdict(options)
    if options.steps >= UNTIL_THE_CLOCK:
        recorded["steps"] = None  # the clock, not a step count, ends this run
    schedule = recorded["steps"] or f"{options.minutes:g} minutes"
    recipe = {k: v for k, v in recorded.items()
              if k in ("batch", "patch", "lr", "lr_final", "seed", "device", "loss", "minutes") and v is not None}

    def checkpoint(step: int, last: bool = False) -> None:
        run = {"steps": f"{done_steps}-{done_steps + step}", **recipe}
        if not last:
            run["stopped_of"] = schedule  # a checkpoint inside a cosine schedule
        meta = {**training_meta, "steps": done_steps + step, "options": recorded, "runs": earlier + [run],
                **({"curve": curve} if curve else {})}
        save_model(model, out, training=meta, metrics=metrics)

    budget = options.minutes * 60 if options.minutes else math.inf
    with closing(batches(sample, options.seed, done_steps + 1, batch_workers(device))) as stream:
        for step, batch in zip(range(1, options.steps + 1), stream):
            progress = max((step - 1) / max(1, options.steps - 1), min(1.0, (time.time() - start) / budget))
            lr = options.lr_final + 0.5 * (options.lr - options.lr_final) * (1 + math.cos(math.pi * progress))
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = {name: t.to(device) for name, t in batch.items()}
            loss = loss_fn(model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            # Summed on the device and read only when logged: reading every step's loss would make
            # the CPU wait for each GPU step before it queues the next one.
            seen_loss, seen = seen_loss + loss.detach(), seen + 1
            last = step == options.steps or time.time() - start >= budget
            if step % options.log_every == 0 or last:
                rate = step / (time.time() - start)
                log.info(f"step {done_steps + step} loss {float(seen_loss) / seen:.5f} lr {lr:.2e} {rate:.2f} steps/s")
                seen_loss, seen = 0.0, 0
            if validate is not None and (step % options.validate_every == 0 or last):
                model.eval()
                with torch.no_grad():
                    metrics = validate(model)
                model.train()
                curve.append({"step": done_steps + step, **{k: round(v, 4) for k, v in metrics.items()}})
                log.info(f"step {done_steps + step} validation " + " ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            if step % options.checkpoint_every == 0 or last:
                checkpoint(step, last)
            if last:
                break
    model.eval()
