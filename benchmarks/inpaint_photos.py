"""Inpainting at the resolutions people edit: held-out 2048-px photos, reduced to ~1024 px.

Each photo of `--photos` (names in ../shared/data/photos, default: HELD_OUT, never trained
on) is reduced with Lanczos to a long side of `--size` and gets the seeded masks of `psal
eval inpaint` (`eval_mask(family, H, W, index, seed)`, index = its place in the list), or
the `object` family: an ellipse over 3 % of the photo, a removed object (`object_mask`).
Methods: psal with the shipped settings and with each `--variant` (config overrides of
the model), OpenCV Telea and Navier–Stokes, and PatchMatch inpainting (pypatchmatch,
15×15 patches; `--no-patchmatch` skips it). The classical outputs are cached under
`--cache` (PatchMatch takes over a minute per photo). Reported per family: PSNR dB / hole
MAE (0–255) / sharpness % of the true image's, over all photos and over the REPEATED ones
(facades, tiles, shelves: structure that repeats itself), then as JSON with `--json`.

    python benchmarks/inpaint_photos.py --threads 1 --families thin
    python benchmarks/inpaint_photos.py --variant nocopy:copy=false --variant p9:copy_patch=9
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout's psal_cli, installed or not
from psal_cli.choices import MASK_FAMILIES  # noqa: E402
PHOTOS = ROOT.parent / "shared" / "data" / "photos"
# Held out from training and used to choose settings: a facade, two tilings, a shelf of
# boxes, pine cones (structure that repeats itself), then citrus slices, a duck, leaves.
REPEATED = ("seondol-son-skcD9ONunJw", "robert-horvick-1R4uPYipCFM", "jon-tyson-FKkK1hnTe-Q",
            "maxence-pira-dTXGbrcE5Ks", "la-partida-eterna-3jyGw513OP8")
HELD_OUT = (*REPEATED, "bruna-branco-7r1HxvVC7AY", "dennis-buchner-WATeNJyEUkA", "olena-ivanova-jKb0EfemiLk")


def load(name: str, size: int) -> torch.Tensor:
    """(1, 3, H, W) in [0, 1]: the photo with its long side reduced to `size` (Lanczos, as the photos were made)."""
    image = Image.open(PHOTOS / f"{name}.jpg").convert("RGB")
    factor = size / max(image.size)
    if factor < 1:
        image = image.resize((round(image.width * factor), round(image.height * factor)), Image.LANCZOS)
    return torch.from_numpy(np.asarray(image).astype(np.float32) / 255).permute(2, 0, 1)[None]


def classical(method: str, seen: torch.Tensor, hole: torch.Tensor, cache: Path | None, key: str) -> torch.Tensor | None:
    """A classical method's output, from the cache when it holds it."""
    from psal_cli.tasks.inpaint import opencv_inpaint, patchmatch_inpaint

    file = cache / f"{key}_{method}.png" if cache else None
    if file is not None and file.exists():
        return torch.from_numpy(np.asarray(Image.open(file)).astype(np.float32) / 255).permute(2, 0, 1)[None]
    out = patchmatch_inpaint(seen, hole) if method == "patchmatch" else opencv_inpaint(seen, hole, method)
    if out is not None and file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((out[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(file)
    return out


def object_mask(h: int, w: int, index: int, seed: int) -> np.ndarray:
    """The `object` family: an ellipse over ~3 % of the photo (a removed object, between the
    evaluation's strokes and boxes in size), its aspect and place drawn from (seed, index)."""
    rng = np.random.default_rng([seed, index, 3])
    aspect = rng.uniform(0.6, 1.6)
    area = 0.03 * h * w
    ry, rx = math.sqrt(area / math.pi * aspect), math.sqrt(area / math.pi / aspect)
    cy, cx = rng.uniform(0.2 * h + ry, 0.8 * h - ry), rng.uniform(0.2 * w + rx, 0.8 * w - rx)
    y, x = np.ogrid[:h, :w]
    return (((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1).astype(np.float32)


def variant(spec: str) -> tuple[str, dict]:
    """'name:key=value,key=value' → (name, overrides), values parsed as JSON where they parse."""
    name, _, rest = spec.partition(":")
    overrides = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return name, overrides


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", nargs="+", default=list(HELD_OUT))
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--families", nargs="+", default=list(MASK_FAMILIES), choices=[*MASK_FAMILIES, "object"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--model", type=Path, help="model file (default: the shipped weights/inpaint)")
    parser.add_argument("--variant", action="append", default=[], help="name:key=value,... config overrides")
    parser.add_argument("--no-shipped", action="store_true", help="measure only the variants")
    parser.add_argument("--no-patchmatch", action="store_true")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/psal_inpaint_cache"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from dataclasses import replace

    from psal_cli.modelfile import default_model_path, load_model
    from psal_cli.tasks.inpaint import eval_mask, inpaint_metrics, inpaint_tensor, sharpness_ratio

    model = load_model(args.model or default_model_path("inpaint"), task="inpaint")[0].eval()
    shipped = model.config
    variants = ([] if args.no_shipped else [("psal", {})]) + [variant(v) for v in args.variant]
    # Each variant is its own network (layers are built from the config), sharing the weights.
    networks = {}
    for name, overrides in variants:
        networks[name] = type(model)(replace(shipped, **overrides)).eval()
        networks[name].load_state_dict(model.state_dict())
    methods = [name for name, _ in variants] + ["telea", "ns"] + ([] if args.no_patchmatch else ["patchmatch"])
    rows = []
    for family in args.families:
        for seed in args.seeds:
            for index, name in enumerate(args.photos):
                truth = load(name, args.size)
                h, w = truth.shape[-2:]
                mask = object_mask(h, w, index, seed) if family == "object" else eval_mask(family, h, w, index, seed)
                hole = torch.from_numpy(mask)[None, None].float()
                seen = truth * (1 - hole)
                row = {"family": family, "seed": seed, "photo": name, "repeated": name in REPEATED,
                       "true_sharpness": sharpness_ratio(truth, hole)}
                for method, overrides in variants:
                    start = time.time()
                    out = inpaint_tensor(networks[method], seen, hole, seed)
                    row[f"{method}_seconds"] = time.time() - start
                    row.update({f"{method}_{k}": v for k, v in inpaint_metrics(out, truth, hole).items()})
                for method in methods[len(variants):]:
                    # The mask depends on the photo's place in the list too (eval_mask's index).
                    out = classical(method, seen, hole, args.cache, f"{args.size}_{family}_{seed}_{index}_{name}")
                    if out is not None:
                        row.update({f"{method}_{k}": v for k, v in inpaint_metrics(out, truth, hole).items()})
                rows.append(row)
                print(f"{family} {seed} {name[:20]:<20} " + "  ".join(
                    f"{m} {row[m + '_psnr']:.2f}/{row[m + '_mae']:.1f}" for m in methods if m + "_psnr" in row), flush=True)

    def mean(subset: list[dict], key: str) -> float:
        values = [r[key] for r in subset if key in r and not math.isnan(r[key])]
        return sum(values) / len(values) if values else math.nan

    summary = {}
    for family in args.families:
        for group, test in (("all", lambda r: True), ("repeated", lambda r: r["repeated"])):
            subset = [r for r in rows if r["family"] == family and test(r)]
            summary[f"{family}/{group}"] = {m: {"psnr": mean(subset, m + "_psnr"), "mae": mean(subset, m + "_mae"),
                                                "sharpness_rel": mean([{**r, "s": r[m + "_sharpness"] / r["true_sharpness"]}
                                                                       for r in subset if m + "_sharpness" in r], "s")}
                                            for m in methods}
    print(f"\n{'family':<16}" + "".join(f"{m:>22}" for m in methods))
    for group, figures in summary.items():
        print(f"{group:<16}" + "".join(
            f"{f['psnr']:7.2f} /{f['mae']:5.1f} /{100 * f['sharpness_rel']:4.0f}%" for f in figures.values()))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
