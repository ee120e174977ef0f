"""Batches: which files to read, where each result goes, and the loop that writes them.

Shared by every command, so `inpaint`, `colorize` and `upscale` differ only in the
per-image function they pass to `run_batch`. Nothing here knows about networks.
"""

from __future__ import annotations

import glob
import logging
import os
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import BinaryIO, Literal

from PIL import Image

from psal_cli.imageio import (FORMATS, ImageError, encode_image, format_for, output_format, read_image,
                              write_image)
from psal_cli.storage import Remote, Unreachable, existing, location

log = logging.getLogger("psal")
STDIO = "-"


class UsageError(ValueError):
    """A mistake in the command line (exit status 2), as opposed to a bad input file."""


@dataclass
class Item:
    """One input and where its result goes; `None` paths mean standard input/output.

    A path is local (`Path`) or an object in storage (`storage.Remote`, from a URL).
    """

    source: Path | Remote | None
    rel: PurePath  # path below the folder or glob root it came from: output layout, stem matching
    output: Path | Remote | None = None

    @property
    def name(self) -> str:
        return str(self.source) if self.source else STDIO

    @property
    def output_name(self) -> str:
        return str(self.output) if self.output else STDIO


@dataclass
class Result:
    input: str
    output: str
    status: Literal["done", "skipped", "failed"]
    seconds: float = 0.0
    error: str | None = None


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in FORMATS and not path.name.startswith(".")


def expand_inputs(specs: list[str], *, recursive: bool = False) -> list[Item]:
    """Files, folders (images inside; `recursive` descends) and glob patterns, in order given."""
    items: list[Item] = []
    for spec in specs:
        if spec == STDIO:
            items.append(Item(None, Path("stdin")))
            continue
        path = location(spec)
        if path.is_dir():
            found = path.rglob("*") if recursive else path.iterdir()
            items += [Item(p, p.relative_to(path)) for p in sorted(found) if p.is_file() and _is_image(p)]
        elif path.exists():
            items.append(Item(path, Path(path.name)))
        elif glob.has_magic(spec):
            if isinstance(path, Remote):
                parts = spec.split("/")
                root = location("/".join(parts[:next(i for i, p in enumerate(parts) if glob.has_magic(p))]))
                matches = sorted(path.glob())
            else:
                parts = path.parts
                fixed = next(i for i, part in enumerate(parts) if glob.has_magic(part))
                root = Path(*parts[:fixed]) if fixed else Path()
                matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True))
            items += [Item(p, p.relative_to(root)) for p in matches if p.is_file() and _is_image(p)]
            if not matches:
                raise UsageError(f"{spec}: no file matches")
        else:
            raise UsageError(f"{spec}: no such file or folder")
    if not items:
        raise UsageError(f"no image files in {' '.join(specs)}")
    if sum(i.source is None for i in items) > 1:
        raise UsageError("standard input (-) can be read only once")
    return items


def is_batch(specs: list[str]) -> bool:
    """Whether the inputs name a batch (several, a folder or a glob): then -o is a folder."""
    return len(specs) > 1 or any(s != STDIO and (location(s).is_dir() or not location(s).exists()) for s in specs)


def shard(items: list[Item], spec: str | None, environ: Mapping[str, str] = os.environ) -> list[Item]:
    """Keep the I-th (1-based) of N interleaved slices, e.g. "2/4": items 2, 6, 10, ...

    "auto" (or "auto/N") takes I and N from the scheduler that started the process: see
    `scheduler_slice`.
    """
    if not spec:
        return items
    if spec == "auto" or spec.startswith("auto/"):
        i, n = scheduler_slice(spec, environ)
        log.info("shard %d/%d of %d inputs", i, n, len(items))
        return items[i - 1 :: n]
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise UsageError(f"--shard {spec}: expected I/N or auto, e.g. 1/4") from None
    if not 1 <= i <= n:
        raise UsageError(f"--shard {spec}: I must be between 1 and N")
    return items[i - 1 :: n]


# The variable a Kubernetes Indexed Job sets for the number of slices (the Job's
# `completions`, which Kubernetes does not pass on to the pod by itself).
SHARD_COUNT = "PSAL_SHARD_COUNT"


def scheduler_slice(spec: str, environ: Mapping[str, str]) -> tuple[int, int]:
    """(I, N) of "auto" or "auto/N" from a SLURM job array or a Kubernetes Indexed Job.

    SLURM: the task's place in its array, from SLURM_ARRAY_TASK_ID and
    SLURM_ARRAY_TASK_MIN/_MAX/_STEP (`--array=0-99` or `1-400:4`), N from
    SLURM_ARRAY_TASK_COUNT (or the range). Kubernetes: JOB_COMPLETION_INDEX (0-based),
    N from "auto/N" or PSAL_SHARD_COUNT. "auto/N" must agree with the scheduler's N.
    """
    given = spec.removeprefix("auto").removeprefix("/")
    try:
        given_n = int(given) if given else None
        if given_n is not None and given_n < 1:
            raise ValueError
    except ValueError:
        raise UsageError(f"--shard {spec}: expected auto or auto/N with N a positive count") from None

    def number(name: str) -> int | None:
        value = environ.get(name)
        if value is None or value == "":
            return None
        try:
            return int(value)
        except ValueError:
            raise UsageError(f"--shard {spec}: {name}={value!r} is not a number") from None

    task = number("SLURM_ARRAY_TASK_ID")
    index = number("JOB_COMPLETION_INDEX")
    if task is not None:
        low, high = number("SLURM_ARRAY_TASK_MIN"), number("SLURM_ARRAY_TASK_MAX")
        step = number("SLURM_ARRAY_TASK_STEP") or 1
        count = number("SLURM_ARRAY_TASK_COUNT")
        if low is None or (high is None and count is None):
            raise UsageError(f"--shard {spec}: SLURM_ARRAY_TASK_ID is set but not SLURM_ARRAY_TASK_MIN "
                             "and _MAX or _COUNT; give --shard I/N")
        span = (high - low) // step + 1 if high is not None else count
        if count is not None and count != span or (task - low) % step:
            raise UsageError(f"--shard {spec}: the job array's indices are not one evenly spaced range "
                             f"(e.g. --array=0-99 or 1-400:4); give --shard I/N")
        i, n, source = (task - low) // step + 1, span, "SLURM job array"
    elif index is not None:
        n = given_n or number(SHARD_COUNT)
        if n is None:
            raise UsageError(f"--shard auto: JOB_COMPLETION_INDEX is set but not the number of slices; "
                             f"give --shard auto/N or set {SHARD_COUNT} (the Job's completions)")
        i, source = index + 1, "Kubernetes Indexed Job"
    else:
        raise UsageError(f"--shard {spec}: no job array found (neither SLURM_ARRAY_TASK_ID nor "
                         "JOB_COMPLETION_INDEX is set); give --shard I/N")
    if given_n is not None and given_n != n:
        raise UsageError(f"--shard {spec}, but the {source} has {n} tasks")
    if not 1 <= i <= n:
        raise UsageError(f"--shard {spec}: the {source}'s task {i - 1} is outside its {n} slices")
    return i, n


def plan_outputs(items: list[Item], output: str | None, *, batch: bool, suffix: str | None,
                 ext: str | None, default_suffix: str) -> list[Item]:
    """Decide each item's output path (None = standard output).

    `-o -`: standard output (one input). `-o FILE`: one input. `-o DIR` (or several
    inputs, or a folder/glob input): DIR/<relative path>/<stem><suffix><ext>. No `-o`:
    beside each input with `default_suffix` (standard input goes to standard output).
    """
    ext = normalise_ext(ext)
    if output == STDIO:
        if len(items) > 1:
            raise UsageError(f"-o - (standard output) takes one input, not {len(items)}")
        items[0].output = None
        return items
    out = location(output) if output else None
    to_dir = out is not None and (batch or out.is_dir() or output.endswith(("/", os.sep)))
    if out is not None and not to_dir:
        if suffix is not None or ext is not None:
            raise UsageError("--suffix and --ext name the files in -o DIR; -o FILE is the name itself")
        if not out.suffix:
            raise UsageError(f"-o {output}: no image extension (end it with / to name a folder)")
        format_for_usage(out)
        items[0].output = out
    else:
        if to_dir and out.suffix.lower() in FORMATS and not out.is_dir():
            raise UsageError(f"-o {output} looks like a file, but there are {len(items)} inputs: give a folder")
        sfx = suffix if suffix is not None else ("" if to_dir else default_suffix)
        for item in items:
            if item.source is None and out is None:
                item.output = None
                continue
            name = f"{item.rel.stem}{sfx}{ext or _output_ext(item.rel)}"
            item.output = (out / item.rel.parent if out else item.source.parent) / name
    seen: dict[Path, Item] = {}
    for item in items:
        if item.output is None:
            continue
        key = item.output.resolve()
        if key in seen:
            raise UsageError(f"{seen[key].name} and {item.name} would both be written to {item.output}")
        seen[key] = item
    folders = {item.output.parent for item in items if item.output is not None}
    for folder in {f.bucket if isinstance(f, Remote) else f for f in folders}:
        if isinstance(folder, Remote):
            folder.check_writable()
        else:
            _check_writable(folder)
    return items


def _check_writable(folder: Path) -> None:
    """Refuse, before any work, an output folder that cannot be made or written in: its
    nearest existing ancestor must be a folder where a file can be created (a temporary
    one, removed at once; missing levels are made at the write)."""
    place = folder
    while not place.exists() and place != place.parent:
        place = place.parent
    if not place.is_dir():
        raise UsageError(f"cannot write in {folder}: {place} is not a folder")
    try:
        tempfile.TemporaryFile(dir=place).close()
    except OSError as e:
        raise UsageError(f"cannot write in {folder}: {e.strerror or e}") from None


def _output_ext(rel: Path) -> str:
    """The input's extension if psal writes it, else .png: decided here, so a GIF or PPM input
    never fails at the write after the network has run."""
    return rel.suffix if rel.suffix.lower() in FORMATS else ".png"


def normalise_ext(ext: str | None) -> str | None:
    """"jpg" or ".JPG" -> ".jpg"; UsageError for an extension we cannot write."""
    if ext is None:
        return None
    ext = (ext if ext.startswith(".") else f".{ext}").lower()
    if ext not in FORMATS:
        raise UsageError(f"--ext {ext}: unknown image format (use one of {', '.join(sorted(FORMATS))})")
    return ext


def format_for_usage(path: Path | Remote) -> str:
    try:
        return format_for(str(path))
    except ImageError as e:
        raise UsageError(str(e)) from None


class Companions:
    """Masks or references: one file for every input, or a folder matched by relative path/stem."""

    def __init__(self, spec: str | Path, what: str) -> None:
        self.what = what
        self.spec = spec = location(spec)
        if not spec.exists():
            raise UsageError(f"{what} {spec}: no such file or folder")
        self.index: dict[Path, Path] = {}
        # Decided here, where the spec was given: a Ray worker may run in another folder.
        self.folder, self.cwd = spec.is_dir(), Path.cwd()
        if self.folder:
            # Shallowest first (then by path): for a stem found at several depths, the
            # first one seen, the shallowest, is what an input matched by stem alone gets.
            for p in sorted(spec.rglob("*"), key=lambda p: (len(p.parts), p)):
                if p.is_file() and _is_image(p):
                    rel = p.relative_to(spec).with_suffix("")
                    self.index[rel] = p
                    self.index.setdefault(Path(rel.name), p)
        self._cache: dict[Path, Image.Image] = {}

    def for_item(self, item: Item) -> Image.Image:
        """The companion image of `item` (read once and cached when shared)."""
        path = self.spec
        if self.folder:
            key = item.rel.with_suffix("")
            path = self.index.get(key) or self.index.get(Path(key.name))
            if path is None:
                raise ImageError(f"{item.name}: no {self.what} named {key.name}.* in {self.spec}")
        if path not in self._cache:
            # Keep one: a folder's files are used once.
            self._cache = {path: read_image(self.cwd / path if isinstance(path, Path) else path, str(path))}
        return self._cache[path]


def _describe(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    if isinstance(e, (ValueError, OSError)):
        return str(e)
    if isinstance(e, MemoryError) or "can't allocate memory" in str(e):
        return "out of memory"
    if "out of memory" in str(e).lower():
        return "out of memory; try a smaller --tile"
    return f"internal error: {type(e).__name__}: {e} (run with --debug for details)"


def _about(name: str, message: str) -> str:
    """Prefix a message with the input it concerns, unless it already starts with it."""
    return message if message.startswith(f"{name}: ") else f"{name}: {message}"


class _NameInput(logging.Filter):
    """Prefixes the warnings logged while an input is processed with the input's name."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.input = name

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = _about(self.input, record.getMessage()), None
        return True


def run_batch(
    items: list[Item],
    process: Callable[[Item, Image.Image], Image.Image],
    *,
    stdin: BinaryIO,
    stdout: BinaryIO,
    quality: int | None = None,
    overwrite: bool = False,
    skip_existing: bool = False,
    stdout_format: str | None = None,
    debug: bool = False,
) -> Iterator[Result]:
    """Read each item, `process` it, write the result; yield one Result per item.

    A failing item is reported and the batch goes on, unless the object store cannot be
    reached (`storage.Unreachable` is raised: no later item could be read or written).
    Outputs are written atomically; an existing output is skipped (`skip_existing`),
    replaced (`overwrite`) or refused. An input is never overwritten. Which outputs in
    object storage exist is learnt from one listing, made before the first item.
    """
    listed = existing(i.output for i in items if isinstance(i.output, Remote))
    for item in items:
        present = item.output in listed if isinstance(item.output, Remote) else None
        yield edit_item(item, process, present=present, stdin=stdin, stdout=stdout, quality=quality,
                        overwrite=overwrite, skip_existing=skip_existing, stdout_format=stdout_format,
                        debug=debug)


def _skip(item: Item, present: bool | None, *, overwrite: bool, skip_existing: bool) -> bool:
    """Whether the item's existing output is to be kept (`skip_existing`); ImageError if it is
    refused (neither `overwrite` nor `skip_existing`) or the output is the input itself."""
    out = item.output
    if out is None:
        return False
    if item.source is not None and out.resolve() == item.source.resolve():
        raise ImageError(f"{out}: is the input; refusing to overwrite it")
    if out.exists() if present is None else present:
        if skip_existing:
            return True
        if not overwrite:
            raise ImageError(f"{out}: already exists (use --overwrite or --skip-existing)")
    return False


def triage(items: list[Item], *, overwrite: bool, skip_existing: bool) -> tuple[list[int], dict[int, Result]]:
    """For a run that hands its items to other processes (Ray): the positions of the items
    to edit, and the Results of the others (skipped, or refused), by position. Outputs are
    looked at once, here (one listing for object storage), as `run_batch` does item by item."""
    listed = existing(i.output for i in items if isinstance(i.output, Remote))
    todo, settled = [], {}
    for k, item in enumerate(items):
        present = item.output in listed if isinstance(item.output, Remote) else None
        try:
            if _skip(item, present, overwrite=overwrite, skip_existing=skip_existing):
                settled[k] = Result(item.name, item.output_name, "skipped")
            else:
                todo.append(k)
        except ImageError as e:
            settled[k] = Result(item.name, item.output_name, "failed", error=_about(item.name, str(e)))
    return todo, settled


def edit_item(
    item: Item,
    process: Callable[[Item, Image.Image], Image.Image],
    *,
    present: bool | None = None,
    stdin: BinaryIO | None = None,
    stdout: BinaryIO | None = None,
    quality: int | None = None,
    overwrite: bool = False,
    skip_existing: bool = False,
    stdout_format: str | None = None,
    debug: bool = False,
) -> Result:
    """One item of `run_batch` (and of a Ray worker's batch); `present`: whether its output
    exists, when a listing said so (None: look)."""
    start = time.perf_counter()
    result = Result(item.name, item.output_name, "done")
    try:
        out = item.output
        if _skip(item, present, overwrite=overwrite, skip_existing=skip_existing):
            result.status = "skipped"
            return result
        image = read_image(item.source) if item.source else read_image(stdin.read(), STDIO)
        fmt = stdout_format or output_format(image.format)
        name_input = _NameInput(item.name)
        log.addFilter(name_input)
        try:
            image = process(item, image)
        finally:
            log.removeFilter(name_input)
        if out is None:
            stdout.write(encode_image(image, fmt, quality=quality, name=STDIO))
            stdout.flush()
        else:
            out.parent.mkdir(parents=True, exist_ok=True)
            write_image(image, out, quality=quality, overwrite=overwrite)
    except Unreachable:
        raise
    except Exception as e:  # a bad file in a batch is reported; the batch goes on
        if debug:
            traceback.print_exc()
        result.status, result.error = "failed", _about(item.name, _describe(e))
    result.seconds = round(time.perf_counter() - start, 3)
    return result
