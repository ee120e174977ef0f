"""What the three tasks share: resuming from a model file, the network an evaluation
measures, and the report every `evaluate` returns."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn


@dataclass
class Report:
    """An evaluation: the mean figures of the model and of each baseline over `images`.

    `settings` holds the protocol's own parameters (scale, mask family, size, seed, ...);
    `images` one row of figures per image, in the task's own layout.
    """

    task: str
    data: str
    model: str
    settings: dict[str, Any]
    images: list[dict[str, Any]]
    mean: dict[str, Any]
    baselines: dict[str, dict[str, Any]]
    seconds: float


def resume(init: Path, task: str) -> tuple[nn.Module, int, dict[str, Any]]:
    """The network of model file `init`, the steps it was trained for, and its training record
    (a copy, to extend): what a resumed run carries on from."""
    from psal_cli.modelfile import load_model

    model, info = load_model(init, task=task)
    return model, int(info.training.get("steps", 0)), dict(info.training)


def model_to_evaluate(model: Path | str | nn.Module | None, task: str, device: str,
                      scale: int | None = None) -> tuple[nn.Module, str]:
    """`model` (a model file, a network, or None: the installed one) on `device` in eval
    mode, and its name for the report."""
    from psal_cli.modelfile import default_model_path, load_model

    if model is None:
        model = default_model_path(task, scale)
    name = str(model) if isinstance(model, (str, Path)) else type(model).__name__
    if isinstance(model, (str, Path)):
        model = load_model(model, task=task)[0]
    return model.to(device).eval(), name
