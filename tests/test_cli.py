"""The `psal` command line, run for real on files in a temporary folder.

Most runs go through Typer's runner in this process (fast); a few start real `psal`
processes (pipes, `python -m`). Every failure is checked for its message, its exit
status, no traceback and no stray file.
"""

from __future__ import annotations

import io
import json
import os
import signal
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from conftest import make_image, psal_command, psal_env, run_psal, stray_files
from psal_cli import cli, files
from psal_cli.cli import app
from psal_cli.modelfile import save_model, write_metrics
from psal_cli.networks import create_model

pytestmark = pytest.mark.usefixtures("isolated")
runner = CliRunner()


def psal(*args: str | Path, input: bytes | None = None, code: int = 0):
    """Run `psal ARGS` in-process; check the exit status and that no traceback was shown."""
    result = runner.invoke(app, [str(a) for a in args], input=input)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.exit_code == code, f"exit {result.exit_code}: {result.stderr}{result.exception!r}"
    return result


def pixels(path: Path | str) -> np.ndarray:
    return np.asarray(Image.open(path))


# -- shell ---------------------------------------------------------------------------------


def test_help_lists_commands_and_version() -> None:
    out = psal("--help").stdout
    for command in ("inpaint", "colorize", "upscale", "models", "train", "eval"):
        assert command in out
        assert "Usage: psal" in psal(command, "--help").stdout
    assert psal("--version").stdout.strip().startswith("psal ")
    for command in ("inpaint", "colorize", "upscale"):
        text = psal(command, "--help").stdout
        assert "Examples" in text and "--output" in text and "--tile" in text


def test_help_imports_no_torch() -> None:
    """`psal COMMAND --help` answers without importing torch (seconds saved on every look)."""
    code = ("import sys; from psal_cli.cli import main; sys.argv = ['psal', 'eval', '--help']\n"
            "try: main()\nexcept SystemExit: pass\nassert 'torch' not in sys.modules, 'torch imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, env=psal_env(), timeout=120)
    assert result.returncode == 0, result.stderr
    assert b"--masks" in result.stdout


def test_choices_are_the_tasks_lists() -> None:
    from psal_cli.cli import Loss, Masks
    from psal_cli.tasks import inpaint, upscale

    assert [m.value for m in Masks] == list(inpaint.FAMILIES)
    assert [loss.value for loss in Loss] == list(upscale.LOSSES)
    for name in upscale.LOSSES:  # every name the CLI offers is a loss the task computes
        batch = {"image": torch.rand(1, 3, 4, 4), "target": torch.rand(1, 3, 4, 4)}
        assert upscale.loss_function(name)(lambda image: image, batch) > 0


def test_eval_help_states_the_camera_ranges() -> None:
    """`psal eval --degradation`'s help writes degradations.CAMERA out (the CLI cannot import it
    without torch): the ranges it states are the ones evaluated."""
    import typer.main

    from psal_cli.degradations import CAMERA

    command = typer.main.get_command(app).commands["eval"]
    text = next(p.help for p in command.params if p.name == "degradation")

    def span(pair: tuple[float, float]) -> str:
        return f"{pair[0]:g}-{pair[1]:g}"

    assert f"σ {span(CAMERA.blur_sigma)} px" in text and f"noisy (σ {span(CAMERA.noise_sigma)})" in text
    assert f"quality {span(CAMERA.jpeg_quality)}" in text and all(name in text for name in CAMERA.filters)


def test_python_m_runs_the_cli() -> None:
    result = subprocess.run([sys.executable, "-m", "psal_cli", "--version"], capture_output=True,
                            env=psal_env(), timeout=120)
    assert result.returncode == 0 and result.stdout.startswith(b"psal ")


# -- the three commands, every image mode ----------------------------------------------------


@pytest.mark.parametrize("mode", ["L", "LA", "RGB", "RGBA", "P", "I;16"])
def test_upscale_every_mode(mode: str) -> None:
    make_image("in.png", mode, size=(10, 6))
    psal("upscale", "in.png", "--scale", "2", "-o", "out.png")
    out = Image.open("out.png")
    assert out.size == (20, 12)
    assert out.mode == {"P": "RGB"}.get(mode, mode)
    if mode.endswith("A"):  # alpha upscaled alongside
        src_alpha = np.asarray(Image.open("in.png").getchannel("A"), dtype=float)
        assert abs(pixels("out.png")[..., -1].mean() - src_alpha.mean()) < 10


def test_upscale_default_scale_is_4_and_sixteen_bit_tiff() -> None:
    make_image("in.tif", "I;16", size=(8, 6))
    psal("upscale", "in.tif", "-o", "out.tif")
    out = Image.open("out.tif")
    assert (out.size, out.mode) == ((32, 24), "I;16")


@pytest.mark.parametrize("mode", ["L", "LA", "RGB", "RGBA", "I;16"])
def test_colorize_every_mode(mode: str) -> None:
    make_image("gray.png", mode)
    make_image("ref.jpg", "RGB", size=(16, 16), seed=1)
    psal("colorize", "gray.png", "--reference", "ref.jpg", "-o", "out.png")
    out = Image.open("out.png")
    assert out.size == (20, 12)
    assert out.mode == ("RGBA" if mode.endswith("A") else "RGB")


@pytest.mark.parametrize("mode", ["L", "LA", "RGB", "RGBA", "I;16"])
def test_inpaint_every_mode_keeps_known_pixels(mode: str) -> None:
    make_image("in.png", mode)
    mask = np.zeros((12, 20), np.uint8)
    mask[3:7, 5:12] = 255
    Image.fromarray(mask).save("mask.png")
    psal("inpaint", "in.png", "--mask", "mask.png", "-o", "out.png")
    src, out = pixels("in.png"), pixels("out.png")
    assert Image.open("out.png").mode == mode
    assert np.array_equal(src[mask == 0], out[mask == 0])


def test_inpaint_mask_options(caplog: pytest.LogCaptureFixture) -> None:
    make_image("in.png", "RGBA")
    rgba = pixels("in.png").copy()
    rgba[..., 3] = 255
    rgba[2:5, 2:5, 3] = 0
    Image.fromarray(rgba).save("cut.png")
    psal("inpaint", "cut.png", "--mask-from-alpha", "-o", "a.png")
    assert (pixels("a.png")[..., 3] == 255).all()  # the hole is filled and opaque
    mask = np.zeros((12, 20), np.uint8)
    mask[:, :10] = 1  # any non-zero value is a hole
    Image.fromarray(mask).save("m.png")
    psal("inpaint", "in.png", "--mask", "m.png", "--invert-mask", "-o", "i.png")
    assert np.array_equal(pixels("i.png")[:, :10], pixels("in.png")[:, :10])
    psal("inpaint", "in.png", "--mask", "m.png", "--dilate", "2", "-o", "d.png")
    assert np.array_equal(pixels("d.png")[:, 12:], pixels("in.png")[:, 12:])
    assert not np.array_equal(pixels("d.png")[:, 10:12], pixels("in.png")[:, 10:12])


def test_inpaint_mask_problems() -> None:
    make_image("in.png", "RGB")
    Image.new("L", (40, 24)).save("empty.png")
    result = psal("inpaint", "in.png", "--mask", "empty.png", "-o", "same.png")
    assert "warning: in.png: mask is 40x24, the image 20x12: mask resized" in result.stderr
    assert "warning: in.png: the mask is empty" in result.stderr
    assert np.array_equal(pixels("same.png"), pixels("in.png"))
    Image.new("L", (20, 12), 255).save("full.png")
    result = psal("inpaint", "in.png", "--mask", "full.png", "-o", "x.png", code=1)
    assert "error: in.png: the mask covers the whole image" in result.stderr
    assert not Path("x.png").exists()
    result = psal("inpaint", "in.png", "--mask-from-alpha", "-o", "x.png", code=1)
    assert "error: in.png: --mask-from-alpha: the image has no alpha channel" in result.stderr
    from psal_cli import edit, imageio

    with pytest.raises(ValueError, match="^the image has no alpha channel"):  # the library names no option
        edit.hole_mask(imageio.read_image("in.png"), from_alpha=True)
    assert "--mask" in psal("inpaint", "in.png", "-o", "x.png", code=2).stderr
    Path("notes.png").write_text("not an image")
    result = psal("inpaint", "in.png", "--mask", "notes.png", "-o", "x.png", code=1)
    assert "error: in.png: notes.png: not an image file" in result.stderr
    assert not Path("x.png").exists() and not stray_files(".")


def test_quiet_run_with_device_options_prints_nothing() -> None:
    make_image("in.png")
    result = psal("upscale", "in.png", "--scale", "2", "-o", "out.png", "--quiet", "--device", "cpu",
                  "--threads", "1", "--tile", "0", "--tile-overlap", "2", "--half")
    assert result.stdout == "" and result.stderr == "" and Image.open("out.png").size == (40, 24)


def test_half_on_the_cpu_is_said_once_by_the_cli(caplog: pytest.LogCaptureFixture) -> None:
    make_image("in/a.png")
    make_image("in/b.png")
    result = psal("upscale", "in", "--scale", "2", "-o", "out", "--half", "--device", "cpu")
    assert result.stderr.count("warning: --half has no effect on the CPU") == 1
    from psal_cli.engine import Options, run_network
    from tiny_networks import TinyUpscale

    model = TinyUpscale(TinyUpscale.Config())
    run_network(model, {"image": torch.rand(1, 3, 4, 4)}, Options(device="cpu", half=True))
    assert caplog.records[-1].getMessage() == "half precision has no effect on the CPU: running in float32"


def smooth_image(size: tuple[int, int] = (64, 48)) -> Image.Image:
    """A clean photo-like image: smooth gradients, no noise."""
    y, x = np.mgrid[0:size[1], 0:size[0]].astype(np.float64)
    a = np.stack([100 + 80 * np.sin(x / 9), 120 + 60 * np.cos(y / 7), 90 + x + y / 2], -1)
    return Image.fromarray(a.round().clip(0, 255).astype(np.uint8))


def test_upscale_chooses_the_real_network_for_jpeg_and_noisy_inputs(weights: Path) -> None:
    """By default a JPEG or a noisy input gets upscale-real-x4, a clean one upscale-x4, each
    output what that file gives; --model real|bicubic forces one; without a real ×2 a JPEG
    falls back to the clean ×2 network and says so."""
    smooth_image().save("clean.png")
    smooth_image().save("photo.jpg", quality=70)
    noisy = np.asarray(smooth_image(), dtype=np.float64) + np.random.default_rng(0).normal(0, 6, (48, 64, 3))
    Image.fromarray(noisy.round().clip(0, 255).astype(np.uint8)).save("noisy.png")
    for name, family, why in [("clean.png", "upscale-x4", "a clean input"), ("photo.jpg", "upscale-real-x4", "a JPEG input"),
                              ("noisy.png", "upscale-real-x4", "visible noise")]:
        stem = Path(name).stem
        log = psal("upscale", name, "-o", f"{stem}_auto.png").stderr
        assert f"{name}: {family} ({why}" in log
        psal("upscale", name, "-o", f"{stem}_file.png", "--model", weights / f"{family}.safetensors")
        assert np.array_equal(pixels(f"{stem}_auto.png"), pixels(f"{stem}_file.png"))
    clean_net = pixels("photo_auto.png")
    log = psal("upscale", "photo.jpg", "-o", "forced.png", "--model", "bicubic").stderr
    assert "upscale-x4 (--model bicubic)" in log and not np.array_equal(pixels("forced.png"), clean_net)
    log = psal("upscale", "clean.png", "-o", "forced_real.png", "--model", "real").stderr
    assert "upscale-real-x4 (--model real)" in log
    assert not np.array_equal(pixels("forced_real.png"), pixels("clean_file.png"))
    log = psal("upscale", "photo.jpg", "-o", "x2.png", "--scale", "2").stderr
    assert "upscale-x2 enlarges every input (no real-photo ×2 network is installed)" in log
    result = psal("upscale", "photo.jpg", "-o", "none.png", "--scale", "2", "--model", "real", code=1)
    assert "no trained real-photo upscale ×2 model" in result.stderr and "upscale-real-x2.safetensors" in result.stderr
    assert not Path("none.png").exists()
    assert "(--model real)" not in result.stderr  # no line names a network that is not there


def test_upscale_ensemble_averages_views() -> None:
    make_image("in.png")
    psal("upscale", "in.png", "--scale", "2", "-o", "plain.png")
    psal("upscale", "in.png", "--scale", "2", "--ensemble", "-o", "ensemble.png")
    a, b = pixels("plain.png"), pixels("ensemble.png")
    assert a.shape == b.shape == (24, 40, 3) and not np.array_equal(a, b)


def test_seed_makes_runs_repeatable() -> None:
    make_image("in.png")
    psal("upscale", "in.png", "--scale", "2", "--seed", "3", "-o", "a.png")
    psal("upscale", "in.png", "--scale", "2", "--seed", "3", "-o", "b.png")
    assert Path("a.png").read_bytes() == Path("b.png").read_bytes()


def test_python_api_gives_what_the_cli_writes(weights: Path) -> None:
    from psal_cli import edit, imageio, modelfile
    from psal_cli.engine import Options

    make_image("in.png", "RGBA")
    psal("upscale", "in.png", "-o", "cli.png", "--seed", "5")
    model, info = modelfile.load_model(weights / "upscale-x4.safetensors", task="upscale")
    big = edit.upscale(model, imageio.read_image("in.png"), Options(seed=5))
    imageio.write_image(big, "api.png")
    assert info.scale == 4 and np.array_equal(pixels("api.png"), pixels("cli.png"))


# -- standard input and output ----------------------------------------------------------------


def test_stdin_to_stdout_in_process() -> None:
    data = make_image("in.png").read_bytes()
    result = psal("upscale", "-", "--scale", "2", "-o", "-", "--ext", "webp", input=data)
    assert Image.open(io.BytesIO(result.stdout_bytes)).format == "WEBP"  # logs went to stderr


@pytest.mark.parametrize("fmt, written", [("MPO", "JPEG"), ("GIF", "PNG"), ("PPM", "PNG")])
def test_stdout_of_a_format_psal_cannot_write(fmt: str, written: str) -> None:
    """Phone JPEGs open as MPO; GIF and PPM are read but not written: stdout gets JPEG or PNG."""
    a, b = Image.new("RGB", (10, 6), "red"), Image.new("RGB", (10, 6), "blue")
    buf = io.BytesIO()
    a.save(buf, fmt, **({"save_all": True, "append_images": [b]} if fmt == "MPO" else {}))
    assert Image.open(io.BytesIO(buf.getvalue())).format == fmt
    result = psal("upscale", "-", "--scale", "2", "-o", "-", input=buf.getvalue())
    out = Image.open(io.BytesIO(result.stdout_bytes))
    assert (out.format, out.size) == (written, (20, 12))


def test_ext_applies_to_stdout_without_o() -> None:
    data = make_image("in.png").read_bytes()
    result = psal("upscale", "-", "--scale", "2", "--ext", "jpg", input=data)
    assert Image.open(io.BytesIO(result.stdout_bytes)).format == "JPEG"


def test_pipeline_of_real_processes() -> None:
    """cat a.png | psal upscale - --scale 2 -o - | psal colorize - --reference r.png -o out.png"""
    data = make_image("a.png", "L").read_bytes()
    make_image("r.png", "RGB", seed=2)
    up = run_psal("upscale", "-", "--scale", "2", "-o", "-", input=data)
    assert up.returncode == 0, up.stderr
    col = run_psal("colorize", "-", "--reference", "r.png", "-o", "out.png", input=up.stdout)
    assert col.returncode == 0, col.stderr
    assert Image.open("out.png").size == (40, 24) and Image.open("out.png").mode == "RGB"


def test_json_summary_and_refusing_stdout_with_json() -> None:
    make_image("in.png")
    summary = json.loads(psal("upscale", "in.png", "--scale", "2", "-o", "o.png", "--json").stdout)
    assert summary["done"] == 1 and summary["failed"] == 0
    (item,) = summary["results"]
    assert item["output"] == "o.png" and item["status"] == "done" and item["error"] is None
    assert "--json" in psal("upscale", "in.png", "-o", "-", "--json", code=2).stderr


# -- batches ------------------------------------------------------------------------------


def test_batch_with_a_corrupt_file_goes_on() -> None:
    for name in ("a", "b", "sub/c"):
        make_image(f"in/{name}.png")
    Path("in/broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    result = psal("upscale", "in", "-r", "--scale", "2", "-o", "out", "--json", code=1)
    assert "in/broken.png: " in result.stderr
    assert sorted(p.as_posix() for p in Path("out").rglob("*.png")) == ["out/a.png", "out/b.png",
                                                                      "out/sub/c.png"]
    summary = json.loads(result.stdout)
    assert (summary["done"], summary["failed"]) == (3, 1)
    assert not stray_files(".")


def test_batch_naming_glob_suffix_ext_quality() -> None:
    make_image("pics/a.png")
    make_image("pics/b.png")
    psal("upscale", "pics/*.png", "--scale", "2", "-o", "out", "--suffix", "_x2", "--ext", "jpg",
         "--quality", "80")
    assert sorted(p.name for p in Path("out").iterdir()) == ["a_x2.jpg", "b_x2.jpg"]
    psal("upscale", "pics/a.png", "--scale", "2")  # no -o: beside the input
    assert Path("pics/a_upscaled.png").exists()


def test_input_format_psal_cannot_write_gets_png() -> None:
    make_image("a.gif")
    make_image("b.ppm", seed=1)
    psal("upscale", "a.gif", "--scale", "2")
    assert Image.open("a_upscaled.png").size == (40, 24)
    psal("upscale", "a.gif", "b.ppm", "--scale", "2", "-o", "out")
    assert sorted(p.name for p in Path("out").iterdir()) == ["a.png", "b.png"]
    result = psal("upscale", "a.gif", "--scale", "2", "-o", "a.gif.out.gif", code=2)
    assert "unknown image extension '.gif'" in result.stderr  # refused before any work


def test_masks_and_references_matched_by_stem() -> None:
    for name in ("a", "b"):
        make_image(f"in/{name}.png")
        make_image(f"refs/{name}.jpg", seed=3)
    mask = np.zeros((12, 20), np.uint8)
    mask[4:8, 4:8] = 255
    Path("masks").mkdir()
    Image.fromarray(mask).save("masks/a.png")
    psal("colorize", "in", "--reference", "refs", "-o", "col")
    assert len(list(Path("col").iterdir())) == 2
    result = psal("inpaint", "in", "--mask", "masks", "-o", "fill", code=1)
    assert "in/b.png: no mask named b.* in masks" in result.stderr
    assert [p.name for p in Path("fill").iterdir()] == ["a.png"]


def test_mask_matched_by_stem_alone_is_the_shallowest() -> None:
    make_image("q/x.jpg")
    for folder, box in (("masks/a", (slice(2, 6), slice(2, 6))), ("masks/z/b", (slice(6, 10), slice(12, 18)))):
        mask = np.zeros((12, 20), np.uint8)
        mask[box] = 255
        Path(folder).mkdir(parents=True)
        Image.fromarray(mask).save(f"{folder}/x.png")
    psal("inpaint", "q/x.jpg", "--mask", "masks", "-o", "by_stem.png")
    psal("inpaint", "q/x.jpg", "--mask", "masks/a/x.png", "-o", "shallow.png")
    psal("inpaint", "q/x.jpg", "--mask", "masks/z/b/x.png", "-o", "deep.png")
    assert np.array_equal(pixels("by_stem.png"), pixels("shallow.png"))
    assert not np.array_equal(pixels("shallow.png"), pixels("deep.png"))


def test_skip_existing_overwrite_and_never_the_input() -> None:
    make_image("in/a.png")
    make_image("in/b.png")
    psal("upscale", "in", "--scale", "2", "-o", "out")
    Path("out/a.png").write_bytes(b"keep me")
    result = psal("upscale", "in", "--scale", "2", "-o", "out", code=1)
    assert "out/a.png: already exists" in result.stderr
    assert Path("out/a.png").read_bytes() == b"keep me"
    result = psal("upscale", "in", "--scale", "2", "-o", "out", "--skip-existing", "--json")
    assert [r["status"] for r in json.loads(result.stdout)["results"]] == ["skipped", "skipped"]
    psal("upscale", "in", "--scale", "2", "-o", "out", "--overwrite")
    assert Image.open("out/a.png").size == (40, 24)
    before = Path("in/a.png").read_bytes()
    result = psal("upscale", "in/a.png", "--scale", "2", "-o", "in/a.png", "--overwrite", code=1)
    assert "is the input" in result.stderr and Path("in/a.png").read_bytes() == before


def test_shards_partition_the_inputs() -> None:
    for i in range(5):
        make_image(f"in/{i}.png")
    seen = []
    for shard in ("1/2", "2/2"):
        result = psal("upscale", "in", "--scale", "2", "-o", "out", "--shard", shard, "--json")
        seen += [r["input"] for r in json.loads(result.stdout)["results"]]
    assert sorted(seen) == sorted(str(p) for p in Path("in").iterdir())
    assert "--shard 3/2" in psal("upscale", "in", "--shard", "3/2", code=2).stderr


def test_interrupted_write_leaves_no_file(monkeypatch: pytest.MonkeyPatch) -> None:
    make_image("in.png")

    def interrupted(fd: int) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(files.os, "fsync", interrupted)
    result = psal("upscale", "in.png", "--scale", "2", "-o", "out.png", code=130)
    assert "interrupted" in result.stderr
    assert sorted(p.name for p in Path(".").iterdir()) == ["in.png"]


def test_killed_batch_leaves_only_complete_files() -> None:
    """SIGTERM mid-batch (after the first output, well before the last: each 800-px PNG
    takes a while to write): status 143, the finished outputs whole, no partial file."""
    for i in range(40):
        make_image(f"in/{i:03}.png", size=(200, 200), seed=i)
    proc = subprocess.Popen(psal_command("upscale", "in", "--scale", "4", "-o", "out"),
                            env=psal_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not list(Path("out").glob("*.png")) and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert not stray_files(".")
    written = list(Path("out").iterdir())
    assert 0 < len(written) < 40  # the kill landed mid-batch
    for out in written:
        Image.open(out).load()  # every file there is whole


# -- errors --------------------------------------------------------------------------------


# Click words a range error by version: "less than or equal to 4" or "in the range 2<=x<=4".
RANGE = ("less than or equal to 4", "2<=x<=4")


@pytest.mark.parametrize("args, message", [
    (["upscale", "nope.png"], "nope.png: no such file or folder"),
    (["upscale", "*.gif"], "*.gif: no file matches"),
    (["upscale", "a.png", "b.png", "-o", "x.png"], "looks like a file, but there are 2 inputs"),
    (["upscale", "a.png", "-o", "x.gif"], "unknown image extension '.gif'"),
    (["upscale", "a.png", "-o", "newdir"], "no image extension (end it with / to name a folder)"),
    (["upscale", "a.png", "--ext", "gif", "-o", "d/"], "--ext .gif: unknown image format"),
    (["upscale", "a.png", "--model", "nope.safetensors"], "--model nope.safetensors: no such file"),
    (["upscale", "a.png", "--device", "tpu"], "--device: unknown device 'tpu'"),
    (["upscale", "a.png", "--device", "cuda:7"], "--device: device 'cuda:7'"),
    (["upscale", "a.png", "--scale", "5"], RANGE),
    (["upscale", "a.png", "--bogus"], "No such option"),
    (["colorize", "a.png"], "Missing option '--reference'"),
    (["colorize", "a.png", "--reference", "none.png"], "reference none.png: no such file"),
    (["upscale", "a.png", "-o", "b.png/x.png"], "cannot write in b.png: b.png is not a folder"),
    (["eval", "upscale", "--scale", "5", "--data", "."], RANGE),
    (["train", "upscale", "--scale", "5", "-o", "m.safetensors"], RANGE),
    (["eval", "inpaint", "--masks", "bogus", "--data", "."], "'bogus' is not one of"),
    (["eval", "upscale", "--data", "a.png"], "a.png: not a folder"),
    (["eval", "upscale", "--data", ".", "--limit", "1", "--save-metrics"], "no --limit"),
])
def test_usage_errors_exit_2(args: list[str], message: str | tuple[str, ...]) -> None:
    make_image("a.png")
    make_image("b.png")
    result = psal(*args, code=2)
    assert any(m in result.stderr for m in ((message,) if isinstance(message, str) else message))
    assert sorted(p.name for p in Path(".").iterdir()) == ["a.png", "b.png"]


def test_non_image_input_and_debug_traceback() -> None:
    Path("notes.png").write_text("hello")
    result = psal("upscale", "notes.png", "-o", "out.png", code=1)
    assert "notes.png: not an image file" in result.stderr
    result = runner.invoke(app, ["upscale", "notes.png", "-o", "out.png", "--debug"])
    assert result.exit_code == 1 and "Traceback" in result.stderr
    assert not Path("out.png").exists()


@pytest.mark.parametrize("debug", [False, True])
def test_other_libraries_tracebacks_only_with_debug(debug: bool) -> None:
    """asyncio logs "exception was never retrieved" with a traceback when a store drops a
    connection mid-write (s3fs): psal's own line reports that failure, --debug shows the rest."""
    script = (
        "import asyncio, gc; from psal_cli import cli\n"
        f"cli._setup_logging(quiet=False, debug={debug})\n"
        "f = asyncio.new_event_loop().create_future()\n"
        "f.set_exception(ConnectionResetError('Cannot write to closing transport'))\n"
        "del f; gc.collect()\n")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=psal_env())
    assert run.returncode == 0 and ("closing transport" in run.stderr) == debug, run.stderr


def test_no_installed_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PSAL_WEIGHTS", str(tmp_path / "empty"))
    make_image("in.png")
    result = psal("upscale", "in.png", "--scale", "3", "-o", "out.png", "--json", code=1)
    assert "no trained upscale ×3 model is installed" in result.stderr
    assert "upscale-x3.safetensors" in result.stderr and not Path("out.png").exists()
    assert "no trained upscale ×3" in json.loads(result.stdout)["error"]


def test_damaged_and_wrong_task_model(weights: Path) -> None:
    make_image("in.png")
    Path("cut.safetensors").write_bytes((weights / "inpaint.safetensors").read_bytes()[:-7])
    result = psal("inpaint", "in.png", "--mask", "in.png", "--model", "cut.safetensors", code=1)
    assert result.stderr.strip() == "error: cut.safetensors: truncated: " + result.stderr.split(
        "truncated: ")[1].strip()
    result = psal("upscale", "in.png", "--model", weights / "colorize.safetensors", code=1)
    assert "is a model for colorize, not for upscale" in result.stderr
    result = psal("upscale", "in.png", "--scale", "3", "--model", weights / "upscale-x2.safetensors",
                  code=2)
    assert "is a ×2 model" in result.stderr
    assert sorted(p.name for p in Path(".").iterdir()) == ["cut.safetensors", "in.png"]


# -- the real networks, randomly initialised ------------------------------------------------


@pytest.mark.parametrize("task", ["upscale", "colorize", "inpaint"])
def test_real_network_end_to_end(task: str) -> None:
    model = create_model(f"psal-{task}", **({"scale": 2} if task == "upscale" else {}))
    save_model(model, "model.safetensors")
    make_image("in.png", "RGBA", size=(24, 16))
    make_image("ref.png", "RGB", size=(20, 20), seed=1)
    mask = np.zeros((16, 24), np.uint8)
    mask[4:10, 6:14] = 255
    Image.fromarray(mask).save("mask.png")
    extra = {"upscale": [], "colorize": ["--reference", "ref.png"], "inpaint": ["--mask", "mask.png"]}
    psal(task, "in.png", "--model", "model.safetensors", "-o", "out.png", "--tile", "8", *extra[task])
    out = Image.open("out.png")
    assert out.mode == "RGBA" and out.size == ((48, 32) if task == "upscale" else (24, 16))


@pytest.mark.parametrize("task, side", [("upscale", 4), ("colorize", 5), ("inpaint", 5)])
def test_smallest_input_of_each_real_network(task: str, side: int) -> None:
    """A network runs at the smallest input it declares; a pixel less is one line naming the
    size and the minimum, exit status 1, no output. Colorize's image may be any size, its
    reference has the minimum."""
    model = create_model(f"psal-{task}", **({"scale": 2} if task == "upscale" else {}))
    save_model(model, "model.safetensors")
    what = "reference" if task == "colorize" else "image"
    for w, h in [(side, side), (side - 1, side), (side, side - 1)]:
        make_image("ref.png" if task == "colorize" else "in.png", size=(w, h))
        if task == "colorize":
            make_image("in.png", "L", size=(1, 1))
        mask = np.zeros((h, w), np.uint8)
        mask[h // 2, w // 2] = 255
        Image.fromarray(mask).save("mask.png")
        extra = {"upscale": [], "colorize": ["--reference", "ref.png"], "inpaint": ["--mask", "mask.png"]}[task]
        args = [task, "in.png", "--model", "model.safetensors", "-o", "out.png", *extra]
        if (w, h) == (side, side):
            psal(*args)
            Path("out.png").unlink()
        else:
            error = psal(*args, code=1).stderr.splitlines()[0]
            assert error == f"error: in.png: {what} too small ({w}×{h} px): psal-{task} needs at least {side}×{side}"
            assert not Path("out.png").exists()


# -- train and eval -------------------------------------------------------------------------


def test_train_then_eval_records_metrics() -> None:
    for i in range(3):
        make_image(f"photos/{i}.png", size=(40, 32), seed=i)
    common = ["--data", "photos", "--device", "cpu"]
    log = psal("train", "upscale", "--scale", "2", "--steps", "1", "--batch", "1", "--patch", "16", "--loss", "l2",
               "--rescale", "0.5", "--shuffle-colors", "-o", "new/m.safetensors", *common).stderr  # the folder is made when training starts
    assert "from step 0: 1 step, batches of 1 crops of 16 px, peak learning rate 0.001" in log  # the task's default lr
    psal("eval", "upscale", "--model", "new/m.safetensors", "--scale", "2", "--threads", "1",
         "--save-metrics", *common)
    rows = json.loads(psal("models", "new/m.safetensors", "--json").stdout)["models"]
    (row,) = [r for r in rows if r["file"] == "new/m.safetensors"]
    assert row["training"]["steps"] == 1 and set(row["metrics"]["photos"]) >= {"psnr", "ssim"}
    assert row["training"]["runs"][-1]["loss"] == "l2"
    assert row["training"]["augmented"] == ["rescale 0.5, colors True from step 0"]


def test_train_and_eval_usage_errors() -> None:
    make_image("photos/a.png", size=(40, 32))
    Path("m.safetensors").write_bytes(b"x")
    result = psal("train", "colorize", "--scale", "2", "-o", "new.safetensors", "--data", "photos", code=2)
    assert "--scale" in result.stderr and "does not apply to colorize" in result.stderr
    result = psal("train", "colorize", "--loss", "l2", "-o", "new.safetensors", "--data", "photos", code=2)
    assert "--loss" in result.stderr and "does not apply to colorize" in result.stderr
    assert "'l3' is not one of" in psal("train", "upscale", "--loss", "l3", "-o", "n.safetensors", code=2).stderr
    result = psal("train", "colorize", "-o", "n.safetensors", "--data", "photos", "--data", "photos", code=2)
    assert "several folders: colorize trains on one" in result.stderr
    result = psal("train", "upscale", "-o", "m.safetensors", "--data", "photos", code=2)
    assert "m.safetensors exists" in result.stderr and Path("m.safetensors").read_bytes() == b"x"
    assert "no such file" in psal("train", "upscale", "-o", "n.safetensors", "--data", "nope", code=2).stderr
    result = psal("eval", "upscale", "--model", "m.safetensors", "--data", "photos", code=1)
    assert "m.safetensors: not a safetensors model file" in result.stderr
    Path("empty").mkdir()
    result = psal("train", "upscale", "-o", "new/n.safetensors", "--data", "empty", code=1)
    assert "no images found in empty" in result.stderr
    psal("train", "colorize", "--scale", "2", "-o", "new/n.safetensors", "--data", "photos", code=2)
    assert not Path("new").exists()  # a refused run leaves no folder behind


def test_default_data_beside_the_checkout_or_the_current_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "SHARED_DATA", Path("nowhere"))  # an installed psal: no checkout beside it
    Path("work").mkdir()
    monkeypatch.chdir("work")
    for command in (["eval", "upscale"], ["train", "upscale", "-o", "m.safetensors"]):
        result = psal(*command, "--threads", "1", code=2)
        assert "no folder ../shared/data/" in result.stderr and "give a folder of photos" in result.stderr
    assert not Path("m.safetensors").exists()
    make_image("../shared/data/val/a.png", size=(40, 32))
    report = json.loads(psal("eval", "upscale", "--scale", "2", "--threads", "1", "--json").stdout)
    assert report["data"] == str(Path("..", "shared", "data", "val").resolve()) and len(report["images"]) == 1
    for name in ("b.png", "c.png"):  # beside the checkout: taken before the current folder's
        make_image(f"../checkout_data/val/{name}", size=(40, 32))
    monkeypatch.setattr(cli, "SHARED_DATA", Path("../checkout_data").resolve())
    report = json.loads(psal("eval", "upscale", "--scale", "2", "--threads", "1", "--json").stdout)
    assert [row["name"] for row in report["images"]] == ["b", "c"]


def test_train_and_eval_internal_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    import functools

    from psal_cli.tasks import upscale

    def broken(fn):  # same signature (the CLI checks the options against it), raises
        @functools.wraps(fn)
        def call(**kwargs: object) -> None:
            raise RuntimeError("boom")
        return call

    make_image("photos/a.png", size=(40, 32))
    monkeypatch.setattr(upscale, "evaluate", broken(upscale.evaluate))
    monkeypatch.setattr(upscale, "train", broken(upscale.train))
    for command in (["eval", "upscale"], ["train", "upscale", "-o", "m.safetensors"]):
        result = psal(*command, "--data", "photos", code=1)
        assert result.stderr == "error: internal error: RuntimeError: boom (run with --debug for details)\n"
        result = runner.invoke(app, [*command, "--data", "photos", "--debug"])
        assert result.exit_code == 1 and isinstance(result.exception, RuntimeError)


# -- models -----------------------------------------------------------------------------------


def test_models_lists_installed_and_given_files(weights: Path) -> None:
    shutil.copy(weights / "inpaint.safetensors", "mine.safetensors")
    Path("bad.safetensors").write_bytes(b"junk")
    result = psal("models", "mine.safetensors", "bad.safetensors", "--json", code=1)
    rows = {Path(r["file"]).name: r for r in json.loads(result.stdout)["models"]}
    assert rows["upscale-x4.safetensors"]["scale"] == 4
    assert rows["mine.safetensors"]["architecture"] == "test-tiny-inpaint"
    assert rows["mine.safetensors"]["metrics"] == {"psnr": 12.5}
    assert "not a safetensors model file" in rows["bad.safetensors"]["error"]
    assert [Path(p).name for p in json.loads(result.stdout)["not_installed"]] == ["upscale-x3.safetensors",
                                                                               "upscale-real-x2.safetensors"]
    table = psal("models").stdout
    assert "real photos" in table and "clean" in table  # both families of upscalers
    assert "test-tiny-colorize" in table and "psnr=12.50" in table and "bad.safetensors" not in table
    write_metrics(Path("mine.safetensors"), {"Set5": {"psnr": 30.1, "ssim": 0.91, "bicubic_psnr": 28.4}})
    table = psal("models", "mine.safetensors").stdout  # the model's own PSNR; baselines only in --json
    assert "Set5.psnr=30.10" in table and "bicubic" not in table and "0.91" not in table


@pytest.mark.parametrize("cores, busy, threads", [({0, 1}, 0, 2), ({0, 1}, 1, 1), ({0, 1}, 7, 1), ({3}, 0, 1),
                                                   (set(range(8)), 3, 5)])
def test_default_threads_are_the_idle_cores(cores: set[int], busy: int, threads: int, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from psal_cli import cli

    monkeypatch.setattr(cli.os, "sched_getaffinity", lambda pid: cores, raising=False)
    real_path = cli.Path
    loadavg = tmp_path / "loadavg"
    loadavg.write_text(f"9.00 9.00 9.00 {busy + 1}/300 4242\n")  # the lagging averages must not count
    monkeypatch.setattr(cli, "Path", lambda p: loadavg if str(p) == "/proc/loadavg" else real_path(p))
    assert cli.default_threads() == threads


@pytest.fixture
def two_cores(monkeypatch: pytest.MonkeyPatch) -> set[int]:
    """Two of this process's cores, the only ones psal may use (skips without /proc or two cores)."""
    if not Path("/proc/loadavg").exists():
        pytest.skip("reads /proc")
    from psal_cli import cli

    cores = set(sorted(os.sched_getaffinity(0))[:2])
    if len(cores) < 2:
        pytest.skip("needs two cores")
    monkeypatch.setattr(cli.os, "sched_getaffinity", lambda pid: cores)
    return cores


@contextmanager
def busy_process() -> Iterator[None]:
    """A real busy process (a spinning child) beside this one while the block runs."""
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        yield
    finally:
        spinner.kill()
        spinner.wait()


def test_default_threads_see_another_process_running(two_cores: set[int]) -> None:
    """A real busy process takes one core of the two this process may use."""
    from psal_cli import cli

    before = cli.default_threads()
    with busy_process():
        during = cli.default_threads()
    assert during == before - 1 or during == 1


def test_default_threads_of_two_processes_started_together_see_each_other(two_cores: set[int]) -> None:
    """Two processes that count the busy cores at the same moments (the second 1.5 ms behind,
    as two runs of `xargs -P 2` can be) must each see the other: both taking every core made
    their pair ten times slower."""
    code = ("import os, sys, time; from psal_cli import cli; "
            f"os.sched_getaffinity = lambda pid: {two_cores}; start = float(sys.argv[1]); "
            "time.sleep(max(0.0, start - time.time())); print(cli.default_threads())")
    for _ in range(3):
        start = time.time() + 1.0  # both past their imports by then
        runs = [subprocess.Popen([sys.executable, "-c", code, str(start + delay)], stdout=subprocess.PIPE, text=True,
                                 env=psal_env())
                for delay in (0.0, 0.0015)]
        assert [int(run.communicate()[0]) for run in runs] == [1, 1]


def test_default_threads_follow_other_work_between_tiles(two_cores: set[int]) -> None:
    """A batch's threads drop to one core while a real busy process runs beside it and come
    back when it ends; never more often than once a second, and never under --threads."""
    from psal_cli import cli

    before = torch.get_num_threads()
    try:
        shared = cli.SharedCores(None)
        if torch.get_num_threads() != 2:
            pytest.skip("other work keeps a core busy")
        fixed = cli.SharedCores(2)
        with busy_process():
            shared.tile(1, 3)
            assert torch.get_num_threads() == 2  # within the second since the start
            shared.due = fixed.due = 0.0
            fixed.tile(1, 3)
            assert torch.get_num_threads() == 2
            shared.tile(2, 3)
            assert torch.get_num_threads() == 1
        for _ in range(50):  # back to both cores once the machine is idle again (other work may linger)
            time.sleep(0.1)
            shared.due = 0.0
            shared.tile(3, 3)
            if torch.get_num_threads() == 2:
                break
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_unknown_precision_is_a_usage_error() -> None:
    make_image("in.png")
    result = psal("upscale", "in.png", "--precision", "fp16", code=2)
    assert "fp16" in result.stderr and not Path("in_upscaled.png").exists()
