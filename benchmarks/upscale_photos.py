"""Upscaling at the sizes people edit: the held-out 2048-px photos, camera-like and clean.

The photos are the selection split of ../shared/data/photos (every tenth photo, from the
first: `training.selection_split`), which the real-photo networks never trained on. Each is
reduced ×scale by the camera-like pipeline of `psal eval upscale --degradation real` at
every `--seeds` seed (a new draw of blur, filter, noise and JPEG per photo and seed), and by
the clean protocol once, then enlarged by bicubic, the network for clean inputs and the one
for real photos. Printed: the mean Y-PSNR of each, and per photo and draw the real
network's gain over bicubic and over the clean network (mean, median, least).

    python benchmarks/upscale_photos.py --scale 4 --threads 2 --json benchmarks/results/upscale-photos-x4.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout's psal_cli, installed or not
from psal_cli.modelfile import default_model_path  # noqa: E402
from psal_cli.tasks.upscale import evaluate  # noqa: E402
from psal_cli.training import image_files, selection_split  # noqa: E402

PHOTOS = ROOT.parent / "shared" / "data" / "photos"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=int, default=4, choices=(2, 4))
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(1, 11)))
    parser.add_argument("--photos", type=Path, default=PHOTOS)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    networks = {"clean": default_model_path("upscale", args.scale), "real": default_model_path("upscale", args.scale, "real")}
    held_out = selection_split(image_files(args.photos))[1]
    with tempfile.TemporaryDirectory() as folder:
        for photo in held_out:
            Path(folder, photo.name).symlink_to(photo.resolve())
        runs = {(name, degradation, seed): evaluate(Path(folder), args.scale, path, seed=seed, degradation=degradation)
                for name, path in networks.items()
                for degradation, seeds in (("real", args.seeds), ("bicubic", [0]))
                for seed in seeds}

    def rows(name: str, degradation: str) -> list[dict]:
        return [row for (n, d, _), report in runs.items() if (n, d) == (name, degradation) for row in report.images]

    summary = {}
    for degradation in ("real", "bicubic"):
        real, clean = rows("real", degradation), rows("clean", degradation)
        over_bicubic = [r["psnr"] - r["bicubic_psnr"] for r in real]
        over_clean = [r["psnr"] - c["psnr"] for r, c in zip(real, clean)]
        summary[degradation] = {
            "photos": len(held_out), "draws": len(real),
            "bicubic": statistics.mean(r["bicubic_psnr"] for r in real),
            "clean_network": statistics.mean(r["psnr"] for r in clean),
            "real_network": statistics.mean(r["psnr"] for r in real),
            "real_over_bicubic": {"mean": statistics.mean(over_bicubic), "median": statistics.median(over_bicubic),
                                  "least": min(over_bicubic)},
            "real_over_clean": {"mean": statistics.mean(over_clean), "median": statistics.median(over_clean),
                                "least": min(over_clean)},
        }
        s = summary[degradation]
        print(f"×{args.scale} {'camera-like' if degradation == 'real' else 'clean'}, {s['photos']} photos, "
              f"{s['draws']} draws: bicubic {s['bicubic']:.2f}, clean network {s['clean_network']:.2f}, "
              f"real network {s['real_network']:.2f} dB; real over bicubic mean {s['real_over_bicubic']['mean']:+.2f} "
              f"median {s['real_over_bicubic']['median']:+.2f} least {s['real_over_bicubic']['least']:+.2f}; "
              f"over clean mean {s['real_over_clean']['mean']:+.2f} median {s['real_over_clean']['median']:+.2f} "
              f"least {s['real_over_clean']['least']:+.2f}")
    if args.json:
        report = {"scale": args.scale, "seeds": args.seeds, "photos": [p.stem for p in held_out],
                  "networks": {name: path.name for name, path in networks.items()},
                  "summary": summary,
                  "runs": [{"network": n, "degradation": d, "seed": s, "images": r.images} for (n, d, s), r in runs.items()]}
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
