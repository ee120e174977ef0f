"""Batches on a Ray cluster: Ray Data actors that load a model once and edit files.

`psal upscale|inpaint|colorize INPUTS -o OUT --ray [ADDRESS]` runs `run_batch` here. The
actor classes are also a public API for Ray pipelines of one's own: each row names an
input and its output (paths or URLs) and comes back with the result's status.

    import ray, psal_cli.ray
    ds = ray.data.from_items([{"input": "s3://scans/a.png", "output": "s3://scans_x4/a.png"}, ...])
    ds = ds.map_batches(psal_cli.ray.Upscale, concurrency=4, batch_size=8,
                        fn_constructor_kwargs={"model": "upscale-x4.safetensors", "skip_existing": True})
    for row in ds.iter_rows():
        if row["status"] == "failed":
            print(row["error"])

A row may also have "rel": the path matched against a --mask or --reference folder (by
relative path, then stem), by default the input's file name. Each actor reads, edits and
writes its files itself (atomically, as `psal` does), so a worker killed mid-batch leaves no
partial output, and Ray's retry of its rows completes them.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path, PurePath
from typing import Any

from PIL import Image

from psal_cli.batch import Companions, Item, Result, UsageError, edit_item, triage
from psal_cli.storage import Unreachable, location

log = logging.getLogger("psal")
EXTRA = 'pip install "psal-cli[ray]"'
RESULT_COLUMNS = ("input", "output", "status", "seconds", "error")
# Rows per Ray Data block: a block is what a killed worker's retry redoes, and what the
# scheduler hands out; more blocks balance better, fewer cost the driver less.
BLOCKS_PER_WORKER = 32


class Editor:
    """A Ray Data actor: `edit` (an (item, image) -> image, e.g. psal_cli.edit.Upscaler)
    applied to every row's file; the row comes back with its result (RESULT_COLUMNS)."""

    def __init__(self, edit: Callable[[Item, Image.Image], Image.Image], *, quality: int | None = None,
                 overwrite: bool = False, skip_existing: bool = False, threads: int | None = None) -> None:
        if threads:
            import torch

            torch.set_num_threads(threads)
        if not callable(edit):  # an ObjectRef: what run_batch put in Ray's store, model inside
            import ray

            edit = ray.get(edit)
        self.edit = edit
        self.quality, self.overwrite, self.skip_existing = quality, overwrite, skip_existing

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        passed = [name for name in batch if name not in RESULT_COLUMNS]  # the row's other columns
        out: dict[str, list[Any]] = {name: [] for name in passed + list(RESULT_COLUMNS)}
        from psal_cli.imageio import large_images

        with large_images():  # large photos, as the `psal` commands read them
            for k in range(len(batch["input"])):
                row = {name: values[k] for name, values in batch.items()}
                rel = row.get("rel") or location(str(row["input"])).name
                item = Item(location(str(row["input"])), PurePath(str(rel)), location(str(row["output"])))
                try:
                    result = edit_item(item, self.edit, quality=self.quality, overwrite=self.overwrite,
                                       skip_existing=self.skip_existing)
                except Unreachable as e:  # the batch goes on: each later row says so too
                    result = Result(item.name, item.output_name, "failed", error=str(e))
                for name in passed:
                    out[name].append(row[name])
                for name in RESULT_COLUMNS:
                    out[name].append(getattr(result, name))
        return out


def _model(model: Any, task: str) -> Any:
    """A model file's network, or `model` itself when it is one already."""
    if not isinstance(model, (str, Path)):
        return model
    from psal_cli.modelfile import load_model

    return load_model(model, task=task)[0]


def _options(device: str, tile: int | None, tile_overlap: int | None, half: bool, seed: int) -> Any:
    from psal_cli.engine import Options

    return Options(device=device, tile=tile, tile_overlap=tile_overlap, half=half, seed=seed)


class Upscale(Editor):
    """Enlarge each row's image by the model's scale (`psal upscale`).

    `model`: a model file (.safetensors) or a network loaded by psal_cli.modelfile.load_model;
    `ensemble`: mean of 8 flipped/rotated runs. The rest as `psal upscale`'s options.
    """

    def __init__(self, model: Any, *, ensemble: bool = False, device: str = "auto", tile: int | None = None,
                 tile_overlap: int | None = None, half: bool = False, seed: int = 0,
                 quality: int | None = None, overwrite: bool = False, skip_existing: bool = False,
                 threads: int | None = None) -> None:
        from psal_cli import edit

        options = _options(device, tile, tile_overlap, half, seed)
        options.views = 8 if ensemble else options.views
        super().__init__(edit.Upscaler(_model(model, "upscale"), options), quality=quality, overwrite=overwrite,
                         skip_existing=skip_existing, threads=threads)


class Inpaint(Editor):
    """Fill the holes of each row's image (`psal inpaint`): `mask` is one mask for all, or a
    folder (path or URL) matched by each row's "rel"; without it, the hole is the image's
    transparency. `model`: as for Upscale."""

    def __init__(self, model: Any, *, mask: str | None = None, invert_mask: bool = False, dilate: int = 0,
                 device: str = "auto", tile: int | None = None, tile_overlap: int | None = None,
                 half: bool = False, seed: int = 0, quality: int | None = None, overwrite: bool = False,
                 skip_existing: bool = False, threads: int | None = None) -> None:
        from psal_cli import edit

        masks = Companions(mask, "mask") if mask else None
        editor = edit.Inpainter(_model(model, "inpaint"), _options(device, tile, tile_overlap, half, seed),
                                masks, invert_mask, dilate)
        super().__init__(editor, quality=quality, overwrite=overwrite, skip_existing=skip_existing,
                         threads=threads)


class Colorize(Editor):
    """Colour each row's gray image after `reference` (`psal colorize`): one image for all,
    or a folder (path or URL) matched by each row's "rel". `model`: as for Upscale."""

    def __init__(self, model: Any, *, reference: str, device: str = "auto", tile: int | None = None,
                 tile_overlap: int | None = None, half: bool = False, seed: int = 0,
                 quality: int | None = None, overwrite: bool = False, skip_existing: bool = False,
                 threads: int | None = None) -> None:
        from psal_cli import edit

        editor = edit.Colorizer(_model(model, "colorize"), _options(device, tile, tile_overlap, half, seed),
                                Companions(reference, "reference"))
        super().__init__(editor, quality=quality, overwrite=overwrite, skip_existing=skip_existing,
                         threads=threads)


def _ray() -> Any:
    try:
        import ray
        import ray.data
    except ImportError:
        raise UsageError(f"--ray needs Ray: {EXTRA}") from None
    return ray


def run_batch(items: list[Item], edit: Callable[[Item, Image.Image], Image.Image], *, address: str | None,
              workers: int | None, gpus: bool, quality: int | None = None, overwrite: bool = False,
              skip_existing: bool = False, threads: int | None = None) -> Iterator[Result]:
    """`batch.run_batch` on a Ray cluster; Results come as items finish.

    `address`: a running cluster's ("auto", "HOST:PORT", "ray://HOST:PORT"), or None for RAY_ADDRESS's, else a
    local one started for this run. The driver decides once which outputs exist (one
    listing for object storage) and hands the rest to `workers` Editor actors (default: one
    per CPU, or per GPU with `gpus`), each with the model and one CPU (or GPU).
    """
    if any(i.source is None or i.output is None for i in items):
        raise UsageError("--ray reads and writes files: not standard input or output (-)")
    todo, settled = triage(items, overwrite=overwrite, skip_existing=skip_existing)
    yield from settled.values()
    if not todo:
        return
    ray = _ray()
    started = not ray.is_initialized()
    # Ray prints its workers' troubles (a worker killed, a task retried) on standard output,
    # which belongs to --json: they go to standard error with psal's own messages.
    with contextlib.redirect_stdout(sys.stderr):
        yield from _run(ray, started, items, todo, edit, address=address, workers=workers, gpus=gpus,
                        quality=quality, threads=threads)


def _run(ray: Any, started: bool, items: list[Item], todo: list[int], edit: Callable[..., Any], *,
         address: str | None, workers: int | None, gpus: bool, quality: int | None,
         threads: int | None) -> Iterator[Result]:
    if started:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False,
                 include_dashboard=False, configure_logging=True)
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        context.print_on_execution_start = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        resource = "GPU" if gpus else "CPU"
        available = int(ray.cluster_resources().get(resource, 0))
        if not available:
            raise UsageError(f"--ray: the cluster has no {resource}")
        workers = min(workers or available, len(todo))
        # Workers run elsewhere (another folder, another machine sharing the file system):
        # local paths go absolute, and come back in messages as the user gave them.
        rows = [{"index": k, "input": _absolute(items[k].source), "output": _absolute(items[k].output),
                 "rel": str(items[k].rel)} for k in todo]
        log.info("%d inputs on %d Ray workers", len(rows), workers)
        ds = ray.data.from_items(rows, override_num_blocks=min(len(rows), workers * BLOCKS_PER_WORKER))
        # The driver has decided which outputs to write: a retried block (its worker killed)
        # replaces the outputs it had written before, rather than refusing them.
        ds = ds.map_batches(Editor, fn_constructor_kwargs=dict(edit=ray.put(edit), quality=quality,
                                                               overwrite=True, threads=threads),
                            batch_size=1, compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=1,
                            num_gpus=1 if gpus else 0)
        for row in ds.iter_rows():
            item = items[_plain(row["index"])]
            error = _plain(row["error"])
            for given, sent in ((item.name, row["input"]), (item.output_name, row["output"])):
                error = error and error.replace(str(sent), given)
            yield Result(item.name, item.output_name, _plain(row["status"]), _plain(row["seconds"]), error)
    finally:
        if started:
            ray.shutdown()


def _absolute(path: Path | Any) -> str:
    return str(path.absolute() if isinstance(path, Path) else path)


def _plain(value: Any) -> Any:
    """Numpy scalars (as Ray Data returns them) as Python's."""
    return value.item() if hasattr(value, "item") else value
