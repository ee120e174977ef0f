"""Image files in and out with Pillow, and the float tensors the networks see.

Reading applies the EXIF orientation and normalises the many Pillow modes to a few
families: gray (L, I;16) or colour (RGB), each with or without alpha. Tensors are float
in [0, 1], shape (1, C, H, W), so 16-bit images keep their precision end to end.
Writing goes back to the input's family (16-bit stays 16-bit where the format allows),
carries the ICC profile and EXIF, and is atomic (psal_cli.files): a temporary file renamed
into place, so an interrupted run never leaves a partial output behind. PNG is written here,
not by Pillow, so that its deflate runs on several threads (`_png`).
"""

from __future__ import annotations

import io
import logging
import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from collections.abc import Iterator
from contextlib import contextmanager
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from psal_cli.files import WriteError, atomic_write
from psal_cli.storage import Remote

log = logging.getLogger("psal")
# Against decompression bombs Pillow warns above MAX_IMAGE_PIXELS (89 Mpixel) and refuses
# above twice that. psal is for large photos: warn above 0.5 Gpixel, refuse above 1 Gpixel.
LARGE_IMAGE_PIXELS = 2**29


@contextmanager
def large_images() -> Iterator[None]:
    """Pillow's decompression-bomb limit raised to `LARGE_IMAGE_PIXELS` while the block runs
    (Pillow keeps it process-wide: the `psal` commands raise it for their own run)."""
    before = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max(before or 0, LARGE_IMAGE_PIXELS)
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = before

# Format name (Pillow's) for each extension we read and write.
FORMATS = {
    ".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP",
    ".tif": "TIFF", ".tiff": "TIFF", ".bmp": "BMP",
}
_LOSSY = {"JPEG", "WEBP"}
_SIXTEEN = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
# Modes each output format can hold; others are converted (with a warning if alpha is lost).
_WRITABLE = {
    "PNG": {"L", "LA", "RGB", "RGBA", "I;16"},
    "TIFF": {"L", "LA", "RGB", "RGBA", "I;16"},
    "WEBP": {"RGB", "RGBA"},
    "JPEG": {"L", "RGB"},
    "BMP": {"L", "RGB"},
}


class ImageError(ValueError):
    """An image that cannot be read or written; the message says why in one line."""


def format_for(path: str | Path) -> str:
    """Pillow format name for an output path, from its extension."""
    ext = Path(path).suffix.lower()
    if ext not in FORMATS:
        known = ", ".join(sorted(FORMATS))
        raise ImageError(f"{path}: unknown image extension {ext or '(none)'!r} (use one of {known})")
    return FORMATS[ext]


# -- reading ----------------------------------------------------------------------------


def read_image(source: str | Path | Remote | BinaryIO | bytes, name: str | None = None) -> Image.Image:
    """Open an image (path, object in storage, bytes or binary stream), apply its EXIF
    orientation, load it.

    The result is in one of the modes L, LA, I;16, RGB, RGBA; its `info` keeps the ICC
    profile and EXIF (orientation removed, since it has been applied).
    """
    name = name or (str(source) if isinstance(source, (str, Path, Remote)) else "<stdin>")
    if isinstance(source, Remote):
        try:
            source = source.read_bytes()
        except FileNotFoundError:
            raise ImageError(f"{name}: no such file") from None
    empty = source == b"" or isinstance(source, (str, Path)) and os.path.isfile(source) and not os.path.getsize(source)
    if empty:
        raise ImageError(f"{name}: empty, no image in it")
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    try:
        with Image.open(source) as opened:
            fmt = opened.format
            img = ImageOps.exif_transpose(opened)
            img.load()
    except FileNotFoundError:
        raise ImageError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{name}: is a folder, not an image") from None
    except PermissionError:
        raise ImageError(f"{name}: permission denied") from None
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image file (or a format Pillow cannot read)") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"{name}: too large ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{name}: damaged or truncated image ({e})") from None
    img = _normalise_mode(img, name)
    img.format = fmt  # for writing to stdout in the input's format
    return img


def _normalise_mode(img: Image.Image, name: str) -> Image.Image:
    info = dict(img.info)
    mode = img.mode
    if mode in ("L", "LA", "RGB", "RGBA", "I;16"):
        return img
    if mode in _SIXTEEN:  # other 16-bit layouts and 32-bit int (16-bit TIFF/PNG variants)
        a = np.asarray(img).astype(np.int64)
        out = Image.fromarray(np.clip(a, 0, 65535).astype(np.uint16))
    elif mode == "1":
        out = img.convert("L")
    elif mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in img.info
        out = img.convert("RGBA" if has_alpha else "RGB")
    elif mode == "La":
        out = img.convert("LA")
    elif mode == "RGBa":
        out = img.convert("RGBA")
    elif mode in ("CMYK", "YCbCr", "LAB", "HSV", "RGBX"):
        out = img.convert("RGB")
        info.pop("icc_profile", None)  # a CMYK profile does not describe the RGB pixels
    else:
        raise ImageError(f"{name}: unsupported image mode {mode}")
    out.info = info
    return out


def is_gray(img: Image.Image) -> bool:
    return img.mode in ("L", "LA", "I;16")


def to_tensor(img: Image.Image) -> tuple[Tensor, Tensor | None]:
    """Split an image into colour (1, C, H, W), C = 1 (gray) or 3, and alpha (1, 1, H, W) or None."""
    scale = 65535.0 if img.mode == "I;16" else 255.0
    a = np.asarray(img)
    if a.ndim == 2:
        a = a[:, :, None]
    # Converted and transposed by torch, on its threads (numpy runs on one); 16-bit gray goes
    # through int32, since torch's uint16 has few operations.
    src = torch.from_numpy(a.astype(np.int32) if a.dtype == np.uint16 else np.require(a, requirements="W"))
    t = torch.empty(a.shape[2], a.shape[0], a.shape[1]).copy_(src.permute(2, 0, 1)).div_(scale)[None]  # (1, C, H, W)
    if img.mode in ("LA", "RGBA"):
        return t[:, :-1], t[:, -1:]
    return t, None


def to_rgb(x: Tensor) -> Tensor:
    """(B, 1 or 3, H, W) -> (B, 3, H, W); gray is repeated."""
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


# -- writing ----------------------------------------------------------------------------


def from_tensor(color: Tensor, alpha: Tensor | None, like: Image.Image) -> Image.Image:
    """Assemble an image from float tensors, in `like`'s bit depth, with its ICC profile and EXIF.

    `color` is (1, 1 or 3, H, W); `alpha` (1, 1, H, W) or None. A gray result of a
    16-bit input stays 16-bit (I;16); everything else is 8 bits per channel.
    """
    c = color[0].detach().float().clamp(0, 1).cpu()
    sixteen = like.mode == "I;16" and c.shape[0] == 1 and alpha is None
    scale = 65535.0 if sixteen else 255.0
    if alpha is not None:
        c = torch.cat([c, alpha[0].detach().float().clamp(0, 1).cpu()])
    # Rounded and converted by torch, on its threads: a 16 MP output is a 0.2 GB pass.
    a = c.mul(scale).round_().to(torch.int32 if sixteen else torch.uint8).permute(1, 2, 0).contiguous().numpy()
    a = a.astype(np.uint16) if sixteen else a
    img = Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a)  # L, I;16, LA, RGB or RGBA
    img.info = {k: like.info[k] for k in ("icc_profile", "exif") if like.info.get(k)}
    return img


def _fit_mode(img: Image.Image, fmt: str, name: str) -> Image.Image:
    """Convert to a mode the format can store; say so when alpha or bit depth is lost."""
    if img.mode in _WRITABLE[fmt]:
        return img
    info = img.info
    if img.mode == "I;16":
        log.warning("%s: %s has no 16-bit gray; writing 8 bits", name, fmt)
        out = Image.fromarray((np.asarray(img).astype(np.float32) / 257).round().astype(np.uint8))
        if "L" not in _WRITABLE[fmt]:
            out = out.convert("RGB")
    elif img.mode in ("LA", "RGBA"):
        if fmt == "WEBP":
            out = img.convert("RGBA")
        else:
            log.warning("%s: %s has no alpha channel; transparency dropped", name, fmt)
            out = img.convert("L" if img.mode == "LA" else "RGB")
    else:  # L into WebP
        out = img.convert("RGB")
    out.info = info
    return out


def _icc_fits(icc: bytes, mode: str) -> bool:
    """Whether an ICC profile's colour space (header bytes 16-20) matches the pixel mode."""
    space = icc[16:20]
    return space == (b"GRAY" if mode in ("L", "LA", "I;16") else b"RGB ")


def output_format(fmt: str | None) -> str:
    """The format to write an image read as `fmt` back in (standard output follows the input).

    Itself when psal writes it; JPEG for MPO (phone cameras' JPEGs with a preview open as
    MPO); else PNG, which holds every mode losslessly (GIF, PPM, ... or unknown).
    """
    fmt = "JPEG" if fmt == "MPO" else fmt
    return fmt if fmt in _WRITABLE else "PNG"


# PNG colour type and bit depth of each mode psal writes (`_png`).
_PNG_TYPES = {"L": (0, 8), "I;16": (0, 16), "RGB": (2, 8), "LA": (4, 8), "RGBA": (6, 8)}
# Filtered bytes deflated per thread at least: smaller parts gain less than a thread costs.
_PNG_PART = 1 << 21


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(body, zlib.crc32(kind)))


def _png(img: Image.Image, icc: bytes | None, exif: bytes | None, threads: int) -> bytes:
    """A PNG of an L, I;16, RGB, LA or RGBA image, with its ICC profile and EXIF if given.

    Written here rather than by Pillow so that the deflate runs in parallel: every row
    takes the Up filter (its difference from the row above: one vectorised subtraction,
    files within a few percent of Pillow's adaptive filters), the rows are cut into parts
    deflated on `threads` threads at zlib's fastest level, each part ending byte-aligned
    (a sync flush) so that their concatenation is one zlib stream (pigz's method).
    """
    color_type, depth = _PNG_TYPES[img.mode]
    a = np.asarray(img)
    if depth == 16:
        a = a.astype(">u2")  # PNG samples are big-endian
    rows = a.reshape(a.shape[0], -1).view(np.uint8)  # (H, row bytes)
    filtered = np.empty((rows.shape[0], rows.shape[1] + 1), dtype=np.uint8)
    filtered[:, 0] = 2  # Up
    filtered[:1, 1:] = rows[:1]
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])  # modulo 256, as the filter defines it
    data = memoryview(filtered.reshape(-1))
    count = max(1, min(threads, data.nbytes // _PNG_PART))  # parts: whole rows, as even as rows allow
    step = filtered.shape[1] * -(-filtered.shape[0] // count)
    parts = [data[i : i + step] for i in range(0, data.nbytes, step)]

    def deflate(i: int) -> bytes:
        z = zlib.compressobj(1, zlib.DEFLATED, -15)  # raw deflate: the header and checksum are the stream's
        return z.compress(parts[i]) + z.flush(zlib.Z_FINISH if i == len(parts) - 1 else zlib.Z_SYNC_FLUSH)

    with ThreadPoolExecutor(len(parts)) as pool:
        deflated = list(pool.map(deflate, range(len(parts))))
    stream = b"".join([b"\x78\x01", *deflated, struct.pack(">I", zlib.adler32(data))])
    out = [b"\x89PNG\r\n\x1a\n",
           _png_chunk(b"IHDR", struct.pack(">IIBBBBB", img.width, img.height, depth, color_type, 0, 0, 0))]
    if icc:
        out.append(_png_chunk(b"iCCP", b"ICC Profile\0\0" + zlib.compress(icc)))
    if exif:
        out.append(_png_chunk(b"eXIf", exif[6:] if exif.startswith(b"Exif\0\0") else exif))
    out += [_png_chunk(b"IDAT", stream[i : i + (1 << 24)]) for i in range(0, len(stream), 1 << 24)]
    out.append(_png_chunk(b"IEND", b""))
    return b"".join(out)


def encode_image(img: Image.Image, fmt: str, *, quality: int | None = None, name: str = "",
                 threads: int | None = None) -> bytes:
    """Encode to bytes in `fmt` (a key of _WRITABLE), keeping ICC and EXIF where possible.

    PNG is deflated on `threads` threads (default: torch's, the process's budget)."""
    if fmt not in _WRITABLE:
        raise ImageError(f"{name}: cannot write {fmt} (known: {', '.join(sorted(_WRITABLE))})")
    img = _fit_mode(img, fmt, name)
    params: dict[str, object] = {}
    icc = img.info.get("icc_profile")
    if icc and fmt != "BMP":
        if _icc_fits(icc, img.mode):
            params["icc_profile"] = icc
        else:
            log.info("%s: colour profile dropped (it describes %s, the output is %s)",
                     name, icc[16:20].decode("ascii", "replace").strip(), img.mode)
    if img.info.get("exif") and fmt != "BMP":
        params["exif"] = img.info["exif"]
    if fmt in _LOSSY:
        params["quality"] = 95 if quality is None else quality
    if fmt == "TIFF":
        params["compression"] = "tiff_deflate"
    if fmt == "PNG" and img.mode in _PNG_TYPES:
        return _png(img, params.get("icc_profile"), params.get("exif"),
                    torch.get_num_threads() if threads is None else threads)
    buf = io.BytesIO()
    info, img.info = img.info, {}  # Pillow falls back on `info`: only `params` may be written
    try:
        img.save(buf, fmt, **params)
    except (OSError, ValueError) as e:
        raise ImageError(f"{name}: cannot write {fmt} ({e})") from None
    finally:
        img.info = info
    return buf.getvalue()


def write_image(
    img: Image.Image,
    path: str | Path | Remote,
    *,
    quality: int | None = None,
    overwrite: bool = False,
) -> Path | Remote:
    """Write atomically; the format follows the extension; `quality` (1-100) for JPEG/WebP."""
    path = path if isinstance(path, Remote) else Path(path)
    data = encode_image(img, format_for(str(path)), quality=quality, name=str(path))
    try:
        with (path.atomic_write(overwrite=overwrite) if isinstance(path, Remote)
              else atomic_write(path, overwrite=overwrite)) as f:
            f.write(data)
    except WriteError as e:
        raise ImageError(str(e)) from None
    return path
