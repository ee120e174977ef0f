"""Model files: safetensors weights whose metadata is enough to rebuild the network.

A model file is a plain safetensors file (never pickle: loading runs no code). Its
`__metadata__` (string values only, as safetensors requires) holds:

| key | value |
| --- | --- |
| `format` | `"psal-model"` |
| `format_version` | `"1"` |
| `architecture` | a registered network name (`psal_cli.networks`) |
| `task` | `"upscale"`, `"colorize"` or `"inpaint"` |
| `config` | JSON of the network's `Config` dataclass |
| `training` | JSON: data, steps, ... (free form) |
| `metrics` | JSON: what `psal eval` measured (free form) |

Every problem with a file (missing, damaged, truncated, foreign, mismatched) raises
`ModelFileError` with one message that names the file and the problem.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import nn

from psal_cli.files import WriteError, atomic_write
from psal_cli.networks import create_model, model_config

FORMAT = "psal-model"
FORMAT_VERSION = "1"
TASKS = ("upscale", "colorize", "inpaint")


class ModelFileError(ValueError):
    """A model file that cannot be used; the message names the file and the problem."""

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = Path(path)
        self.problem = problem


@dataclass
class ModelInfo:
    """What a model file says about itself (its metadata, decoded) plus file facts."""

    path: Path
    architecture: str
    task: str
    config: dict[str, Any]
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    format_version: str = FORMAT_VERSION
    parameters: int = 0
    size: int = 0

    @property
    def scale(self) -> int | None:
        """Upscaling factor, for upscale models."""
        return self.config.get("scale") if self.task == "upscale" else None


def weights_dir() -> Path:
    """Where the installed models live (the first that applies):

    `$PSAL_WEIGHTS`; `psal_cli/weights/` inside an installed package (a wheel carries the
    repository's `weights/` there); `weights/` at the top of a source checkout (an editable
    install, or a run from the repository).
    """
    return _weights()[0]


def weights_source() -> str:
    """Which rule of `weights_dir` found the models: "$PSAL_WEIGHTS", "package" or "checkout"."""
    return _weights()[1]


def _weights() -> tuple[Path, str]:
    env = os.environ.get("PSAL_WEIGHTS")
    if env:
        return Path(env), "$PSAL_WEIGHTS"
    package = Path(__file__).resolve().parent
    if (package / "weights").is_dir():
        return package / "weights", "package"
    return package.parent / "weights", "checkout"


def default_model_path(task: str, scale: int | None = None) -> Path:
    """The shipped model for a task: `weights/<task>.safetensors`, `upscale-x<scale>` for upscale."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r} (known: {', '.join(TASKS)})")
    if task == "upscale":
        if scale is None:
            raise ValueError("the upscale model path depends on the scale; pass scale=")
        return weights_dir() / f"upscale-x{scale}.safetensors"
    return weights_dir() / f"{task}.safetensors"


def save_model(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    training: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    half: bool = False,
) -> Path:
    """Write `model` (a registered network) atomically; `half` stores float weights as float16."""
    architecture = getattr(model, "architecture", None)
    task = getattr(model, "task", None)
    if architecture is None or task not in TASKS:
        raise TypeError(f"{type(model).__name__} is not a registered psal network")
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": architecture,
        "task": task,
        "config": json.dumps(model_config(model)),
        "training": json.dumps(training or {}),
        "metrics": json.dumps(metrics or {}),
    }
    tensors = {}
    for name, t in model.state_dict().items():
        t = t.detach().to("cpu")
        if half and t.is_floating_point():
            t = t.half()
        tensors[name] = t.contiguous().clone()  # clone: safetensors refuses shared storage
    return _write(Path(path), save_tensors(tensors, metadata=metadata))


def write_metrics(path: str | os.PathLike[str], metrics: dict[str, Any]) -> Path:
    """Record what `psal eval` measured in a model file's metadata (weights untouched, atomic)."""
    path = Path(path)
    meta = dict(read_metadata(path))
    try:
        tensors = load_tensors(path.read_bytes())
    except SafetensorError as e:
        raise ModelFileError(path, f"damaged: {e}") from None
    meta["metrics"] = json.dumps(metrics)
    return _write(path, save_tensors(tensors, metadata=meta))


def _write(path: Path, data: bytes) -> Path:
    """Replace `path` atomically; a failure is a ModelFileError, like every other problem with the file."""
    try:
        with atomic_write(path, overwrite=True) as f:
            f.write(data)
    except WriteError as e:
        raise ModelFileError(path, e.problem) from None
    return path


def _read_header(path: Path) -> tuple[dict[str, str], dict[str, list[int]], int]:
    """The file's metadata, tensor shapes and size, parsed (and checked) by safetensors;
    every problem becomes one ModelFileError that names it."""
    if not path.exists():
        raise ModelFileError(path, "no such file")
    if path.is_dir():
        raise ModelFileError(path, "is a folder, not a model file")
    size = path.stat().st_size
    not_st = "not a safetensors model file"
    if size < 8:
        raise ModelFileError(path, f"{not_st} (only {size} bytes)")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            shapes = {name: f.get_slice(name).get_shape() for name in f.keys()}
    except SafetensorError as e:
        raise ModelFileError(path, _header_problem(str(e), size)) from None
    except OSError as e:
        raise ModelFileError(path, f"cannot read ({e.strerror or e})") from None
    return meta, shapes, size


def _header_problem(error: str, size: int) -> str:
    """safetensors' complaint about a header, as the problem a user reads."""
    reason = error.removeprefix("Error while deserializing header: ")
    # Older safetensors releases name the same errors by their Rust variants (HeaderTooLarge...).
    if (reason.startswith(("header too large", "header too small", "HeaderTooLarge", "HeaderTooSmall"))
            or "expected value" in reason):
        return f"not a safetensors model file ({reason})"
    if reason.startswith(("invalid header length", "InvalidHeaderLength")):  # the header runs past the end
        return f"truncated: the file ends inside its header ({size} bytes)"
    if reason.startswith(("incomplete metadata", "MetadataIncompleteBuffer")):
        return f"truncated: its {size} bytes do not match the tensors its header lists"
    return f"damaged: {reason}"


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The file's `__metadata__`, after checking that it is a psal model of a known format."""
    path = Path(path)
    return _psal_metadata(path, _read_header(path)[0])


def _psal_metadata(path: Path, meta: dict[str, str]) -> dict[str, str]:
    if meta.get("format") != FORMAT:
        raise ModelFileError(path, "a safetensors file, but not a psal model (no psal metadata)")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ModelFileError(
            path, f"model format version {meta.get('format_version')!r} is not supported "
            f"(this psal reads version {FORMAT_VERSION}); upgrade psal")
    return meta


def read_info(path: str | os.PathLike[str]) -> ModelInfo:
    """Decode a model file's metadata (no weights are loaded)."""
    path = Path(path)
    meta, shapes, size = _read_header(path)
    meta = _psal_metadata(path, meta)

    def field_json(key: str) -> dict[str, Any]:
        try:
            value = json.loads(meta.get(key, "{}"))
        except json.JSONDecodeError:
            raise ModelFileError(path, f"damaged: metadata {key!r} is not JSON") from None
        if not isinstance(value, dict):
            raise ModelFileError(path, f"damaged: metadata {key!r} is not a JSON object")
        return value

    parameters = sum(math.prod(shape) for shape in shapes.values())
    return ModelInfo(
        path=path,
        architecture=meta.get("architecture", "?"),
        task=meta.get("task", "?"),
        config=field_json("config"),
        training=field_json("training"),
        metrics=field_json("metrics"),
        format_version=meta["format_version"],
        parameters=parameters,
        size=size,
    )


def load_model(path: str | os.PathLike[str], *, task: str | None = None) -> tuple[nn.Module, ModelInfo]:
    """Rebuild the network a file describes and load its weights (float32, eval mode, CPU).

    `task` rejects a model made for another task (an upscaler given to `colorize`).
    """
    path = Path(path)
    info = read_info(path)
    if task is not None and info.task != task:
        raise ModelFileError(path, f"is a model for {info.task}, not for {task}")
    try:
        model = create_model(info.architecture, **info.config)
    except KeyError:
        raise ModelFileError(path, f"unknown architecture {info.architecture!r}; "
                             "it may need a newer psal") from None
    except Exception as e:  # noqa: BLE001 - the config comes from the file: any failure to build is the file's
        raise ModelFileError(path, f"config does not fit architecture {info.architecture!r}: {e}") from None
    if model.task != info.task:
        raise ModelFileError(path, f"says task {info.task!r} but {info.architecture!r} is a {model.task} network")
    try:
        tensors = load_tensors(path.read_bytes())
    except SafetensorError as e:
        raise ModelFileError(path, f"damaged: {e}") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in set(expected) & set(tensors) if expected[k].shape != tensors[k].shape)
    if missing or unexpected or wrong:
        parts = [f"{label}: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
                 for label, names in (("missing", missing), ("unexpected", unexpected),
                                      ("wrong shape", wrong)) if names]
        raise ModelFileError(path, f"weights do not match architecture {info.architecture!r} "
                             f"({'; '.join(parts)})")
    if not all(t.isfinite().all() for t in tensors.values() if t.is_floating_point()):
        raise ModelFileError(path, "damaged: weights contain NaN or infinity")
    with torch.no_grad():
        model.load_state_dict({k: v.to(expected[k].dtype) for k, v in tensors.items()})
    model.eval()
    return model, info
