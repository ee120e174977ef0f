"""A scratch across a facade's windows: true | PatchMatch | Telea | psal, the README's picture.

The held-out Burano photo (benchmarks/inpaint_photos.py) at a long side of 1024 px gets a
7-px scratch across two rows of windows; each method fills it and a 400×200 crop of the
scratch is written side by side (examples/inpaint_facade_crop.png by default), with each
method's hole MAE (0–255) over the whole scratch printed.

    python benchmarks/inpaint_facade_crop.py --threads 1
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from inpaint_photos import load

ROOT = Path(__file__).resolve().parents[1]
PHOTO = "seondol-son-skcD9ONunJw"
SCRATCH = [(430, 330), (700, 262), (1010, 226)]  # through the windows of the red and green houses
CROP = (540, 160, 940, 360)  # left, top, right, bottom


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="model file (default: the shipped weights/inpaint)")
    parser.add_argument("--out", type=Path, default=ROOT / "examples" / "inpaint_facade_crop.png")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from psal_cli.modelfile import default_model_path, load_model
    from psal_cli.tasks.inpaint import inpaint_metrics, inpaint_tensor, opencv_inpaint, patchmatch_inpaint

    truth = load(PHOTO, 1024)
    h, w = truth.shape[-2:]
    canvas = Image.new("L", (w, h))
    ImageDraw.Draw(canvas).line(SCRATCH, fill=255, width=7)
    hole = torch.from_numpy(np.asarray(canvas) > 0)[None, None].float()
    seen = truth * (1 - hole)
    model = load_model(args.model or default_model_path("inpaint"), task="inpaint")[0].eval()
    outputs = {"true": truth, "PatchMatch": patchmatch_inpaint(seen, hole), "Telea": opencv_inpaint(seen, hole, "telea"),
               "psal": inpaint_tensor(model, seen, hole)}
    left, top, right, bottom = CROP
    gap = 6
    sheet = Image.new("RGB", (4 * (right - left) + 3 * gap, bottom - top + 18), "white")
    for i, (name, out) in enumerate(outputs.items()):
        if out is None:
            raise SystemExit(f"{name} is not installed (pip install 'psal-cli[eval]')")
        if name != "true":
            print(f"{name}: hole MAE {inpaint_metrics(out, truth, hole)['mae']:.1f}")
        rgb = (out[0].permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
        x = i * (right - left + gap)
        sheet.paste(Image.fromarray(rgb).crop(CROP), (x, 18))
        ImageDraw.Draw(sheet).text((x + 4, 3), name, fill="black")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
