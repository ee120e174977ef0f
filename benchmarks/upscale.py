"""×4 on one photo the networks never saw: Y PSNR of bicubic, Lanczos and psal, and a crop figure.

The photo (default: astronaut.png from shared/data/samples, public domain) is the ground
truth; its Pillow-bicubic ×1/4 reduction is the input (the evaluation protocol's
degradation). `--crop FILE` writes three crops of the same region side by side,
enlarged ×2 with nearest neighbour so the pixels show: bicubic | psal | truth.

    python benchmarks/upscale.py --crop examples/astronaut_x4_crop.png
    python benchmarks/upscale.py --photo ../shared/data/samples/rocket.jpg --box 300 100 96
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from PIL import Image

from psal_cli import edit
from psal_cli.engine import Options
from psal_cli.imageio import to_tensor
from psal_cli.modelfile import default_model_path, load_model
from psal_cli.tasks.upscale import degrade, y_metrics

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photo", type=Path, default=ROOT.parent / "shared" / "data" / "samples" / "astronaut.png")
    parser.add_argument("--scale", type=int, default=4)
    parser.add_argument("--box", type=int, nargs=3, default=(170, 60, 128), metavar=("LEFT", "TOP", "SIDE"),
                        help="the crop, in pixels of the full-size photo")
    parser.add_argument("--crop", type=Path, help="write the bicubic | psal | truth crops here")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    model, _ = load_model(default_model_path("upscale", args.scale), task="upscale")
    truth, small = degrade(Image.open(args.photo).convert("RGB"), args.scale)
    results = {
        "bicubic": small.resize(truth.size, Image.Resampling.BICUBIC),
        "lanczos": small.resize(truth.size, Image.Resampling.LANCZOS),
        "psal": edit.upscale(model.eval(), small, Options(device="cpu")),
    }
    target = to_tensor(truth)[0]
    report = {name: round(y_metrics(to_tensor(image)[0], target, args.scale)[0], 2) for name, image in results.items()}
    print(json.dumps({"photo": args.photo.name, "scale": args.scale, "y_psnr": report}))

    if args.crop:
        left, top, side = args.box
        box = (left, top, left + side, top + side)
        tiles = [results["bicubic"].crop(box), results["psal"].crop(box), truth.crop(box)]
        gap, zoom = 4, 2
        figure = Image.new("RGB", (3 * side * zoom + 2 * gap, side * zoom), "white")
        for i, tile in enumerate(tiles):
            figure.paste(tile.resize((side * zoom, side * zoom), Image.Resampling.NEAREST), (i * (side * zoom + gap), 0))
        figure.save(args.crop)


if __name__ == "__main__":
    main()
