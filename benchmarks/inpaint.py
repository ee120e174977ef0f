"""Inpainting a 12-megapixel photo: time, peak memory and sharpness inside the hole.

The test photo is a 4000×3000 mosaic of real full-resolution textures (brick | grass |
gravel, each mirrored-tiled at its native resolution, so there is true fine detail
everywhere) with a 10 % box hole in the middle (or, with `--masks thin|thick`, the
evaluation's strokes). Methods, all on the same hole:

- psal: the shipped network through the engine (working size, then full-resolution PSAL detail);
- psal, no detail: the same network without the detail stage = what a resize-based tool gives;
- telea: OpenCV Telea (only if opencv-python-headless is installed; a benchmark-only extra).

Reported: seconds, peak resident memory (psal only: it runs first), hole MAE (0–255) and
the sharpness ratio (hole / known ring Laplacian energy, psal_cli.tasks.inpaint) beside
the true image's. `--crops DIR` writes a 512×512 crop from inside the hole for each method
and comparison.png, the README's picture (examples/inpaint_12mp_crop.png).

    python benchmarks/inpaint.py --threads 2
    python benchmarks/inpaint.py --threads 2 --masks thin
    python benchmarks/inpaint.py --textures ../shared/data/samples --crops /tmp/crops
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout's psal_cli, installed or not


def mosaic(folder: Path, width: int, height: int) -> torch.Tensor:
    """(1, 3, H, W) in [0, 1]: vertical bands of brick, grass and gravel, each mirror-tiled at native size."""
    bands = []
    for i, name in enumerate(("brick", "grass", "gravel")):
        tex = np.asarray(Image.open(folder / f"{name}.png").convert("RGB"))
        tile = np.concatenate([tex, tex[:, ::-1]], 1)
        tile = np.concatenate([tile, tile[::-1]], 0)  # seamless 2× mirror tile
        band_w = width // 3 + (width % 3 if i == 2 else 0)
        reps = (math.ceil(height / tile.shape[0]), math.ceil(band_w / tile.shape[1]), 1)
        bands.append(np.tile(tile, reps)[:height, :band_w])
    return torch.from_numpy(np.concatenate(bands, 1).astype(np.float32) / 255).permute(2, 0, 1)[None]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--textures", type=Path, default=ROOT.parent / "shared" / "data" / "samples",
                        help="folder with brick.png, grass.png, gravel.png")
    parser.add_argument("--size", default="4000x3000")
    parser.add_argument("--hole", type=float, default=0.10, help="area fraction of the centred box hole")
    parser.add_argument("--masks", choices=["box", "thin", "thick"], default="box",
                        help="the centred box, or the evaluation's strokes (psal eval inpaint's, seed 0) over the photo")
    parser.add_argument("--model", type=Path, help="model file (default: the shipped weights/inpaint)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--crops", type=Path, help="write 512×512 crops from inside the hole here")
    args = parser.parse_args()

    from psal_cli import modelfile
    from psal_cli.engine import Options, run_network
    from psal_cli.networks import create_model
    from psal_cli.tasks.inpaint import eval_mask, opencv_inpaint, sharpness_ratio

    torch.set_num_threads(args.threads)
    width, height = map(int, args.size.split("x"))
    truth = mosaic(args.textures, width, height)
    hole = torch.zeros(1, 1, height, width)
    h, w = int(height * math.sqrt(args.hole)), int(width * math.sqrt(args.hole))
    top, left = (height - h) // 2, (width - w) // 2
    hole[..., top : top + h, left : left + w] = 1
    if args.masks != "box":
        hole = torch.from_numpy(eval_mask(args.masks, height, width, 0))[None, None].float()
    seen = truth * (1 - hole)
    model, info = modelfile.load_model(args.model or modelfile.default_model_path("inpaint"), task="inpaint")
    plain = create_model(info.architecture, **{**info.config, "detail": False})
    plain.load_state_dict(model.state_dict())

    results, outputs = {}, {}
    for name, net in (("psal", model), ("psal, no detail", plain)):
        start = time.time()
        outputs[name] = run_network(net, {"image": seen, "mask": hole}, Options(device="cpu"))
        results[name] = {"seconds": round(time.time() - start, 1)}
        if name == "psal":
            results[name]["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    start = time.time()
    cv = opencv_inpaint(seen, hole, "telea")
    if cv is not None:
        outputs["telea"] = cv
        results["telea"] = {"seconds": round(time.time() - start, 1)}
    for name, out in outputs.items():
        out = torch.where(hole.bool(), (out.clamp(0, 1) * 255).round() / 255, truth)
        outputs[name] = out
        results[name]["hole_mae"] = round(255 * ((out - truth).abs() * hole).sum().item() / (3 * hole.sum().item()), 2)
        results[name]["sharpness"] = round(sharpness_ratio(out, hole), 3)
    results["truth"] = {"sharpness": round(sharpness_ratio(truth, hole), 3)}
    print(json.dumps({"size": f"{width}x{height}", "masks": args.masks, "hole": round(hole.mean().item(), 4),
                      "threads": args.threads, "results": results}, indent=1))
    if args.crops:
        args.crops.mkdir(parents=True, exist_ok=True)
        y, x = top + h // 2 - 256, left + 64  # straddles the hole's left edge: seam and inside
        for name, out in {"truth": truth, **outputs}.items():
            crop = out[0, :, y : y + 512, x - 128 : x + 384].permute(1, 2, 0).numpy()
            Image.fromarray((crop * 255).round().astype(np.uint8)).save(args.crops / f"{name.replace(', ', '_').replace(' ', '_')}.png")
        # the README's picture: 320×320 from the hole's left edge inwards, true | psal | Telea
        panels = [truth] + [outputs[name] for name in ("psal", "telea") if name in outputs]
        strip = torch.cat([out[0, :, y + 96 : y + 416, left : left + 320] for out in panels], dim=-1)
        Image.fromarray((strip.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(args.crops / "comparison.png")


if __name__ == "__main__":
    main()
