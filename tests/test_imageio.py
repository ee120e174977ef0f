"""Image I/O: modes, 16-bit, EXIF orientation, ICC/EXIF carried, formats, failed writes."""

from __future__ import annotations

import io
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms

from conftest import make_image, psal_env
from psal_cli import imageio
from psal_cli.imageio import ImageError, from_tensor, read_image, to_tensor, write_image

LOSSLESS = ["png", "tif"]


@pytest.mark.parametrize("ext", LOSSLESS)
@pytest.mark.parametrize("mode", ["L", "LA", "RGB", "RGBA", "I;16"])
def test_lossless_round_trip_is_exact(tmp_path: Path, mode: str, ext: str) -> None:
    src = make_image(tmp_path / f"in.{ext}", mode)
    img = read_image(src)
    color, alpha = to_tensor(img)
    assert color.shape[1] == (1 if mode in ("L", "LA", "I;16") else 3)
    assert (alpha is not None) == mode.endswith("A")
    out = write_image(from_tensor(color, alpha, like=img), tmp_path / f"out.{ext}")
    back = Image.open(out)
    assert back.mode == mode
    assert np.array_equal(np.asarray(back), np.asarray(Image.open(src)))


def test_palette_and_bilevel_are_read_as_rgb_and_gray(tmp_path: Path) -> None:
    assert read_image(make_image(tmp_path / "p.png", "P")).mode == "RGB"
    Image.new("1", (4, 4)).save(tmp_path / "b.png")
    assert read_image(tmp_path / "b.png").mode == "L"
    p = Image.new("P", (4, 4))
    p.info["transparency"] = 0
    p.save(tmp_path / "pt.png")
    assert read_image(tmp_path / "pt.png").mode == "RGBA"


def test_sixteen_bit_keeps_full_precision(tmp_path: Path) -> None:
    a = np.arange(0, 65536, 257 // 2, dtype=np.uint16)[:256].reshape(16, 16)
    Image.fromarray(a).save(tmp_path / "g.png")
    color, _ = to_tensor(read_image(tmp_path / "g.png"))
    assert np.array_equal((color[0, 0].numpy() * 65535).round().astype(np.uint16), a)


@pytest.mark.parametrize("ext", ["jpg", "webp", "bmp", "png", "tif"])
def test_every_format_reads_and_writes(tmp_path: Path, ext: str) -> None:
    img = read_image(make_image(tmp_path / f"in.{ext}", "RGB"))
    out = write_image(img, tmp_path / f"out.{ext}", quality=90)
    assert Image.open(out).format == imageio.FORMATS[f".{ext}"]


def test_alpha_dropped_with_a_warning_for_jpeg(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    img = read_image(make_image(tmp_path / "in.png", "RGBA"))
    with caplog.at_level(logging.WARNING, logger="psal"):
        write_image(img, tmp_path / "out.jpg")
    assert "transparency dropped" in caplog.text
    assert Image.open(tmp_path / "out.jpg").mode == "RGB"


def test_quality_changes_lossy_size(tmp_path: Path) -> None:
    img = read_image(make_image(tmp_path / "in.png", "RGB", size=(64, 64)))
    low = write_image(img, tmp_path / "low.jpg", quality=10).stat().st_size
    high = write_image(img, tmp_path / "high.jpg", quality=100).stat().st_size
    assert low < high


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("mode", ["L", "LA", "RGB", "RGBA", "I;16"])
def test_png_deflated_in_parts_decodes_to_the_same_pixels(mode: str, threads: int,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """psal's own PNG writer, its stream cut into many parts, read back by Pillow: the same
    pixels, profile and EXIF (odd sizes, one-row parts, 16-bit big-endian samples)."""
    monkeypatch.setattr(imageio, "_PNG_PART", 64)  # even this small image cut into `threads` parts
    rng = np.random.default_rng(1)
    channels = {"L": 1, "I;16": 1, "LA": 2, "RGB": 3, "RGBA": 4}[mode]
    top = 65536 if mode == "I;16" else 256
    a = rng.integers(0, top, (37, 23, channels)).astype(np.uint16 if mode == "I;16" else np.uint8)
    a[:, :5] = a[:1, :5]  # repeated rows: what the Up filter turns into zeros
    img = Image.fromarray(a[..., 0] if channels == 1 else a, mode if mode == "LA" else None)
    assert img.mode == mode
    space = b"GRAY" if channels < 3 else b"RGB "  # the profile's colour space must be the pixels'
    img.info = {"icc_profile": b"\0" * 16 + space + bytes(range(256)) * 3,
                "exif": b"Exif\0\0" + Image.Exif().tobytes()[6:]}
    data = imageio.encode_image(img, "PNG", threads=threads)
    assert data.count(b"IDAT") == 1 and len(data) < a.nbytes + 2000  # compressed, sync flushes and all
    back = Image.open(io.BytesIO(data))
    assert back.mode == mode
    assert np.array_equal(np.asarray(back), np.asarray(img))
    assert back.info["icc_profile"] == img.info["icc_profile"]
    assert "exif" in back.info


def test_exif_orientation_applied_and_exif_icc_carried(tmp_path: Path) -> None:
    src = make_image(tmp_path / "raw.png", "RGB", size=(20, 12))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    exif[0x010F] = "psal-test-camera"  # Make
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    Image.open(src).save(tmp_path / "in.jpg", exif=exif, icc_profile=icc, quality=95)
    img = read_image(tmp_path / "in.jpg")
    assert img.size == (12, 20)
    out = write_image(from_tensor(*to_tensor(img), like=img), tmp_path / "out.png")
    back = Image.open(out)
    assert back.info.get("icc_profile") == icc
    assert back.getexif().get(0x010F) == "psal-test-camera"
    assert back.getexif().get(0x0112) in (None, 1)  # orientation applied, not re-applied later


def test_gray_profile_dropped_when_output_is_colour(tmp_path: Path) -> None:
    gray_icc = b"\0" * 16 + b"GRAY" + b"\0" * 108  # only the header's colour space matters here
    img = Image.new("RGB", (4, 4))
    img.info["icc_profile"] = gray_icc
    data = imageio.encode_image(img, "PNG")
    assert "icc_profile" not in Image.open(io.BytesIO(data)).info


@pytest.mark.parametrize("content, problem", [
    (b"hello, not an image", "not an image file"),
    (b"", "empty, no image in it"),
])
def test_unreadable_files_give_one_line(tmp_path: Path, content: bytes, problem: str) -> None:
    (tmp_path / "x.png").write_bytes(content)
    with pytest.raises(ImageError, match=problem):
        read_image(tmp_path / "x.png")


def test_truncated_image(tmp_path: Path) -> None:
    data = make_image(tmp_path / "ok.png", size=(64, 64)).read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="cut.png: damaged or truncated"):
        read_image(tmp_path / "cut.png")


def test_unknown_output_extension(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="unknown image extension '.gif'"):
        write_image(Image.new("RGB", (2, 2)), tmp_path / "out.gif")


def test_unwritable_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match=r"nope/out.png: cannot write \(No such file or directory\)"):
        write_image(Image.new("RGB", (2, 2)), tmp_path / "nope" / "out.png")


def test_encoding_a_format_psal_cannot_write() -> None:
    with pytest.raises(ImageError, match="x.gif: cannot write GIF"):
        imageio.encode_image(Image.new("RGB", (2, 2)), "GIF", name="x.gif")
    assert [imageio.output_format(f) for f in ("MPO", "GIF", "PPM", None, "WEBP")] == \
        ["JPEG", "PNG", "PNG", "PNG", "WEBP"]


def test_pillow_limit_is_raised_only_while_a_command_runs() -> None:
    """Importing the library leaves Pillow's process-wide decompression-bomb limit alone;
    `large_images` raises it for a block and puts it back."""
    code = ("from PIL import Image; before = Image.MAX_IMAGE_PIXELS\n"
            "import psal_cli.imageio, psal_cli.cli\n"
            "assert Image.MAX_IMAGE_PIXELS == before, Image.MAX_IMAGE_PIXELS")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, env=psal_env(), timeout=120)
    assert result.returncode == 0, result.stderr
    before = Image.MAX_IMAGE_PIXELS
    with imageio.large_images():
        assert Image.MAX_IMAGE_PIXELS == imageio.LARGE_IMAGE_PIXELS > before
    assert Image.MAX_IMAGE_PIXELS == before
