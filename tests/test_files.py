"""Atomic writes: nothing partial is ever left, nothing existing is replaced unless asked."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import stray_files
from psal_cli.files import WriteError, atomic_write


def test_atomic_write_leaves_nothing_on_interrupt(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(tmp_path / "out.png") as f:
            f.write(b"partial")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_never_replaces_without_overwrite(tmp_path: Path) -> None:
    (tmp_path / "out.png").write_bytes(b"old")
    with pytest.raises(WriteError, match="out.png: already exists"):
        with atomic_write(tmp_path / "out.png") as f:
            f.write(b"new")
    assert (tmp_path / "out.png").read_bytes() == b"old"
    with atomic_write(tmp_path / "out.png", overwrite=True) as f:
        f.write(b"new")
    assert (tmp_path / "out.png").read_bytes() == b"new"
    assert not stray_files(tmp_path)


def test_unwritable_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(WriteError, match=r"nope/x.bin: cannot write \(No such file or directory\)"):
        with atomic_write(tmp_path / "nope" / "x.bin") as f:
            f.write(b"data")
