"""A small registry of networks, in the manner of timm's `create_model`.

A model file stores `architecture` (a registered name) and `config` (JSON of the
network's config dataclass); `create_model(architecture, **config)` rebuilds it.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Callable

from torch import nn

_REGISTRY: dict[str, type[nn.Module]] = {}


def register_model(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: make a network buildable by name."""

    def add(cls: type[nn.Module]) -> type[nn.Module]:
        _REGISTRY[name] = cls
        cls.architecture = name
        return cls

    return add


def _load_all() -> None:
    # Importing the modules registers their networks.
    from psal_cli.networks import colorize, inpaint, upscale  # noqa: F401


def create_model(name: str, **config: Any) -> nn.Module:
    """Build a registered network from its config; unknown keys are an error, the keys a
    network lists in `retired_config` (settings older files record) are ignored."""
    _load_all()
    if name not in _REGISTRY:
        raise KeyError(f"unknown architecture {name!r} (known: {', '.join(sorted(_REGISTRY))})")
    cls = _REGISTRY[name]
    retired = getattr(cls, "retired_config", ())
    return cls(cls.Config(**{k: v for k, v in config.items() if k not in retired}))


def model_config(model: nn.Module) -> dict[str, Any]:
    return asdict(model.config)
