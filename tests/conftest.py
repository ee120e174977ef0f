"""Shared fixtures: tiny model files installed as the defaults, small images, subprocess runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tiny_networks import write_models

torch.set_num_threads(1)
TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="session")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A weights folder with tiny models: upscale-x2, upscale-x4, colorize, inpaint."""
    folder = tmp_path_factory.mktemp("weights")
    write_models(folder)
    return folder


@pytest.fixture
def isolated(weights: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The tiny models are the installed ones, and the test runs in its own empty folder."""
    monkeypatch.setenv("PSAL_WEIGHTS", str(weights))
    monkeypatch.chdir(tmp_path)


def random_image(mode: str = "RGB", size: tuple[int, int] = (20, 12), seed: int = 0) -> Image.Image:
    """A random image of `mode` (L, LA, RGB, RGBA, P, I;16), `size` = (width, height)."""
    rng = np.random.default_rng(seed)
    w, h = size
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    if mode == "P":
        return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).quantize(16)
    a = rng.integers(0, 256, (h, w, len(mode)), dtype=np.uint8)
    return Image.fromarray(a[:, :, 0] if len(mode) == 1 else a)


def make_image(path: Path | str, mode: str = "RGB", size: tuple[int, int] = (20, 12), seed: int = 0,
               **save: object) -> Path:
    """Write a random image (`random_image`) and return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    random_image(mode, size, seed).save(path, **save)
    return path


def stray_files(root: Path | str) -> list[Path]:
    """Temporary files an interrupted or failed write might have left."""
    return [p for p in Path(root).rglob("*") if p.name.endswith(".psal-tmp")]


def psal_command(*args: str) -> list[str]:
    """A real `psal` process that also knows the tiny test networks."""
    code = "import sys, tiny_networks; from psal_cli.cli import main; sys.argv[0] = 'psal'; main()"
    return [sys.executable, "-c", code, *args]


def psal_env() -> dict[str, str]:
    """Environment for `psal` subprocesses: the psal_cli this process tested (a checkout's or
    an installed one) and the tests importable, one thread."""
    import psal_cli

    package_root = Path(psal_cli.__file__).resolve().parent.parent
    path = os.pathsep.join([str(TESTS), str(package_root), os.environ.get("PYTHONPATH", "")])
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)


def run_psal(*args: str, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(psal_command(*args), input=input, capture_output=True, env=psal_env(),
                          timeout=120)
