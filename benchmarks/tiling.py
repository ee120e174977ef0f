"""Peak memory and wall time of tiled inference at several image sizes.

Each measurement runs in a fresh subprocess so that its peak resident memory (ru_maxrss)
is its own. Uses the shipped weights when present, else the same architecture with
random weights (memory and time do not depend on the weights' values).

    python benchmarks/tiling.py --task upscale --scale 2 --megapixels 1 4 16 --tile 512
    python benchmarks/tiling.py --task upscale --scale 2 --size 3840x2160
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def measure(task: str, scale: int, width: int, height: int, tile: int, threads: int, save: str | None) -> dict:
    """Runs one image through the engine in this process; returns seconds and sizes."""
    import torch
    from PIL import Image

    from psal_cli import modelfile
    from psal_cli.engine import Options, run_network
    from psal_cli.networks import create_model

    torch.set_num_threads(threads)
    path = modelfile.default_model_path(task, scale if task == "upscale" else None)
    if path.exists():
        model, _ = modelfile.load_model(path, task=task)
        source = path.name
    else:
        model = create_model(f"psal-{task}", **({"scale": scale} if task == "upscale" else {}))
        source = "random weights"
    # A natural image at the requested size: a photo from examples/, resized.
    photo = Image.open(ROOT / "examples" / "coffee.png").convert("RGB").resize((width, height), Image.BICUBIC)
    image = torch.from_numpy(__import__("numpy").asarray(photo).copy()).permute(2, 0, 1)[None].float() / 255
    if task == "upscale":
        inputs = {"image": image}
    elif task == "colorize":
        ref = Image.open(ROOT / "examples" / "motorcycle_reference.png").convert("RGB").resize((width, height), Image.BICUBIC)
        reference = torch.from_numpy(__import__("numpy").asarray(ref).copy()).permute(2, 0, 1)[None].float() / 255
        inputs = {"gray": image.mean(1, keepdim=True), "reference": reference}
    else:  # inpaint: a 10 % box hole in the middle
        mask = torch.zeros(1, 1, height, width)
        h, w = int(height * math.sqrt(0.1)), int(width * math.sqrt(0.1))
        mask[..., (height - h) // 2 : (height + h) // 2, (width - w) // 2 : (width + w) // 2] = 1
        inputs = {"image": image * (1 - mask), "mask": mask}
    start = time.time()
    out = run_network(model, inputs, Options(device="cpu", tile=tile))
    seconds = time.time() - start
    if save:
        Image.fromarray((out[0].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()).save(save)
    return {"seconds": round(seconds, 2), "output": list(out.shape[-2:]), "weights": source}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=["upscale", "colorize", "inpaint"], default="upscale")
    parser.add_argument("--scale", type=int, default=2)
    parser.add_argument("--megapixels", type=float, nargs="*", default=[1, 4, 16])
    parser.add_argument("--size", help="WxH instead of --megapixels")
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--save", help="write the (last) output here, to look at it")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        width, height = map(int, args.child.split("x"))
        result = measure(args.task, args.scale, width, height, args.tile, args.threads, args.save)
        result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        print(json.dumps(result))
        return
    sizes = [tuple(map(int, args.size.split("x")))] if args.size else [
        (round(math.sqrt(mp * 1e6 * 4 / 3)), round(math.sqrt(mp * 1e6 * 3 / 4))) for mp in args.megapixels
    ]
    print(f"task {args.task}" + (f" x{args.scale}" if args.task == "upscale" else "") + f", tile {args.tile}, {args.threads} threads")
    print(f"{'input':>11} {'MP':>5} {'seconds':>8} {'peak RSS MB':>12}  output")
    for width, height in sizes:
        cmd = [sys.executable, __file__, "--task", args.task, "--scale", str(args.scale), "--tile", str(args.tile),
               "--threads", str(args.threads), "--child", f"{width}x{height}"] + (["--save", args.save] if args.save else [])
        run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if run.returncode:
            print(f"{width}x{height}: failed\n{run.stderr[-2000:]}")
            continue
        r = json.loads(run.stdout.strip().splitlines()[-1])
        print(f"{width:>5}x{height:<5} {width * height / 1e6:5.1f} {r['seconds']:8.1f} {r['peak_rss_mb']:12}  {r['output'][1]}x{r['output'][0]} ({r['weights']})")


if __name__ == "__main__":
    main()
