"""What training shares across tasks: which photo files, and what a model file records as its data."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from conftest import make_image
from psal_cli.modelfile import read_info
from psal_cli.tasks import inpaint
from psal_cli.training import SHARED_TRAIN, data_description, image_files


def test_image_files_sorted_readable_limited(tmp_path: Path) -> None:
    for name in ("b.JPG", "a.png", "c.tif", "notes.txt", "d.gif"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in image_files(tmp_path)] == ["a.png", "b.JPG", "c.tif"]
    assert [p.name for p in image_files(tmp_path, 2)] == ["a.png", "b.JPG"]


def test_data_description_names_only_the_shared_set(tmp_path: Path) -> None:
    shared, mine = tmp_path / "shared" / "data" / "train", tmp_path / "mine" / "train"
    assert data_description(shared, 400) == SHARED_TRAIN
    assert data_description(shared, 5, limit=5) == f"{shared} (5 photos)"
    assert data_description(mine, 3) == f"{mine} (3 photos)"  # a folder named train is not the set


def test_inpaint_records_the_data_it_trained_on(tmp_path: Path) -> None:
    make_image(tmp_path / "photos" / "a.png", size=(40, 40))
    inpaint.train(tmp_path / "photos", tmp_path / "m.safetensors", steps=1, batch=1, patch=32)
    assert read_info(tmp_path / "m.safetensors").training["data"] == f"{tmp_path / 'photos'} (1 photos)"


def test_a_time_budget_ends_the_schedule_and_the_run(tmp_path: Path, monkeypatch, caplog) -> None:
    """--minutes: the learning rate reaches its final value as the clock runs out, training
    stops there, and the file records a finished run of that budget and no step count (the
    CLI's --minutes without --steps)."""
    from psal_cli import training
    from psal_cli.tasks import upscale

    clock = iter(range(0, 10**6, 2))  # every reading of the clock is 2 s later
    monkeypatch.setattr(training.time, "time", lambda: float(next(clock)))
    make_image(tmp_path / "photos" / "a.png", size=(40, 40))
    out = tmp_path / "m.safetensors"
    with caplog.at_level(logging.INFO, logger="psal"):
        upscale.train(tmp_path / "photos", out, 2, steps=training.UNTIL_THE_CLOCK, batch=1, patch=16, minutes=0.5,
                      val=tmp_path / "none", config={"channels": 4, "blocks_before": 1, "blocks_after": 1, "qk_channels": 4})
    logs = [r.getMessage() for r in caplog.records]
    info = read_info(out).training
    assert 5 <= info["steps"] < 20  # 30 s of a clock read a few times per step
    assert info["runs"][-1]["minutes"] == 0.5 and "stopped_of" not in info["runs"][-1]
    assert info["options"]["steps"] is None and info["options"]["minutes"] == 0.5
    assert logs[-1].startswith(f"step {info['steps']} ") and " lr 1.00e-05 " in logs[-1]


def test_batches_depend_on_seed_and_step_only() -> None:
    """Worker threads make the same batches, in the same order, as the training loop itself
    would, and a run resumed at step s gets the batches from s on."""
    import itertools
    import random

    from psal_cli.training import batches

    def sample(rng: random.Random) -> dict:
        return {"x": torch.tensor([rng.random() for _ in range(3)])}

    def first(stream, n: int) -> list:
        taken = [b["x"] for b in itertools.islice(stream, n)]
        stream.close()
        return taken

    inline = first(batches(sample, 7, 1), 9)
    assert all(torch.equal(a, b) for a, b in zip(inline, first(batches(sample, 7, 1, workers=3), 9)))
    assert all(torch.equal(a, b) for a, b in zip(inline[4:], first(batches(sample, 7, 5, workers=2), 5)))
    assert not torch.equal(inline[0], first(batches(sample, 8, 1), 1)[0])
    assert len({tuple(b.tolist()) for b in inline}) == 9
