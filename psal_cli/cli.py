"""The `psal` command line: parse, call the library, report.

`inpaint`, `colorize` and `upscale` share one pipeline (`batch_command`): the same
input/output/device options, batch loop, progress, JSON summary and exit statuses
(0 all done, 1 some inputs failed, 2 usage error). Each command only says how to load
its model and edit one image.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import click
import typer

from psal_cli import __version__

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


class Masks(str, Enum):
    """The mask families of psal_cli.tasks.inpaint.FAMILIES (here: `--help` must not import torch)."""

    thin = "thin"
    thick = "thick"
    box = "box"


class Precision(str, Enum):
    """engine.PRECISIONS (here: `--help` must not import torch)."""

    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"


class Loss(str, Enum):
    """The names of psal_cli.tasks.upscale.LOSSES (here: `--help` must not import torch)."""

    l1 = "l1"
    l2 = "l2"


# -- shared options -----------------------------------------------------------------------

IO, BATCH, RUN = "Input and output", "Batches", "Device and tiling"


def _opt(*names: str, help: str, panel: str, **kw: Any) -> typer.models.OptionInfo:
    return typer.Option(*names, help=help, rich_help_panel=panel, **kw)


# (name, annotation, default) of the options every image command takes, after its own.
COMMON: list[tuple[str, Any, Any]] = [
    ("output", Annotated[str | None, _opt(
        "--output", "-o", metavar="PATH", panel=IO,
        help="Output file (one input), folder (several inputs; their relative layout is kept) "
        "or [bold]-[/] for standard output. Default: beside each input, with --suffix.")], None),
    ("model", Annotated[Path | None, _opt(
        "--model", "-m", metavar="FILE", panel=IO,
        help="Model file (.safetensors). Default: the installed one in weights/ "
        "(see [bold]psal models[/]).")], None),
    ("quality", Annotated[int | None, _opt(
        "--quality", min=1, max=100, panel=IO,
        help="JPEG/WebP quality, 1-100.  [dim]\\[default: 95][/]")], None),
    ("recursive", Annotated[bool, _opt(
        "--recursive", "-r", panel=BATCH, help="Descend into sub-folders of folder inputs.")], False),
    ("suffix", Annotated[str | None, _opt(
        "--suffix", panel=BATCH,
        help="Added to each output file name's stem. Default: none with -o DIR, else _upscaled, _colorized or _inpainted.")],
     None),
    ("ext", Annotated[str | None, _opt(
        "--ext", panel=BATCH, help="Output format for -o DIR or standard output (png, jpg, webp, tif, "
        "bmp). Default: the input's (PNG for a format psal cannot write).")], None),
    ("overwrite", Annotated[bool, _opt(
        "--overwrite", panel=BATCH, help="Replace existing outputs (inputs are never replaced).")],
     False),
    ("skip_existing", Annotated[bool, _opt(
        "--skip-existing", panel=BATCH, help="Skip inputs whose output exists: resumes a batch.")],
     False),
    ("shard", Annotated[str | None, _opt(
        "--shard", metavar="I/N", panel=BATCH,
        help="Process only the I-th (1..N) of N deterministic slices of the inputs.")], None),
    ("json_summary", Annotated[bool, _opt(
        "--json", panel=BATCH,
        help="Print one JSON summary on standard output (per input: output, seconds, status, error).")],
     False),
    ("quiet", Annotated[bool, _opt(
        "--quiet", "-q", panel=BATCH, help="Print errors only: no progress, no per-file lines.")],
     False),
    ("debug", Annotated[bool, _opt(
        "--debug", panel=BATCH, help="Show tracebacks and debug messages.")], False),
    ("device", Annotated[str, _opt(
        "--device", "-d", panel=RUN, help="auto, cpu, cuda, cuda:N or mps.")], "auto"),
    ("half", Annotated[bool, _opt(
        "--half", panel=RUN, help="Run the convolutions in float16 on a GPU (patch searches stay float32).")], False),
    ("precision", Annotated[Precision, _opt(
        "--precision", panel=RUN, case_sensitive=False,
        help="The convolutions on the CPU: bf16 (bfloat16, several times faster where the CPU has it natively), "
        "fp32, or auto: bf16 where native (patch searches stay float32).")], Precision.auto),
    ("threads", Annotated[int | None, _opt(
        "--threads", min=1, panel=RUN,
        help="CPU threads. Default: the cores this process may use, less the machine's load.")], None),
    ("seed", Annotated[int, _opt(
        "--seed", panel=RUN,
        help="Random seed (PSAL's patch search is stochastic): same seed, device and input, "
        "same output.")], 0),
    ("tile", Annotated[int | None, _opt(
        "--tile", min=0, metavar="PIXELS", panel=RUN,
        help="Tile size for local stages; 0 = whole image.  [dim]\\[default: auto, from memory][/]")],
     None),
    ("tile_overlap", Annotated[int | None, _opt(
        "--tile-overlap", min=0, metavar="PIXELS", panel=RUN,
        help="Tile overlap.  [dim]\\[default: each stage's receptive field: seamless][/]")], None),
]

INPUTS = ("inputs", Annotated[list[str], typer.Argument(
    metavar="INPUT", show_default=False,
    help="Image files, folders or glob patterns; [bold]-[/] reads standard input.")])


@dataclass
class Common:
    """The parsed shared options."""

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


@dataclass
class Session:
    """What a command's body gets: the options, and how to load its model and report tiles."""

    task: str
    common: Common
    options: Any  # engine.Options
    on_tile: Callable[[int, int], None]

    def load_model(self, scale: int | None = None) -> Any:
        """--model, or the installed default; exits with one clear line if there is none."""
        from psal_cli.modelfile import default_model_path, load_model

        path = self.common.model
        if path is None:
            path = default_model_path(self.task, scale)
            if not path.exists():
                what = f"{self.task} ×{scale}" if scale else self.task
                raise NoModel(f"no trained {what} model is installed (looked for {path}); "
                              f"pass --model FILE, or train one with `psal train {self.task}`")
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


def batch_command(task: str, help_examples: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register `fn` as the `task` command, with INPUT... first and COMMON options after its own.

    `fn(session, **own_options)` checks its options, loads its model and returns the
    per-image function `(item, image) -> image`; everything else is shared.
    """

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY)  # drop `session`
               for p in list(inspect.signature(fn, eval_str=True).parameters.values())[1:]]
        kw = inspect.Parameter.KEYWORD_ONLY
        params = ([inspect.Parameter(INPUTS[0], kw, annotation=INPUTS[1])] + own
                  + [inspect.Parameter(n, kw, default=d, annotation=a) for n, a, d in COMMON])

        def command(**kwargs: Any) -> None:
            common = Common(**{n: kwargs.pop(n) for n in ["inputs"] + [c[0] for c in COMMON]})
            raise typer.Exit(_run(task, common, lambda session: fn(session, **kwargs)))

        command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        command.__doc__ = f"{inspect.getdoc(fn)}\n\n{help_examples}"
        app.command(task)(command)
        return fn

    return register


# -- the shared pipeline ------------------------------------------------------------------


def _setup_logging(quiet: bool, debug: bool) -> None:
    class Stderr(logging.Handler):  # looks up sys.stderr at each call: progress bars redirect it
        def emit(self, record: logging.LogRecord) -> None:
            prefix = "" if record.levelno == logging.INFO else f"{record.levelname.lower()}: "
            print(f"{prefix}{record.getMessage()}", file=sys.stderr)

    log.handlers[:] = [Stderr()]
    log.setLevel(logging.DEBUG if debug else logging.ERROR if quiet else logging.INFO)


def _message(e: Exception) -> str:
    """The one line a user sees for a failure: its message, or an internal error named as such."""
    from psal_cli.modelfile import ModelFileError

    if isinstance(e, (NoModel, ModelFileError, ValueError, OSError)):
        return str(e)
    return f"internal error: {type(e).__name__}: {e} (run with --debug for details)"


def _run(task: str, c: Common, body: Callable[[Session], Callable[..., Any]]) -> int:
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


def _batch(task: str, c: Common, body: Callable[[Session], Callable[..., Any]],
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
    if any(i.output is None for i in items) and click.get_binary_stream("stdout").isatty():
        raise batch.UsageError("refusing to write an image to the terminal; give -o FILE")
    if any(i.source is None for i in items) and click.get_binary_stream("stdin").isatty():
        raise batch.UsageError("- reads an image from standard input, but it is a terminal; pipe one in")
    try:
        device = resolve_device(c.device)
    except ValueError as e:
        raise batch.UsageError(f"--device: {e}") from None
    half = c.half
    if half and device.type == "cpu":  # said once here, not by the engine for every image
        log.warning("--half has no effect on the CPU: running in float32")
        half = False
    _threads(c.threads)
    options = Options(device=c.device, tile=c.tile, tile_overlap=c.tile_overlap, half=half,
                      precision=c.precision.value, seed=c.seed)
    # --ext names every output that goes to standard output (-o -, or - in without -o).
    stdout_format = batch.FORMATS[batch.normalise_ext(c.ext)] if c.ext else None
    with Reporter(len(items), enabled=not c.quiet and sys.stderr.isatty()) as reporter:
        process = body(Session(task, c, options, reporter.tile))
        for result in batch.run_batch(
                items, process, stdin=click.get_binary_stream("stdin"),
                stdout=click.get_binary_stream("stdout"), quality=c.quality,
                overwrite=c.overwrite, skip_existing=c.skip_existing,
                stdout_format=stdout_format, debug=c.debug):
            reporter.done(result)
            results.append(result)


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


@batch_command("inpaint", """[bold]Examples[/]

  psal inpaint photo.png --mask hole.png -o filled.png

  psal inpaint photos/ --mask masks/ --dilate 4 -o filled/   [dim](masks matched by file name)[/]

  psal inpaint cutout.png --mask-from-alpha -o filled.png""")
def inpaint(
    session: Session,
    mask: Annotated[Path | None, typer.Option(
        "--mask", "-M", metavar="FILE|DIR",
        help="Mask image, non-zero = hole: one for all inputs, or a folder matched by file stem.")] = None,
    invert_mask: Annotated[bool, typer.Option(
        "--invert-mask", help="Treat zero as hole instead.")] = False,
    mask_from_alpha: Annotated[bool, typer.Option(
        "--mask-from-alpha", help="The hole is the input's transparent (alpha < max) pixels.")] = False,
    dilate: Annotated[int, typer.Option(
        "--dilate", min=0, metavar="PIXELS", help="Grow the hole by this many pixels.")] = 0,
) -> Callable[..., Any]:
    """Fill the holes a mask marks; known pixels are kept exactly."""
    from psal_cli import batch, edit

    if (mask is None) == (not mask_from_alpha):
        raise _usage("give either --mask FILE|DIR or --mask-from-alpha")
    masks = batch.Companions(mask, "mask") if mask else None

    model = session.load_model()

    def process(item: Any, image: Any) -> Any:
        try:
            hole = edit.hole_mask(image, masks.for_item(item) if masks else None, invert=invert_mask,
                                  from_alpha=mask_from_alpha, dilate=dilate)
        except ValueError as e:
            if mask_from_alpha:  # the library's message, with the option it comes from
                raise ValueError(f"--mask-from-alpha: {e}") from None
            raise
        return edit.inpaint(model, image, hole, session.options, session.on_tile)

    return process


@batch_command("colorize", """[bold]Examples[/]

  psal colorize gray.png --reference colour.jpg -o out.png

  psal colorize scans/ --reference refs/ -o coloured/   [dim](refs matched by file name)[/]""")
def colorize(
    session: Session,
    reference: Annotated[Path, typer.Option(
        "--reference", "-R", metavar="FILE|DIR", show_default=False,
        help="Colour reference: one image for all inputs, or a folder matched by file stem.")],
) -> Callable[..., Any]:
    """Colour gray images after a colour reference; colour inputs are reduced to gray first."""
    from psal_cli import batch, edit

    refs = batch.Companions(reference, "reference")
    model = session.load_model()
    return lambda item, image: edit.colorize(model, image, refs.for_item(item), session.options,
                                             session.on_tile)


@batch_command("upscale", """[bold]Examples[/]

  psal upscale photo.jpg --scale 4 -o photo_x4.png

  psal upscale photos/ -r -o big/ --ext webp --quality 90

  cat small.png | psal upscale - -o - > big.png""")
def upscale(
    session: Session,
    scale: Annotated[int | None, typer.Option(
        "--scale", "-s", min=2, max=4, help="Enlargement factor; picks weights/upscale-x<scale>.safetensors. "
        "[dim]\\[default: 4, or the --model's][/]")] = None,
    ensemble: Annotated[bool, typer.Option(
        "--ensemble", help="Average 8 flipped/rotated runs (self-ensemble): a little more accurate, 8× slower.")] = False,
) -> Callable[..., Any]:
    """Enlarge images by 2, 3 or 4; alpha is enlarged alongside."""
    from psal_cli import edit

    if ensemble:
        session.options.views = 8
    model = session.load_model(scale=scale or 4)  # the scale picks the default file only
    if scale and model.config.scale != scale:
        raise _usage(f"--scale {scale}, but {session.common.model} is a ×{model.config.scale} model")
    return lambda item, image: edit.upscale(model, image, session.options, session.on_tile)


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
    from psal_cli.modelfile import ModelFileError, default_model_path, read_info, weights_dir

    wdir = weights_dir()
    paths = sorted(wdir.glob("*.safetensors")) if wdir.is_dir() else []
    paths += [p for p in files or [] if p not in paths]
    rows, bad = [], 0
    for path in paths:
        try:
            info = read_info(path)
            rows.append({"file": str(path), "architecture": info.architecture, "task": info.task,
                         "scale": info.scale, "parameters": info.parameters, "size": info.size,
                         "metrics": info.metrics, "training": info.training, "error": None})
        except ModelFileError as e:
            bad += 1
            rows.append({"file": str(path), "error": e.problem})
    defaults = [default_model_path(t.value, s) for t in Task for s in ((2, 3, 4) if t == Task.upscale else (None,))]
    missing = [str(p) for p in defaults if not p.exists()]
    if json_summary:
        typer.echo(json.dumps({"models": rows, "not_installed": missing}, indent=2))
    else:
        _print_models(rows, missing, wdir)
    raise typer.Exit(1 if bad else 0)


# The classical methods `psal eval` measures beside each model (psal_cli/tasks): their
# figures stay in the file and in `psal models --json`, out of the table.
_BASELINES = ("bicubic", "lanczos", "mean", "telea", "reinhard", "nearest")


def _print_models(rows: list[dict[str, Any]], missing: list[str], wdir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    def name(r: dict[str, Any]) -> str:
        path = Path(r["file"])
        return path.stem if path.parent == wdir else str(path)

    good = [r for r in rows if not r["error"]]
    table = Table(box=None, header_style="bold", title_justify="left",
                  title=f"[bold]models[/] (installed ones in {wdir})")
    table.add_column("model", overflow="fold")
    for column in ("architecture", "task", "scale", "params", "size"):
        table.add_column(column, no_wrap=True)
    for r in good:
        table.add_row(name(r), r["architecture"], r["task"], str(r["scale"] or ""), _human(r["parameters"], ""),
                      _human(r["size"], "B"))
    # The figures in a table of their own: beside six columns they would be folded mid-word.
    figures = Table(box=None, header_style="bold", title_justify="left",
                    title="[bold]PSNR dB[/] measured by psal eval (--json: every figure)")
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
SHARED_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


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
    return fn(**given, **({"log": log.info} if "log" in accepted else {}))


@contextmanager
def _reported(debug: bool) -> Iterator[None]:
    """One line and exit status 1 for a failure (`debug`: the traceback), 130 for Ctrl-C (the last checkpoint stays)."""
    try:
        yield
    except KeyboardInterrupt:
        log.error("interrupted")
        raise typer.Exit(130) from None
    except (typer.TyperException, typer.Exit, typer.Abort):
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
    """The cores this process may use, less the machine's load (at least one).

    A thread pool larger than the idle cores makes every small tensor operation wait for a
    descheduled thread; one thread per idle core keeps concurrent runs as fast as
    sequential ones.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, min(cores, round(cores - load)))


@app.command()
def train(
    task: TaskArg,
    output: Annotated[Path, typer.Option(
        "--output", "-o", metavar="FILE", show_default=False,
        help="Model file to write (.safetensors); checkpoints replace it as training goes.")],
    data: Annotated[Path, typer.Option(
        "--data", metavar="DIR", help="Folder of training photos.")] = SHARED_DATA / "train",
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
    device: Annotated[str, typer.Option("--device", "-d", help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    threads: Annotated[int | None, typer.Option("--threads", min=1, help="CPU threads. Default: the idle cores.")] = None,
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
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --output.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks and debug messages.")] = False,
) -> None:
    """Train a network on a folder of photos and write its model file.

    Defaults (steps, batch, crop, learning rate) are each task's; the model file records the data and steps, and [bold]--init[/] resumes from any checkpoint.

    [bold]Examples[/]

      psal train upscale --scale 4 -o weights/upscale-x4.safetensors

      psal train inpaint --steps 200 -o /tmp/try.safetensors --device cuda
    """
    _setup_logging(quiet=False, debug=debug)
    _folder(data, "--data")
    _existing(init, "--init")
    if output.exists() and not overwrite and (init is None or init.resolve() != output.resolve()):
        raise typer.BadParameter(f"{output} exists (use --overwrite, or --init {output} to resume)",
                                 param_hint="--output")
    _threads(threads)
    if minutes is not None and steps is None:
        from psal_cli.training import UNTIL_THE_CLOCK

        steps = UNTIL_THE_CLOCK
    given = dict(data=data, out=output, scale=scale, init=init, steps=steps, minutes=minutes, batch=batch, patch=patch,
                 lr=lr, loss=loss and loss.value, device=_device(device), seed=seed, attention=attention,
                 deepen=deepen, widen=widen, rescale=rescale, colors=colors or None)
    with _reported(debug):  # the output's folder is made when training starts (training.fit)
        _task_call(task, "train", given)
    log.info("wrote %s", output)


@app.command("eval")
def evaluate(
    task: TaskArg,
    model: Annotated[Path | None, typer.Option(
        "--model", "-m", metavar="FILE", help="Model file. Default: the installed one.")] = None,
    data: Annotated[Path, typer.Option(
        "--data", metavar="DIR", help="Evaluation photos (never trained on).")] = SHARED_DATA / "val",
    scale: Annotated[int | None, typer.Option("--scale", min=2, max=4, help="upscale: 2, 3 or 4.")] = None,
    masks: Annotated[Masks | None, typer.Option("--masks", help="inpaint: thin, thick or box.")] = None,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="Only the first N photos.")] = None,
    size: Annotated[int | None, typer.Option(
        "--size", min=0, help="colorize: resize photos to this longest side first (0 = full size). [default: 320]")] = None,
    nearest: Annotated[bool | None, typer.Option(
        "--nearest/--no-nearest", help="colorize: also measure the exhaustive nearest-patch baseline (slow).")] = None,
    ensemble: Annotated[bool | None, typer.Option(
        "--ensemble", help="upscale: mean over 8 flipped/rotated views, as `psal upscale --ensemble`.")] = None,
    device: Annotated[str, typer.Option("--device", "-d", help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    precision: Annotated[Precision, typer.Option(
        "--precision", case_sensitive=False, help="The convolutions on the CPU, as the image commands' --precision.")] = Precision.auto,
    threads: Annotated[int | None, typer.Option("--threads", min=1, help="CPU threads. Default: the idle cores.")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Random seed.")] = None,
    json_report: Annotated[bool, typer.Option("--json", help="Print the full report as JSON.")] = False,
    save_metrics: Annotated[bool, typer.Option(
        "--save-metrics", help="Record the mean figures in the model file (shown by psal models).")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks and debug messages.")] = False,
) -> None:
    """Measure a model with the task's published protocol, beside classical baselines.

    Super-resolution: Y-channel PSNR/SSIM against bicubic and Lanczos; inpainting: PSNR, SSIM and hole error on seeded masks; colorization: PSNR and a,b error with the reference as is and flipped (see shared/data/README.md).

    [bold]Examples[/]

      psal eval upscale --scale 4 --data ../shared/data/set5 --save-metrics

      psal eval inpaint --masks thick --limit 10 --json

      psal eval colorize --size 320 --no-nearest
    """
    from psal_cli.modelfile import default_model_path, read_info, write_metrics

    _setup_logging(quiet=json_report, debug=debug)
    _folder(data, "--data")
    _existing(model, "--model")
    if save_metrics and limit:
        raise typer.BadParameter("records a data set's figures: measure all of it (no --limit)",
                                 param_hint="--save-metrics")
    _threads(threads)
    if save_metrics and model is None:
        model = default_model_path(task.value, scale or 4 if task == Task.upscale else None)
    given = dict(data=data, model=model, scale=scale, masks=masks and masks.value, limit=limit, size=size, nearest=nearest,
                 ensemble=ensemble, device=_device(device), seed=seed)
    with _reported(debug):
        from psal_cli.engine import autocast, resolve_device

        with autocast(resolve_device(given["device"] or "auto"), precision.value):
            report = _task_call(task, "evaluate", given)
        module = sys.modules[f"psal_cli.tasks.{task.value}"]
        typer.echo(json.dumps(report, indent=2, default=str) if json_report else module.format_report(report))
        if save_metrics:  # kept per data set, beside what the file already records
            figures = (module.metrics_for_file(report) if hasattr(module, "metrics_for_file")
                       else report["mean"])
            write_metrics(model, {**read_info(model).metrics, data.name: figures})
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

    Every command reads files, folders, globs or standard input (-) and writes atomically.
    Run [bold]psal COMMAND --help[/] for its options and examples.
    """


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds like Ctrl-C: temporary files are removed


def main() -> None:
    """Console entry point (`psal`, `python -m psal_cli`)."""
    # Waiting OpenMP threads sleep instead of spinning, unless the user chose otherwise: on a
    # busy machine a spinning pool holds cores other processes need. Read when torch loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    signal.signal(signal.SIGTERM, _terminate)
    app(prog_name="psal")
