"""Time to encode an image as PNG: psal's writer on 1 and N threads against Pillow's.

    python benchmarks/write_png.py out.png            # an output of `psal upscale --scale 4`, say
    python benchmarks/write_png.py out.png --threads 2 --levels 1 6

A script, not a test. Prints, per encoder, the best of three runs (seconds) and the size in
MB; psal's output is checked to decode to the same pixels.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from psal_cli import imageio  # noqa: E402


def best_of_three(encode) -> tuple[float, bytes]:
    times, data = [], b""
    for _ in range(3):
        start = time.perf_counter()
        data = encode()
        times.append(time.perf_counter() - start)
    return min(times), data


def pillow(img: Image.Image, level: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", compress_level=level)
    return buf.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("image", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--levels", type=int, nargs="+", default=[1], help="Pillow's zlib levels to compare")
    args = parser.parse_args()
    img = Image.open(args.image)
    img.load()
    print(f"{args.image.name}: {img.width}×{img.height} {img.mode} ({img.width * img.height / 1e6:.1f} MP)")
    for threads in sorted({1, args.threads}):
        seconds, data = best_of_three(lambda: imageio.encode_image(img, "PNG", threads=threads))
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), np.asarray(img))
        print(f"psal, {threads} thread(s): {seconds:.2f} s, {len(data) / 1e6:.1f} MB")
    for level in args.levels:
        seconds, data = best_of_three(lambda: pillow(img, level))
        print(f"Pillow, level {level}: {seconds:.2f} s, {len(data) / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
