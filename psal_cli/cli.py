"""The `psal` command line: parse, call the library, report.

`inpaint`, `colorize` and `upscale` share one pipeline (`_run`): the same
input/output/device options (declared once, as Annotated types), batch loop, progress,
JSON summary and exit statuses (0 all done, 1 some inputs failed, 2 usage error). Each
command only says how to load its model and edit one image.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from psal_cli import __version__
from psal_cli.choices import DEGRADATIONS, LOSSES, MASK_FAMILIES, PRECISIONS

log = logging.getLogger("psal")

app = typer.Typer(
    name="psal",
    rich_markup_mode="rich",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


class Task(str, Enum):
    inpaint = "inpaint"
    colorize = "colorize"
    upscale = "upscale"


# The library's choices, from the module that lets `--help` stay free of torch.
Masks = Enum("Masks", {name: name for name in MASK_FAMILIES}, type=str)
Loss = Enum("Loss", {name: name for name in LOSSES}, type=str)
Degradation = Enum("Degradation", {name: name for name in DEGRADATIONS}, type=str)
Precision = Enum("Precision", {name: name for name in PRECISIONS}, type=str)


# -- shared options: each declared once, as an Annotated type the commands' signatures use ----

IO, BATCH, RUN, CLUSTER = "Input and output", "Batches", "Device and tiling", "Many machines"
DEVICE_HELP, THREADS_HELP, DEBUG_HELP = ("auto, cpu, cuda, cuda:N or mps.", "CPU threads. Default: the idle cores.",
                                         "Show tracebacks and debug messages.")

Inputs = Annotated[list[str], typer.Argument(
    metavar="INPUT", show_default=False,
    help="Image files, folders or glob patterns; [bold]-[/] reads standard input.")]
Output = Annotated[str | None, typer.Option(
    "--output", "-o", metavar="PATH", rich_help_panel=IO,
    help="Output file (one input), folder (several inputs; their relative layout is kept) "
    "or [bold]-[/] for standard output. Default: beside each input, with --suffix.")]
Model = Annotated[Path | None, typer.Option(
    "--model", "-m", metavar="FILE", rich_help_panel=IO,
    help="Model file (.safetensors). Default: the installed one in weights/ (see [bold]psal models[/]).")]
UpscaleModel = Annotated[Path | None, typer.Option(
    "--model", "-m", metavar="FILE|real|bicubic", rich_help_panel=IO,
    help="Model file (.safetensors), or [bold]real[/] or [bold]bicubic[/]: that family of installed networks. "
    "Default: chosen per input, as said above.")]
Quality = Annotated[int | None, typer.Option(
    "--quality", min=1, max=100, rich_help_panel=IO, help="JPEG/WebP quality, 1-100.  [dim]\\[default: 95][/]")]
Recursive = Annotated[bool, typer.Option(
    "--recursive", "-r", rich_help_panel=BATCH, help="Descend into sub-folders of folder inputs.")]
Suffix = Annotated[str | None, typer.Option(
    "--suffix", rich_help_panel=BATCH,
    help="Added to each output file name's stem. Default: none with -o DIR, else _upscaled, _colorized or _inpainted.")]
Ext = Annotated[str | None, typer.Option(
    "--ext", rich_help_panel=BATCH, help="Output format for -o DIR or standard output (png, jpg, webp, tif, "
    "bmp). Default: the input's (PNG for a format psal cannot write).")]
Overwrite = Annotated[bool, typer.Option(
    "--overwrite", rich_help_panel=BATCH, help="Replace existing outputs (inputs are never replaced).")]
SkipExisting = Annotated[bool, typer.Option(
    "--skip-existing", rich_help_panel=BATCH, help="Skip inputs whose output exists: resumes a batch.")]
Shard = Annotated[str | None, typer.Option(
    "--shard", metavar="I/N|auto", rich_help_panel=BATCH,
    help="Process only the I-th (1..N) of N deterministic slices of the inputs. [bold]auto[/]: this task's "
    "slice of a SLURM job array or Kubernetes Indexed Job (auto/N: of N slices).")]
JsonSummary = Annotated[bool, typer.Option(
    "--json", rich_help_panel=BATCH,
    help="Print one JSON summary on standard output (per input: output, seconds, status, error).")]
Quiet = Annotated[bool, typer.Option(
    "--quiet", "-q", rich_help_panel=BATCH, help="Print errors only: no progress, no per-file lines.")]
Debug = Annotated[bool, typer.Option("--debug", rich_help_panel=BATCH, help=DEBUG_HELP)]
Device = Annotated[str, typer.Option("--device", "-d", rich_help_panel=RUN, help=DEVICE_HELP)]
Half = Annotated[bool, typer.Option(
    "--half", rich_help_panel=RUN, help="Run the convolutions in float16 on a GPU (patch searches stay float32).")]
Threads = Annotated[int | None, typer.Option("--threads", min=1, rich_help_panel=RUN, help=THREADS_HELP)]
PRECISION_HELP = ("The convolutions on the CPU: bf16 (bfloat16, several times faster where the CPU has it "
                  "natively), fp32, or auto: bf16 where native for the networks it keeps as accurate (the "
                  "upscalers), else fp32. Patch searches stay float32.")
PrecisionOption = Annotated[Precision, typer.Option(
    "--precision", case_sensitive=False, rich_help_panel=RUN, help=PRECISION_HELP)]
Seed = Annotated[int, typer.Option(
    "--seed", rich_help_panel=RUN,
    help="Random seed (PSAL's patch search is stochastic): same seed, device and input, same output.")]
Tile = Annotated[int | None, typer.Option(
    "--tile", min=0, metavar="PIXELS", rich_help_panel=RUN,
    help="Tile size for local stages; 0 = whole image.  [dim]\\[default: auto, from memory][/]")]
TileOverlap = Annotated[int | None, typer.Option(
    "--tile-overlap", min=0, metavar="PIXELS", rich_help_panel=RUN,
    help="Tile overlap.  [dim]\\[default: each stage's receptive field: seamless][/]")]
Ray = Annotated[bool, typer.Option(
    "--ray", rich_help_panel=CLUSTER,
    help="Run the batch on a Ray cluster: the one RAY_ADDRESS names (as [bold]ray job submit[/] sets it), "
    "else a local one started for the run. Needs [bold]pip install \"psal-cli\\[ray]\"[/].")]
RayAddress = Annotated[str | None, typer.Option(
    "--ray-address", metavar="ADDRESS", rich_help_panel=CLUSTER,
    help="--ray on this cluster: [bold]auto[/] (the one running on this machine), HOST:PORT or "
    "ray://HOST:PORT.")]
Workers = Annotated[int | None, typer.Option(
    "--workers", min=1, metavar="N", rich_help_panel=CLUSTER,
    help="Ray workers, each loading the model once, with one CPU (one GPU with --device cuda). "
    "[dim]\\[default: the cluster's CPUs (GPUs)][/]")]


@dataclass
class Common:
    """The options every image command takes (the parameters of the same names)."""

    inputs: list[str]
    output: str | None
    model: Path | None
    quality: int | None
    recursive: bool
    suffix: str | None
    ext: str | None
    overwrite: bool
    skip_existing: bool
    shard: str | None
    json_summary: bool
    quiet: bool
    debug: bool
    device: str
    half: bool
    precision: Precision
    threads: int | None
    seed: int
    tile: int | None
    tile_overlap: int | None
    ray: bool
    ray_address: str | None
    workers: int | None

    @classmethod
    def of(cls, arguments: dict[str, Any]) -> Common:
        """The shared options among a command's arguments (its `locals()`)."""
        return cls(**{f.name: arguments[f.name] for f in fields(cls)})


@dataclass
class Invocation:
    """What a command's body gets: the options, and how to load its model and report tiles."""

    task: str
    common: Common
    options: Any  # engine.Options
    on_tile: Callable[[int, int], None]

    def load_model(self, scale: int | None = None, family: str | None = None) -> Any:
        """--model FILE, or the installed default (for upscale: of that `scale` and `family`,
        modelfile.UPSCALE_FAMILIES); exits with one clear line if there is none."""
        from psal_cli.modelfile import default_model_path, load_model

        path = self.common.model
        if path is None or family is not None:
            path = default_model_path(self.task, scale, family or "bicubic") if scale else default_model_path(self.task)
            if not path.exists():
                real = family == "real"
                what = ("real-photo " if real else "") + (f"{self.task} ×{scale}" if scale else self.task)
                how = " --degradation real" if real else ""
                raise NoModel(f"no trained {what} model is installed (looked for {path}); "
                              f"pass --model FILE, or train one with `psal train {self.task}{how}`")
        elif not path.exists():
            raise _usage(f"--model {path}: no such file")
        model, info = load_model(path, task=self.task)
        log.debug("model %s: %s %s", path, info.architecture, info.config)
        return model


class NoModel(Exception):
    """No model installed for the command (exit status 1, one line)."""


def _usage(message: str) -> Exception:
    from psal_cli.batch import UsageError

    return UsageError(message)


# -- the shared pipeline ------------------------------------------------------------------


class _Stderr(logging.Handler):  # looks up sys.stderr at each call: progress bars redirect it
    def emit(self, record: logging.LogRecord) -> None:
        prefix = "" if record.levelno == logging.INFO else f"{record.levelname.lower()}: "
        print(f"{prefix}{record.getMessage()}", file=sys.stderr)


class _OtherLibraries(logging.Handler):
    """Other libraries' records (asyncio's "exception was never retrieved" when a store drops a
    connection) detail a failure psal reports in its own line: shown with --debug only."""

    def emit(self, record: logging.LogRecord) -> None:
        if not record.name.startswith("psal"):
            print(self.format(record), file=sys.stderr)


def _setup_logging(quiet: bool, debug: bool) -> None:
    log.handlers[:] = [_Stderr()]
    log.setLevel(logging.DEBUG if debug else logging.ERROR if quiet else logging.INFO)
    # A root handler also keeps logging's last resort from printing their tracebacks.
    root = logging.getLogger()
    root.handlers[:] = [h for h in root.handlers if not isinstance(h, _OtherLibraries)]
    root.addHandler(_OtherLibraries(logging.DEBUG if debug else logging.CRITICAL + 1))


def _message(e: Exception) -> str:
    """The one line a user sees for a failure: its message, or an internal error named as such."""
    from psal_cli.modelfile import ModelFileError

    if isinstance(e, (NoModel, ModelFileError, ValueError, OSError)):
        return str(e)
    return f"internal error: {type(e).__name__}: {e} (run with --debug for details)"


def _run(task: str, c: Common, body: Callable[[Invocation], Callable[..., Any]]) -> int:
    """Run the batch and report: per-file lines, JSON summary; returns the exit status."""
    _setup_logging(c.quiet, c.debug)
    from psal_cli.batch import UsageError

    results: list[Any] = []
    error, code = None, 0
    try:
        _batch(task, c, body, results)
        code = 1 if any(r.status == "failed" for r in results) else 0
    except UsageError as e:
        error, code = str(e), 2
    except KeyboardInterrupt:
        error, code = "interrupted", 130
    except Exception as e:  # noqa: BLE001 - a user never sees a traceback without --debug
        if c.debug:
            raise
        error, code = _message(e), 1
    if error:
        log.error("%s", error)
    counts = {s: sum(r.status == s for r in results) for s in ("done", "skipped", "failed")}
    if c.json_summary:
        typer.echo(json.dumps({"command": task, **counts, "error": error,
                               "results": [asdict(r) for r in results]}, indent=2))
    if len(results) > 1 or counts["failed"]:
        log.info("%s", ", ".join(f"{n} {s}" for s, n in counts.items() if n))
    return code


def _batch(task: str, c: Common, body: Callable[[Invocation], Callable[..., Any]],
           results: list[Any]) -> None:
    """Plan the outputs, load the model, process every input; appends to `results` as it goes."""
    from psal_cli import batch
    from psal_cli.engine import Options, resolve_device

    if c.json_summary and c.output == batch.STDIO:
        raise batch.UsageError("--json and -o - both write to standard output; use one")
    items = batch.expand_inputs(c.inputs, recursive=c.recursive)
    items = batch.plan_outputs(items, c.output, batch=batch.is_batch(c.inputs), suffix=c.suffix,
                               ext=c.ext, default_suffix=f"_{task.removesuffix('e')}ed")
    items = batch.shard(items, c.shard)
    if c.ray or c.ray_address:
        return _ray_batch(task, c, body, items, results)
    if c.workers is not None:
        raise batch.UsageError("--workers is the number of Ray workers: give --ray too")
    if any(i.output is None for i in items) and _binary(sys.stdout).isatty():
        raise batch.UsageError("refusing to write an image to the terminal; give -o FILE")
    if any(i.source is None for i in items) and _binary(sys.stdin).isatty():
        raise batch.UsageError("- reads an image from standard input, but it is a terminal; pipe one in")
    try:
        device = resolve_device(c.device)
    except ValueError as e:
        raise batch.UsageError(f"--device: {e}") from None
    half = c.half
    if half and device.type == "cpu":  # said once here, not by the engine for every image
        log.warning("--half has no effect on the CPU: running in float32")
        half = False
    cores = SharedCores(c.threads)
    options = Options(device=c.device, tile=c.tile, tile_overlap=c.tile_overlap, half=half,
                      precision=c.precision.value, seed=c.seed)
    # --ext names every output that goes to standard output (-o -, or - in without -o).
    stdout_format = batch.FORMATS[batch.normalise_ext(c.ext)] if c.ext else None
    from psal_cli.imageio import large_images

    with large_images(), Reporter(len(items), enabled=not c.quiet and sys.stderr.isatty()) as reporter:
        def on_tile(done: int, total: int) -> None:
            reporter.tile(done, total)
            cores.tile(done, total)

        process = body(Invocation(task, c, options, on_tile))
        for result in batch.run_batch(
                items, process, stdin=_binary(sys.stdin),
                stdout=_binary(sys.stdout), quality=c.quality,
                overwrite=c.overwrite, skip_existing=c.skip_existing,
                stdout_format=stdout_format, debug=c.debug):
            reporter.done(result)
            results.append(result)


def _ray_batch(task: str, c: Common, body: Callable[[Invocation], Callable[..., Any]], items: list[Any],
               results: list[Any]) -> None:
    """`_batch` on a Ray cluster: the model is loaded here, once, and shipped to the workers
    (which need no weights of their own); results are reported as they come, then listed
    in input order."""
    from psal_cli import ray
    from psal_cli.engine import Options

    options = Options(device=c.device, tile=c.tile, tile_overlap=c.tile_overlap, half=c.half,
                      precision=c.precision.value, seed=c.seed)
    edit = body(Invocation(task, c, options, on_tile=None))
    order = {item.name: k for k, item in enumerate(items)}
    with Reporter(len(items), enabled=not c.quiet and sys.stderr.isatty()) as reporter:
        for result in ray.run_batch(items, edit, address=c.ray_address, workers=c.workers,
                                    gpus=c.device.startswith("cuda"), quality=c.quality, overwrite=c.overwrite,
                                    skip_existing=c.skip_existing, threads=c.threads):
            reporter.done(result)
            results.append(result)
    results.sort(key=lambda r: order[r.input])


def _binary(stream: Any) -> Any:
    """The byte stream under a text stream (images are bytes); test runners may pass a byte stream."""
    return getattr(stream, "buffer", stream)


class Reporter:
    """Per-file lines on stderr, and Rich progress bars (files, tiles) when stderr is a terminal."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled = total, enabled
        self.progress: Any = None

    def __enter__(self) -> Reporter:
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeRemainingColumn(), console=Console(stderr=True), redirect_stdout=False,
                transient=True)
            self.progress.__enter__()
            self.files = self.progress.add_task("images", total=self.total)
            self.tiles = self.progress.add_task("tiles", total=None, visible=False)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress:
            self.progress.__exit__(*exc)

    def tile(self, done: int, total: int) -> None:
        if self.progress:
            self.progress.update(self.tiles, completed=done, total=total, visible=total > 1)

    def done(self, result: Any) -> None:
        if self.progress:
            self.progress.update(self.tiles, visible=False, completed=0)
            self.progress.advance(self.files)
        if result.status == "failed":
            log.error("%s", result.error)
        elif result.status == "skipped":
            log.info("skipped %s: %s exists", result.input, result.output)
        else:
            log.info("%s -> %s (%.1f s)", result.input, result.output, result.seconds)


# -- commands -----------------------------------------------------------------------------


# Each command checks its own options and loads its model in `body`, which returns the
# per-image function `(item, image) -> image`; `_run` does everything else.


@app.command("inpaint")
def inpaint(
    inputs: Inputs,
    mask: Annotated[str | None, typer.Option(
        "--mask", "-M", metavar="FILE|DIR",
        help="Mask image, non-zero = hole: one for all inputs, or a folder matched by file stem.")] = None,
    invert_mask: Annotated[bool, typer.Option(
        "--invert-mask", help="Treat zero as hole instead.")] = False,
    mask_from_alpha: Annotated[bool, typer.Option(
        "--mask-from-alpha", help="The hole is the input's transparent (alpha < max) pixels.")] = False,
    dilate: Annotated[int, typer.Option(
        "--dilate", min=0, metavar="PIXELS", help="Grow the hole by this many pixels.")] = 0,
    output: Output = None, model: Model = None, quality: Quality = None, recursive: Recursive = False,
    suffix: Suffix = None, ext: Ext = None, overwrite: Overwrite = False, skip_existing: SkipExisting = False,
    shard: Shard = None, json_summary: JsonSummary = False, quiet: Quiet = False, debug: Debug = False,
    device: Device = "auto", half: Half = False, precision: PrecisionOption = Precision.auto, threads: Threads = None, seed: Seed = 0, tile: Tile = None,
    tile_overlap: TileOverlap = None, ray: Ray = False,
    ray_address: RayAddress = None, workers: Workers = None,
) -> None:
    """Fill the holes a mask marks; known pixels are kept exactly.

    [bold]Examples[/]

      psal inpaint photo.png --mask hole.png -o filled.png

      psal inpaint photos/ --mask masks/ --dilate 4 -o filled/

      psal inpaint cutout.png --mask-from-alpha -o filled.png

    [dim]Masks in a folder are matched to the inputs by file name.[/]
    """
    common = Common.of(locals())

    def body(call: Invocation) -> Callable[..., Any]:
        from psal_cli import batch, edit

        if (mask is None) == (not mask_from_alpha):
            raise _usage("give either --mask FILE|DIR or --mask-from-alpha")
        masks = batch.Companions(mask, "mask") if mask else None
        return edit.Inpainter(call.load_model(), call.options, masks, invert_mask, dilate, call.on_tile)

    raise typer.Exit(_run("inpaint", common, body))


@app.command("colorize")
def colorize(
    inputs: Inputs,
    reference: Annotated[str, typer.Option(
        "--reference", "-R", metavar="FILE|DIR", show_default=False,
        help="Colour reference: one image for all inputs, or a folder matched by file stem.")],
    output: Output = None, model: Model = None, quality: Quality = None, recursive: Recursive = False,
    suffix: Suffix = None, ext: Ext = None, overwrite: Overwrite = False, skip_existing: SkipExisting = False,
    shard: Shard = None, json_summary: JsonSummary = False, quiet: Quiet = False, debug: Debug = False,
    device: Device = "auto", half: Half = False, precision: PrecisionOption = Precision.auto, threads: Threads = None, seed: Seed = 0, tile: Tile = None,
    tile_overlap: TileOverlap = None, ray: Ray = False,
    ray_address: RayAddress = None, workers: Workers = None,
) -> None:
    """Colour gray images after a colour reference; colour inputs are reduced to gray first.

    [bold]Examples[/]

      psal colorize gray.png --reference colour.jpg -o out.png

      psal colorize scans/ --reference refs/ -o coloured/

    [dim]References in a folder are matched to the inputs by file name.[/]
    """
    common = Common.of(locals())

    def body(call: Invocation) -> Callable[..., Any]:
        from psal_cli import batch, edit

        refs = batch.Companions(reference, "reference")
        return edit.Colorizer(call.load_model(), call.options, refs, call.on_tile)

    raise typer.Exit(_run("colorize", common, body))


@app.command("upscale")
def upscale(
    inputs: Inputs,
    scale: Annotated[int | None, typer.Option(
        "--scale", "-s", min=2, max=4, help="Enlargement factor; picks the installed networks of that scale "
        "(upscale-x<scale>, upscale-real-x<scale>). [dim]\\[default: 4, or the --model FILE's][/]")] = None,
    ensemble: Annotated[bool, typer.Option(
        "--ensemble", help="Average 8 flipped/rotated runs (self-ensemble): a little more accurate, 8× slower.")] = False,
    output: Output = None, model: UpscaleModel = None, quality: Quality = None, recursive: Recursive = False,
    suffix: Suffix = None, ext: Ext = None, overwrite: Overwrite = False, skip_existing: SkipExisting = False,
    shard: Shard = None, json_summary: JsonSummary = False, quiet: Quiet = False, debug: Debug = False,
    device: Device = "auto", half: Half = False, precision: PrecisionOption = Precision.auto, threads: Threads = None, seed: Seed = 0, tile: Tile = None,
    tile_overlap: TileOverlap = None, ray: Ray = False,
    ray_address: RayAddress = None, workers: Workers = None,
) -> None:
    """Enlarge images by 2, 3 or 4; alpha is enlarged alongside.

    Two families of installed networks: [bold]real[/] (upscale-real-x*, trained on blurred, noisy, JPEG-compressed photos) and [bold]bicubic[/] (upscale-x*, trained on clean reductions: sharper on clean images, but it sharpens noise and JPEG blocks too).

    By default a JPEG input or one with visible noise gets [bold]real[/], any other [bold]bicubic[/], and a line says which and why; [bold]--model real[/] or [bold]--model bicubic[/] forces one, [bold]--model FILE[/] uses that file.

    [bold]Examples[/]

      psal upscale photo.jpg --scale 4 -o photo_x4.png

      psal upscale photos/ -r -o big/ --ext webp --quality 90

      cat small.png | psal upscale - -o - > big.png
    """
    common = Common.of(locals())

    def body(call: Invocation) -> Callable[..., Any]:
        from psal_cli import edit
        from psal_cli.modelfile import UPSCALE_FAMILIES, default_model_path

        if ensemble:
            call.options.views = 8
        forced = str(call.common.model) if str(call.common.model) in UPSCALE_FAMILIES else None
        if call.common.model is not None and forced is None:  # a model file
            model = call.load_model()
            if scale and model.config.scale != scale:
                raise _usage(f"--scale {scale}, but {call.common.model} is a ×{model.config.scale} model")
            return edit.Upscaler(model, call.options, call.on_tile)
        paths = {family: default_model_path("upscale", scale or 4, family) for family in UPSCALE_FAMILIES}
        if forced:
            model = call.load_model(scale or 4, forced)
            log.info("%s (--model %s)", paths[forced].stem, forced)
            return edit.Upscaler(model, call.options, call.on_tile)
        clean = call.load_model(scale or 4, "bicubic")
        if not paths["real"].exists():  # ×3: one network for every input
            log.info("%s enlarges every input (no real-photo ×%d network is installed)", paths["bicubic"].stem, scale or 4)
            return edit.Upscaler(clean, call.options, call.on_tile)
        return edit.Upscaler(clean, call.options, call.on_tile, call.load_model(scale or 4, "real"),
                             (paths["bicubic"].stem, paths["real"].stem))

    raise typer.Exit(_run("upscale", common, body))


@app.command()
def models(
    files: Annotated[list[Path] | None, typer.Argument(
        metavar="FILE", show_default=False, help="Model files to describe too.")] = None,
    json_summary: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List the installed models (weights/) and the given files: architecture, task, scale,
    parameters, size and the metrics `psal eval` measured.

    A damaged or foreign file is listed with its problem (exit status 1).
    """
    from psal_cli.modelfile import ModelFileError, default_model_path, read_info, weights_dir, weights_source

    wdir, source = weights_dir(), weights_source()
    installed = sorted(wdir.glob("*.safetensors")) if wdir.is_dir() else []
    paths = installed + [p for p in files or [] if p not in installed]
    rows, bad = [], 0
    for path in paths:
        found = source if path in installed else "given"  # where the file was found
        try:
            info = read_info(path)
            rows.append({"file": str(path), "found": found, "architecture": info.architecture,
                         "task": info.task, "scale": info.scale, "parameters": info.parameters,
                         "size": info.size, "metrics": info.metrics, "training": info.training,
                         "error": None})
        except ModelFileError as e:
            bad += 1
            rows.append({"file": str(path), "found": found, "error": e.problem})
    defaults = [default_model_path(t.value, s) for t in Task for s in ((2, 3, 4) if t == Task.upscale else (None,))]
    defaults += [default_model_path("upscale", s, "real") for s in (2, 4)]
    missing = [str(p) for p in defaults if not p.exists()]
    if json_summary:
        typer.echo(json.dumps({"weights": str(wdir), "found": source, "models": rows,
                               "not_installed": missing}, indent=2))
    else:
        _print_models(rows, missing, wdir, source)
    raise typer.Exit(1 if bad else 0)


_SOURCES = {"$PSAL_WEIGHTS": "$PSAL_WEIGHTS", "package": "the installed package",
            "checkout": "the source checkout"}

# The classical methods `psal eval` measures beside each model (psal_cli/tasks): their
# figures stay in the file and in `psal models --json`, out of the table.
_BASELINES = ("bicubic", "lanczos", "mean", "telea", "ns", "patchmatch", "reinhard", "nearest")


def _print_models(rows: list[dict[str, Any]], missing: list[str], wdir: Path, source: str) -> None:
    from rich.console import Console
    from rich.table import Table

    def name(r: dict[str, Any]) -> str:
        path = Path(r["file"])
        return path.stem if path.parent == wdir else str(path)

    good = [r for r in rows if not r["error"]]
    table = Table(box=None, header_style="bold", title_justify="left",
                  title=f"[bold]models[/] (installed ones in {wdir}, found by {_SOURCES[source]})")
    table.add_column("model", overflow="fold")
    for column in ("architecture", "task", "scale", "trained for", "params", "size"):
        table.add_column(column, no_wrap=True)
    for r in good:
        table.add_row(name(r), r["architecture"], r["task"], str(r["scale"] or ""), _trained_for(r),
                      _human(r["parameters"], ""), _human(r["size"], "B"))
    # The figures in a table of their own: beside six columns they would be folded mid-word.
    figures = Table(box=None, header_style="bold", title_justify="left", caption_justify="left",
                    title="[bold]PSNR dB[/] measured by psal eval (--json: every figure)",
                    caption="DATA.psnr: psal eval on the folder DATA (val: BSD100); real_psnr: camera-like inputs "
                    "(blur, noise, JPEG). val_crops_, selection_: training's own check on centre crops of a "
                    "few BSD100 photos, or of the photos it held out.")
    figures.add_column("model", no_wrap=True)
    figures.add_column("figures")
    for r in good:
        own = [(k, v) for k, v in _numbers(r["metrics"]) if k.endswith("psnr") and not any(b in k for b in _BASELINES)]
        figures.add_row(name(r), " ".join(f"{k}={v:.2f}" for k, v in own) or "[dim]not evaluated[/]")
    console = Console()
    if good:
        console.print(table)
        console.print(figures)
    for r in rows:
        if r["error"]:
            console.print(f"[red]{r['file']}: {r['error']}[/]", highlight=False)
    for path in missing:
        console.print(f"[dim]not installed: {path}[/]", highlight=False)


def _trained_for(row: dict[str, Any]) -> str:
    """An upscaler's family: the degradation its training undid (`psal train --degradation`)."""
    if row["task"] != "upscale":
        return ""
    degradation = row["training"].get("degradation", {})
    return "real photos" if isinstance(degradation, dict) and degradation.get("name") == "real" else "clean"


def _numbers(metrics: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    """The numeric figures of (possibly nested) metrics, as dotted names: Set5.psnr."""
    for key, value in metrics.items():
        if isinstance(value, dict):
            yield from _numbers(value, f"{prefix}{key}.")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield f"{prefix}{key}", value


def _human(n: int, unit: str) -> str:
    for prefix in ("", "k", "M", "G"):
        if n < 1000:
            return f"{n:.3g} {prefix}{unit}".strip()
        n /= 1000
    return f"{n:.3g} T{unit}"


# -- training and evaluation (psal_cli.tasks.<task>) --------------------------------------


TaskArg = Annotated[Task, typer.Argument(help="inpaint, colorize or upscale.", show_default=False)]
SHARED_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"  # beside a source checkout


def _default_data(split: str) -> Path:
    """../shared/data/<split> beside the source checkout, or beside the current folder.

    The benchmark photos are not shipped (research-use licences), so an installed psal
    without them asks for --data rather than naming a path inside its own environment.
    """
    for folder in (SHARED_DATA / split, Path("..", "shared", "data", split).resolve()):
        if folder.is_dir():
            return folder
    raise typer.BadParameter(f"no folder ../shared/data/{split} beside psal's checkout or the current folder "
                             "(the benchmark sets are not shipped with psal): give a folder of photos", param_hint="--data")


def _task_call(task: Task, function: str, given: dict[str, Any]) -> Any:
    """Call psal_cli.tasks.<task>.<function> with the options the user gave (others: its defaults).

    An option the task's function does not take is a usage error naming it.
    """
    import importlib

    fn = getattr(importlib.import_module(f"psal_cli.tasks.{task.value}"), function)
    accepted = inspect.signature(fn).parameters
    given = {k: v for k, v in given.items() if v is not None}
    for name in given:
        if name not in accepted:
            raise typer.BadParameter(f"does not apply to {task.value}",
                                     param_hint=f"--{name.replace('_', '-')}")
    return fn(**given)


@contextmanager
def _reported(debug: bool) -> Iterator[None]:
    """One line and exit status 1 for a failure (`debug`: the traceback), 130 for Ctrl-C (the last checkpoint stays)."""
    try:
        yield
    except KeyboardInterrupt:
        log.error("interrupted")
        raise typer.Exit(130) from None
    except (typer.BadParameter, typer.Exit, typer.Abort):
        raise  # usage errors (BadParameter) and exit statuses: Typer reports them
    except Exception as e:  # noqa: BLE001 - a user never sees a traceback without --debug
        if debug:
            raise
        log.error("%s", _message(e))
        raise typer.Exit(1) from None


def _device(name: str) -> str:
    from psal_cli.engine import resolve_device

    try:
        return str(resolve_device(name))
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--device") from None


def _existing(path: Path | None, what: str) -> Path | None:
    if path is not None and not path.exists():
        raise typer.BadParameter(f"{path}: no such file or folder", param_hint=what)
    return path


def _folder(path: Path, what: str) -> Path:
    if not _existing(path, what).is_dir():
        raise typer.BadParameter(f"{path}: not a folder", param_hint=what)
    return path


def _threads(threads: int | None) -> None:
    import torch

    torch.set_num_threads(threads or default_threads())


def default_threads() -> int:
    """The cores this process may use, less those other work keeps busy now (at least one).

    A thread pool larger than the idle cores makes every small tensor operation wait for a
    descheduled thread. What is busy is read from the kernel's count of runnable threads at
    start-up, not from the load average: that one lags by a minute, so a run right after
    another (a shell loop) would take the previous run's threads for other work.
    """
    return _idle_cores(round(_busy_threads()))


def _idle_cores(others: int) -> int:
    """The cores this process may use less `others` running threads of other work; at least one."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, cores - others))


def _busy_threads() -> float:
    """Threads of other work running now: the median of a few reads of /proc/loadavg's
    runnable count, less this process's one (the 1-minute load average without /proc)."""
    samples = []
    for _ in range(3):  # a median of three, 5 ms apart: a moment's blip does not count, start-up stays quick
        running = _runnable()
        if running is None:
            return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        samples.append(running - 1)
        # Waited out running, not asleep: two processes started together read at the same
        # moments, and asleep each missed the other (both took every core: 10× slower).
        end = time.perf_counter() + 0.005
        while time.perf_counter() < end:
            pass
    return sorted(samples)[1]


class SharedCores:
    """psal's default threads kept right while a batch runs: between tiles, at most once a
    second, the threads become the idle cores again (others' runnable threads, from the
    kernel's count less this process's own). A process that started alone then gives a core
    to one that starts later, and takes it back when that one ends. `--threads` fixes them."""

    def __init__(self, threads: int | None) -> None:
        self.fixed = threads is not None
        _threads(threads)
        self.due = time.monotonic() + 1.0

    def tile(self, done: int, total: int) -> None:
        if self.fixed or time.monotonic() < self.due:
            return
        import torch

        self.due = time.monotonic() + 1.0
        running = _runnable()
        if running is None:
            return
        others = max(0, running - _own_runnable())
        threads = _idle_cores(others)
        if threads != torch.get_num_threads():
            log.debug("%d other threads running: %d threads", others, threads)
            torch.set_num_threads(threads)


def _runnable() -> int | None:
    """Runnable threads on the machine now (/proc/loadavg), or None without /proc."""
    try:
        return int(Path("/proc/loadavg").read_text().split()[3].split("/")[0])
    except (OSError, IndexError, ValueError):
        return None


def _own_runnable() -> int:
    """This process's runnable threads: its thread pool's, spinning or working, and this one."""
    count = 0
    for task in Path("/proc/self/task").glob("*/stat"):
        try:
            count += task.read_text().rsplit(")", 1)[1].split()[0] == "R"
        except (OSError, IndexError):
            pass  # a thread that ended meanwhile
    return max(1, count)


@app.command()
def train(
    task: TaskArg,
    output: Annotated[Path, typer.Option(
        "--output", "-o", metavar="FILE", show_default=False,
        help="Model file to write (.safetensors); checkpoints replace it as training goes.")],
    data: Annotated[list[Path] | None, typer.Option(
        "--data", metavar="DIR", show_default=False, help="Folder of training photos; inpaint, upscale: repeat for several.  "
        "[dim]\\[default: ../shared/data/train][/]")] = None,
    scale: Annotated[int | None, typer.Option("--scale", min=2, max=4, help="upscale: 2, 3 or 4.")] = None,
    init: Annotated[Path | None, typer.Option(
        "--init", metavar="FILE", help="Resume (or fine-tune) from this model file.")] = None,
    steps: Annotated[int | None, typer.Option("--steps", min=1, help="Optimiser steps.")] = None,
    minutes: Annotated[float | None, typer.Option(
        "--minutes", min=0.1,
        help="Train for this long instead: the learning rate decays with the clock (--steps, if given, still caps it).")] = None,
    batch: Annotated[int | None, typer.Option("--batch", min=1, help="Crops per step.")] = None,
    patch: Annotated[int | None, typer.Option("--patch", min=8, help="Crop side in pixels.")] = None,
    lr: Annotated[float | None, typer.Option("--lr", min=0, help="Peak learning rate.")] = None,
    loss: Annotated[Loss | None, typer.Option(
        "--loss", help="upscale: l1 (default) or l2, the squared error PSNR measures (a last fine-tune).")] = None,
    device: Annotated[str, typer.Option("--device", "-d", help=DEVICE_HELP)] = "auto",
    threads: Annotated[int | None, typer.Option("--threads", min=1, help=THREADS_HELP)] = None,
    seed: Annotated[int, typer.Option("--seed", help="Random seed.")] = 0,
    attention: Annotated[bool | None, typer.Option(
        "--attention/--no-attention", help="upscale: --no-attention trains the ablation without the PSAL block.")] = None,
    deepen: Annotated[int | None, typer.Option(
        "--deepen", min=1, metavar="BLOCKS",
        help="upscale: add BLOCKS residual blocks after attention to the --init network, starting as the identity.")] = None,
    widen: Annotated[int | None, typer.Option(
        "--widen", min=1, metavar="CHANNELS",
        help="upscale: CHANNELS inside every residual block of the --init network, added ones starting at zero.")] = None,
    rescale: Annotated[float | None, typer.Option(
        "--rescale", min=0.1, max=1.0, metavar="FACTOR",
        help="upscale: half the crops are the photo reduced by a random factor in [FACTOR, 1] "
             "(more variety; no further than the photo's short side allows).")] = None,
    colors: Annotated[bool, typer.Option(
        "--shuffle-colors", help="upscale: permute each crop's RGB channels at random (more variety).")] = False,
    degradation: Annotated[Degradation | None, typer.Option(
        "--degradation", help="upscale: what the LR crops are: bicubic (the benchmarks' clean reduction, default) "
        "or real (random blur, resampling, noise and JPEG; every tenth photo of each folder is held out).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --output.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help=DEBUG_HELP)] = False,
) -> None:
    """Train a network on a folder of photos and write its model file.

    Defaults (steps, batch, crop, learning rate) are each task's, and a line at the start of the run states them; the model file records the data and steps, and [bold]--init[/] resumes from any checkpoint.

    [bold]Examples[/]

      psal train upscale --scale 4 -o my-run/upscale-x4.safetensors

      psal train inpaint --steps 200 -o /tmp/try.safetensors --device cuda
    """
    _setup_logging(quiet=False, debug=debug)
    data = data or [_default_data("train")]
    for folder in data:
        _folder(folder, "--data")
    if len(data) > 1 and task == Task.colorize:
        raise typer.BadParameter(f"several folders: {task.value} trains on one", param_hint="--data")
    _existing(init, "--init")
    if output.exists() and not overwrite and (init is None or init.resolve() != output.resolve()):
        raise typer.BadParameter(f"{output} exists (use --overwrite, or --init {output} to resume)",
                                 param_hint="--output")
    _threads(threads)
    if minutes is not None and steps is None:
        from psal_cli.training import UNTIL_THE_CLOCK

        steps = UNTIL_THE_CLOCK
    given = dict(data=data[0] if len(data) == 1 else data, out=output, scale=scale, init=init, steps=steps,
                 minutes=minutes, batch=batch, patch=patch, lr=lr, loss=loss and loss.value, device=_device(device),
                 seed=seed, attention=attention, deepen=deepen, widen=widen, rescale=rescale, colors=colors or None,
                 degradation=degradation and degradation.value)
    with _reported(debug):  # the output's folder is made when training starts (training.fit)
        _task_call(task, "train", given)
    log.info("wrote %s", output)


@app.command("eval")
def evaluate(
    task: TaskArg,
    model: Annotated[Path | None, typer.Option(
        "--model", "-m", metavar="FILE", help="Model file. Default: the installed one.")] = None,
    data: Annotated[Path | None, typer.Option(
        "--data", metavar="DIR", show_default=False,
        help="Evaluation photos (never trained on).  [dim]\\[default: ../shared/data/val][/]")] = None,
    scale: Annotated[int | None, typer.Option("--scale", min=2, max=4, help="upscale: 2, 3 or 4.")] = None,
    masks: Annotated[Masks | None, typer.Option("--masks", help="inpaint: thin, thick or box.")] = None,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="Only the first N photos.")] = None,
    size: Annotated[int | None, typer.Option(
        "--size", min=0, help="colorize: resize photos to this longest side first (0 = full size). [default: 320]")] = None,
    nearest: Annotated[bool | None, typer.Option(
        "--nearest/--no-nearest", help="colorize: also measure the exhaustive nearest-patch baseline (slow).")] = None,
    patchmatch: Annotated[bool | None, typer.Option(
        "--patchmatch", help="inpaint: also measure PatchMatch inpainting (15×15 patches; needs pypatchmatch; slow).")] = None,
    ensemble: Annotated[bool | None, typer.Option(
        "--ensemble", help="upscale: mean over 8 flipped/rotated views, as `psal upscale --ensemble`.")] = None,
    degradation: Annotated[Degradation | None, typer.Option(
        "--degradation", help="upscale: bicubic (the published protocol, default) or real: each photo blurred "
        "(σ 0.3-2 px), reduced by bicubic, bilinear or box, noisy (σ 0-8) and saved as JPEG (quality 40-90), "
        "a draw of its own seeded by --seed.")] = None,
    device: Annotated[str, typer.Option("--device", "-d", help=DEVICE_HELP)] = "auto",
    precision: Annotated[Precision, typer.Option(
        "--precision", case_sensitive=False, help="The convolutions on the CPU, as the image commands' --precision.")
    ] = Precision.auto,
    threads: Annotated[int | None, typer.Option("--threads", min=1, help=THREADS_HELP)] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Random seed.")] = None,
    json_report: Annotated[bool, typer.Option("--json", help="Print the full report as JSON.")] = False,
    save_metrics: Annotated[bool, typer.Option(
        "--save-metrics", help="Record the mean figures in the model file (shown by psal models).")] = False,
    debug: Annotated[bool, typer.Option("--debug", help=DEBUG_HELP)] = False,
) -> None:
    """Measure a model with the task's published protocol, beside classical baselines.

    Super-resolution: Y-channel PSNR/SSIM against bicubic and Lanczos; inpainting: PSNR, SSIM and hole error on seeded masks; colorization: PSNR and a,b error with the reference as is and flipped (README: Train and evaluate).

    [bold]Examples[/]

      psal eval upscale --scale 4 --data ../shared/data/set5 --save-metrics

      psal eval inpaint --masks thick --limit 10 --json

      psal eval colorize --size 320 --no-nearest
    """
    from psal_cli.modelfile import default_model_path, read_info, write_metrics

    _setup_logging(quiet=json_report, debug=debug)
    data = _folder(data or _default_data("val"), "--data")
    _existing(model, "--model")
    if save_metrics and limit:
        raise typer.BadParameter("records a data set's figures: measure all of it (no --limit)",
                                 param_hint="--save-metrics")
    _threads(threads)
    if save_metrics and model is None:
        model = default_model_path(task.value, scale or 4 if task == Task.upscale else None)
    given = dict(data=data, model=model, scale=scale, masks=masks and masks.value, limit=limit, size=size, nearest=nearest,
                 patchmatch=patchmatch, ensemble=ensemble, degradation=degradation and degradation.value,
                 device=_device(device), seed=seed, precision=precision.value)
    with _reported(debug):
        report = _task_call(task, "evaluate", given)
        module = sys.modules[f"psal_cli.tasks.{task.value}"]
        typer.echo(json.dumps(asdict(report), indent=2, default=str) if json_report else module.format_report(report))
        if save_metrics:  # kept per data set, beside what the file already records
            write_metrics(model, {**read_info(model).metrics, data.name: module.metrics_for_file(report)})
            log.info("metrics on %s recorded in %s", data.name, model)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"psal {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option(
        "--version", "-V", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """Edit images with neural networks built around PSAL, the Patch-based Stochastic Attention
    Layer: fill holes ([bold]inpaint[/]), colour gray photos after a reference
    ([bold]colorize[/]), enlarge ([bold]upscale[/]).

    Every command reads files, folders, globs or standard input (-) and writes atomically. Run [bold]psal COMMAND --help[/] for its options and examples.
    """


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds like Ctrl-C: temporary files are removed


def main() -> None:
    """Console entry point (`psal`, `python -m psal_cli`)."""
    # OMP_WAIT_POLICY stays the user's: OpenMP's default (spin a moment, then sleep) wakes the
    # pool at once for the next of many small convolutions; PASSIVE made each a wake-up.
    signal.signal(signal.SIGTERM, _terminate)
    app(prog_name="psal")
