"""What `psal upscale`'s choice of network gives on JPEGs of high quality.

`psal upscale` gives every JPEG input the network for real photos (`edit.upscaler_for`),
which smooths what it takes for compression and noise: on a clean photo saved at a high
quality the network for clean inputs is sharper. This measures, on the selection photos
(`--data`: held out from training), two kinds of input saved at each `--qualities` quality:

  clean   the protocol's bicubic reduction, saved as JPEG
  camera  the camera-like draw of `psal eval upscale --degradation real --seed 1` (blur,
          filter, noise), saved at that quality instead of the draw's own

and for each, the mean Y PSNR of the clean network, the real network, and of a rule that
would take the quality into account: quality ≥ `--high` and `noise_level` below
`edit.NOISY` → the clean network, else the real one.

    python benchmarks/upscale_chooser.py --data selection --scale 4 --threads 2 --json benchmarks/results/upscale-chooser-x4.json
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import statistics
import sys
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout's psal_cli, installed or not
from psal_cli import degradations  # noqa: E402
from psal_cli.edit import NOISY  # noqa: E402
from psal_cli.modelfile import default_model_path, load_model  # noqa: E402
from psal_cli.tasks.upscale import degrade, upscale_tensor, y_metrics  # noqa: E402
from psal_cli.training import image_files, to_float  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="photos never trained on (the selection split)")
    parser.add_argument("--scale", type=int, default=4, choices=(2, 4))
    parser.add_argument("--qualities", type=int, nargs="+", default=[85, 90, 95, 98])
    parser.add_argument("--high", type=int, default=90, help="the rule's least quality for the clean network")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    networks = {family: load_model(default_model_path("upscale", args.scale, family), task="upscale")[0]
                for family in ("bicubic", "real")}
    rows = []
    for path in image_files(args.data):
        hr_image, clean_lr = degrade(Image.open(path).convert("RGB"), args.scale)
        hr = to_float(hr_image)
        recipe = degradations.camera(hr_image, args.scale, 1, path.stem)[1]
        for quality in args.qualities:
            inputs = {"clean": degradations.jpeg(clean_lr, quality),
                      "camera": degradations.apply(hr_image, args.scale, dataclasses.replace(
                          recipe, first=dataclasses.replace(recipe.first, quality=quality)))}
            for kind, lr in inputs.items():
                row = {"name": path.stem, "input": kind, "quality": quality, "noise_level": degradations.noise_level(lr)}
                for family, model in networks.items():
                    with torch.no_grad():
                        row[family] = y_metrics(upscale_tensor(model, to_float(lr)), hr, args.scale)[0]
                rows.append(row)

    summary = []
    for kind in ("clean", "camera"):
        for quality in args.qualities:
            got = [r for r in rows if r["input"] == kind and r["quality"] == quality]
            clean_by_rule = [quality >= args.high and r["noise_level"] < NOISY for r in got]
            rule = [r["bicubic"] if clean else r["real"] for r, clean in zip(got, clean_by_rule)]
            line = {"input": kind, "quality": quality, "photos": len(got),
                    "clean_network": statistics.mean(r["bicubic"] for r in got),
                    "real_network": statistics.mean(r["real"] for r in got),
                    "quality_rule": statistics.mean(rule),
                    "real_ahead": sum(r["real"] > r["bicubic"] for r in got),
                    "rule_picks_clean": sum(clean_by_rule)}
            summary.append(line)
            print(f"×{args.scale} {kind} JPEG q{quality}, {line['photos']} photos: clean network "
                  f"{line['clean_network']:.2f}, real network {line['real_network']:.2f} (ahead on "
                  f"{line['real_ahead']}), quality rule {line['quality_rule']:.2f} dB (clean network for "
                  f"{line['rule_picks_clean']})")
    if args.json:
        args.json.write_text(json.dumps({"scale": args.scale, "high": args.high, "noisy": NOISY,
                                         "summary": summary, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
