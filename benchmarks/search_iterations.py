"""How many PatchMatch iterations, and propagated matches, the upscaler needs on a 1-megapixel feature map.

The evaluation sets are too small for the question (a ×4 BSD100 input has 10 k
positions: the exact search runs there), so this tiles all 100 BSD100 photos into one
4800×3200 image (portrait ones turned, each cut to 480×320), shrinks it ×4 with Pillow
bicubic (the evaluation protocol) to 1200×800 = 0.96 MP and upscales it back through the
engine, as `psal upscale` would, for each iteration count and seed: Y PSNR (4-px border)
and time. The search sees all 100 photos at once, so it has plenty of wrong places to look.

    python benchmarks/search_iterations.py --iterations 6 3 2 --seeds 0 1
    python benchmarks/search_iterations.py --iterations 2 --torch-loop --chunks 4096 65536 \
        --data ../shared/data/train --pick 1 4     # the matches a GPU's steps find, found on the CPU
    python benchmarks/search_iterations.py --iterations 3 --propagated 8 6 --seeds 0 1 \
        --data ../shared/data/train --pick 1 4     # 100 training photos: for choosing settings
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from psal_cli import attention
from psal_cli.engine import Options, run_network
from psal_cli.modelfile import default_model_path, load_model
from psal_cli.tasks.upscale import degrade, y_metrics
from psal_cli.training import image_files, to_float

ROOT = Path(__file__).resolve().parents[1]


def mosaic(folder: Path, pick: slice = slice(None), columns: int = 10, tile: tuple[int, int] = (480, 320)) -> Image.Image:
    """The folder's photos, landscape and cut to `tile`, side by side in rows of `columns`."""
    cells = []
    for path in image_files(folder)[pick]:
        photo = Image.open(path).convert("RGB")
        if photo.height > photo.width:
            photo = photo.transpose(Image.Transpose.ROTATE_90)
        cells.append(np.asarray(photo)[: tile[1], : tile[0]])
    rows = [np.concatenate(cells[i : i + columns], 1) for i in range(0, len(cells) - columns + 1, columns)]
    return Image.fromarray(np.concatenate(rows, 0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "val")
    parser.add_argument("--model", type=Path, default=default_model_path("upscale", 4))
    parser.add_argument("--iterations", type=int, nargs="+", default=[6, 3, 2])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--chunks", type=int, nargs="+", default=[attention._CHUNK],
                        help="queries per PatchMatch step of the torch loop (--torch-loop; a GPU's are larger)")
    parser.add_argument("--torch-loop", action="store_true",
                        help="search with the torch loop (a GPU's) instead of the compiled one, which ignores --chunks")
    parser.add_argument("--pick", type=int, nargs=2, default=[0, 1], metavar=("START", "STEP"),
                        help="the folder's photos START, START + STEP, … (sorted; rows of 10 are kept)")
    parser.add_argument("--propagated", type=int, nargs="+", default=[0],
                        help="matches each neighbour propagates (0: the model file's setting)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.chunks != [attention._CHUNK] and not args.torch_loop:
        parser.error("--chunks sets the torch loop's steps: give --torch-loop too")
    if args.torch_loop:
        attention.COMPILED_STEPS = 1 << 62  # no search is large enough for the compiled loop
    torch.set_num_threads(args.threads)
    model, _ = load_model(args.model, task="upscale")
    scale = model.config.scale
    hr_image, lr_image = degrade(mosaic(args.data, slice(args.pick[0], None, args.pick[1])), scale)
    hr, lr = to_float(hr_image), to_float(lr_image)
    bicubic = y_metrics(to_float(lr_image.resize(hr_image.size, Image.Resampling.BICUBIC)), hr, scale)[0]
    print(f"{args.model.name}, ×{scale} of a {lr_image.width}×{lr_image.height} mosaic of {args.data}: "
          f"bicubic {bicubic:.4f} dB, {args.threads} thread(s)")
    print(f"{'chunk':>6} {'iterations':>10} {'propagated':>10} {'seed':>4} {'Y PSNR dB':>10} {'seconds':>8}")
    psal = model.attention.psal
    for chunk, iterations, propagated in itertools.product(args.chunks, args.iterations, args.propagated):
        attention._CHUNK = chunk  # the matches a device with this step size finds, found on the CPU
        psal.iterations = iterations
        psal.propagated = propagated or model.config.propagated
        for seed in args.seeds:
            start = time.time()
            sr = run_network(model, {"image": lr}, Options(device="cpu", tile=512, seed=seed))
            shown = psal.propagated or 2 * psal.neighbors
            print(f"{chunk:>6} {iterations:>10} {shown:>10} {seed:>4} {y_metrics(sr, hr, scale)[0]:10.4f} "
                  f"{time.time() - start:8.1f}", flush=True)


if __name__ == "__main__":
    main()
