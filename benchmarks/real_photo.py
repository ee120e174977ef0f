"""×4 of a photo as people have it, a JPEG: bicubic | network for clean inputs | network for real photos.

The photo (default: examples/coffee.png) is saved as JPEG at `--quality` and enlarged ×4
three ways; `--crop FILE` writes the same region of the three side by side (the region is
given in pixels of the JPEG, so each panel is 4× its side). With no reference to compare
against, this is a figure to look at: ringing, cracks along JPEG blocks, amplified noise.

    PYTHONPATH=. python benchmarks/real_photo.py --crop examples/real_photo_x4_crop.png
    PYTHONPATH=. python benchmarks/real_photo.py --photo ../shared/data/samples/chelsea.png --quality 60 --box 200 80 80
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import torch
from PIL import Image

from psal_cli import edit
from psal_cli.degradations import noise_level
from psal_cli.engine import Options
from psal_cli.imageio import read_image
from psal_cli.modelfile import default_model_path, load_model

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photo", type=Path, default=ROOT / "examples" / "coffee.png")
    parser.add_argument("--quality", type=int, default=65, help="JPEG quality of the input")
    parser.add_argument("--box", type=int, nargs=3, default=(100, 30, 64), metavar=("LEFT", "TOP", "SIDE"),
                        help="the region shown, in pixels of the JPEG")
    parser.add_argument("--clean", type=Path, default=default_model_path("upscale", 4))
    parser.add_argument("--real", type=Path, default=default_model_path("upscale", 4, "real"))
    parser.add_argument("--crop", type=Path, help="write the bicubic | clean network | real network crops here")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    buffer = io.BytesIO()
    Image.open(args.photo).convert("RGB").save(buffer, format="JPEG", quality=args.quality)
    photo = read_image(buffer.getvalue(), "jpeg")
    family, why = edit.upscaler_for(photo)
    results = {"bicubic": photo.resize((photo.width * 4, photo.height * 4), Image.Resampling.BICUBIC)}
    for name, path in (("clean", args.clean), ("real", args.real)):
        model, _ = load_model(path, task="upscale")
        results[name] = edit.upscale(model, photo, Options(device="cpu"))
    print(json.dumps({"photo": args.photo.name, "quality": args.quality, "jpeg_bytes": len(buffer.getvalue()),
                      "noise_level": round(noise_level(photo), 2), "psal_upscale_picks": [family, why]}))

    if args.crop:
        left, top, side = args.box
        box = (4 * left, 4 * top, 4 * (left + side), 4 * (top + side))
        gap = 4
        figure = Image.new("RGB", (3 * 4 * side + 2 * gap, 4 * side), "white")
        for i, name in enumerate(("bicubic", "clean", "real")):
            figure.paste(results[name].crop(box), (i * (4 * side + gap), 0))
        figure.save(args.crop)


if __name__ == "__main__":
    main()
