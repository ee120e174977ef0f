"""Speed and peak memory of the three commands, float32 against the fast path, per device.

    python benchmarks/speed.py --threads 2                    # CPU: 1, 4 and 12 MP (the 12 MP ×4 takes long)
    python benchmarks/speed.py --sizes 1 4 --commands inpaint colorize
    python benchmarks/speed.py --device cuda                  # a GPU: float32 and --half, after a warm-up
    python benchmarks/speed.py --quality-only                 # only the quality deltas of --precision auto

A script, not a test. Inputs are a photo from shared/data/photos resized to each size in
megapixels (of the input: ×4 of 1 MP writes 16 MP): upscaled ×4; inpainted with an
elliptic hole of ~3 % of the image (an object's size); colorized after another photo. Each
row runs in a fresh process that loads the model, reads the image, runs the command once
(on a GPU after one warm-up call on a small crop) and reports the call's wall-clock
seconds and peak memory: resident (VmHWM) on the CPU, torch.cuda.max_memory_allocated on a
GPU. On the CPU the rows are `--precision fp32` and `auto` (bfloat16 convolutions where
the CPU has them natively); on a GPU float32 and `--half`.

The quality part runs `psal eval` with `--precision fp32` and `auto` on the same data and
records both means and their difference: the bound is 0.01 dB (Y-PSNR on Set5/Set14 at
×2/×3/×4, PSNR and hole MAE of the inpainting families, colorize PSNR).

Writes benchmarks/results/speed-<device>.json:
{"device", "machine", "threads", "rows": [{"command", "megapixels", "precision", "seconds", "peak_mb"}], "quality": {...}}
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))
PHOTO, REFERENCE = "alfred-schrock-shoE2y51uX0.jpg", "ja-san-miguel-_-QQuvAwQ-0.jpg"
COMMANDS = {"upscale": "upscale x4", "inpaint": "inpaint", "colorize": "colorize"}


def sized(name: str, megapixels: float):
    """shared/data/photos/<name> resized to `megapixels` (aspect kept, sides even)."""
    from PIL import Image

    photo = Image.open(DATA / "photos" / name).convert("RGB")
    scale = math.sqrt(megapixels * 1e6 / (photo.width * photo.height))
    return photo.resize((round(photo.width * scale / 2) * 2, round(photo.height * scale / 2) * 2), Image.BICUBIC)


def hole(size: tuple[int, int]):
    """An elliptic hole of ~3 % of the image, left of centre."""
    from PIL import Image, ImageDraw

    W, H = size
    mask = Image.new("L", size, 0)
    rx, ry = 0.11 * W, 0.085 * H  # π·rx·ry ≈ 3 % of W·H
    ImageDraw.Draw(mask).ellipse((0.4 * W - rx, 0.5 * H - ry, 0.4 * W + rx, 0.5 * H + ry), fill=255)
    return mask


def peak_mb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def child(spec: dict) -> dict:
    """One row, in this fresh process."""
    import torch

    from psal_cli import edit
    from psal_cli.engine import Options, resolve_device
    from psal_cli.modelfile import default_model_path, load_model

    torch.set_num_threads(spec["threads"])
    device = resolve_device(spec["device"])
    command, megapixels = spec["command"], spec["megapixels"]
    model = load_model(default_model_path(command, 4 if command == "upscale" else None), task=command)[0]
    options = Options(device=spec["device"], precision=spec["precision"], half=spec["half"])
    image = sized(PHOTO, megapixels)
    if command == "upscale":
        call = lambda img: edit.upscale(model, img, options)  # noqa: E731
    elif command == "inpaint":
        call = lambda img: edit.inpaint(model, img, edit.hole_mask(img, hole(img.size)), options)  # noqa: E731
    else:
        reference = sized(REFERENCE, megapixels)
        call = lambda img: edit.colorize(model, img.convert("L"), reference, options)  # noqa: E731
    if device.type == "cuda":  # kernels loaded and autotuned before timing
        call(image.crop((0, 0, 256, 256)))
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    call(image)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return {"seconds": time.perf_counter() - start, "peak_mb": peak_mb(device)}


def row(command: str, megapixels: float, precision: str, half: bool, device: str, threads: int) -> dict:
    spec = {"command": command, "megapixels": megapixels, "precision": precision, "half": half,
            "device": device, "threads": threads}
    run = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                         cwd=ROOT)
    if run.returncode:
        raise RuntimeError(f"{command} at {megapixels} MP ({precision}) failed:\n{run.stderr[-2000:]}")
    result = json.loads(run.stdout.strip().splitlines()[-1])
    name = "fp16" if half else precision
    return {"command": COMMANDS[command], "megapixels": megapixels, "precision": name, **result}


# (what, psal eval arguments, the figures compared, as paths into the report's mean):
# what the --precision bound is about.
QUALITY = [
    *((f"upscale x{s} {d}", ["upscale", "--scale", str(s), "--data", str(DATA / d)], [("psnr",)])
      for d in ("set5", "set14") for s in (2, 3, 4)),
    *((f"inpaint {m}", ["inpaint", "--masks", m], [("psnr",), ("mae",)]) for m in ("thin", "thick", "box")),
    ("colorize", ["colorize", "--no-nearest"], [("plain", "psnr"), ("flipped", "psnr")]),
]


def quality(threads: int, limit: int | None, only: list[str] | None) -> dict:
    """`psal eval` under --precision fp32 and auto: both means and auto − fp32."""
    out = {}
    for what, args, figures in QUALITY:
        if only and not any(what.startswith(o) for o in only):
            continue
        extra = ["--limit", str(limit)] if limit and "--data" not in args else []
        means = {}
        for precision in ("fp32", "auto"):
            run = subprocess.run([sys.executable, "-m", "psal_cli", "eval", *args, *extra, "--threads", str(threads),
                                  "--precision", precision, "--json"], capture_output=True, text=True, cwd=ROOT, check=True)
            means[precision] = json.loads(run.stdout)["mean"]
        out[what] = {"limit": limit if extra else None}
        for path in figures:
            value = {p: means[p] for p in means}
            for key in path:
                value = {p: v[key] for p, v in value.items()}
            out[what][" ".join(path)] = {**value, "delta": value["auto"] - value["fp32"]}
        print(what, json.dumps(out[what]), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--sizes", type=float, nargs="+", default=[1, 4, 12], help="input megapixels")
    parser.add_argument("--commands", nargs="+", choices=list(COMMANDS), default=list(COMMANDS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precisions", nargs="+", choices=["fp32", "auto"], default=["fp32", "auto"],
                        help="CPU rows to run (a GPU runs float32 and --half)")
    parser.add_argument("--quality-only", action="store_true", help="skip the speed rows")
    parser.add_argument("--no-quality", action="store_true", help="skip the quality deltas")
    parser.add_argument("--quality-sets", nargs="+", help="only these quality rows (prefixes: 'upscale x4 set5', 'inpaint', …)")
    parser.add_argument("--limit", type=int, default=20, help="photos of val/ per inpaint and colorize quality row")
    parser.add_argument("--out", type=Path, help="default: benchmarks/results/speed-<device>.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    import torch

    device = args.device.split(":")[0]
    out_path = args.out or ROOT / "benchmarks" / "results" / f"speed-{device}.json"
    machine = platform.machine()
    if Path("/proc/cpuinfo").exists():
        machine = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                        if line.startswith("model name")), machine)
    if device == "cuda":
        machine = torch.cuda.get_device_name(args.device)
    report = {"device": device, "machine": machine, "threads": args.threads, "rows": [], "quality": {}}
    if out_path.exists():  # keep what an earlier, partial run measured
        previous = json.loads(out_path.read_text())
        report["rows"], report["quality"] = previous.get("rows", []), previous.get("quality", {})
    print(f"{device} ({machine}), {args.threads} threads, load average {os.getloadavg()[0]:.1f}")
    print("| command | MP | precision | s | peak MB |\n|---|---|---|---|---|")
    variants = [("fp32", False), ("fp32", True)] if device == "cuda" else [(p, False) for p in args.precisions]
    for command in [] if args.quality_only else args.commands:
        for megapixels in args.sizes:
            for precision, half in variants:
                r = row(command, megapixels, precision, half, args.device, args.threads)
                report["rows"] = [x for x in report["rows"] if (x["command"], x["megapixels"], x["precision"])
                                  != (r["command"], r["megapixels"], r["precision"])] + [r]
                print(f"| {r['command']} | {megapixels:g} | {r['precision']} | {r['seconds']:.2f} | {r['peak_mb']:.0f} |",
                      flush=True)
                out_path.parent.mkdir(parents=True, exist_ok=True)
                out_path.write_text(json.dumps(report, indent=1))
    if device == "cpu" and not args.no_quality:
        report["quality"].update(quality(args.threads, args.limit, args.quality_sets))
        out_path.write_text(json.dumps(report, indent=1))
    print(f"written to {out_path}")


if __name__ == "__main__":
    main()
