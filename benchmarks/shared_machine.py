"""Several `psal` processes sharing one machine: two inpaints started together against the
same two one after the other, with the default threads.

    python benchmarks/shared_machine.py                 # 768×512 photo, object-sized hole, 3 rounds
    python benchmarks/shared_machine.py --size 481x321 --rounds 5

A script, not a test. Each round runs `psal inpaint` on two copies of one photo (from
shared/data/photos, resized) with an elliptic hole of ~8 % of the image: first one after the
other, then both at once, every process with psal's default threads (no --threads). Prints,
per round, the wall-clock seconds of both ways and the peak resident memory of the largest
process, then the medians and their ratio (together / one after the other: at most 1.0 means
that sharing the machine costs nothing). Writes benchmarks/results/concurrent-cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
PHOTO = "alfred-schrock-shoE2y51uX0.jpg"


def inputs(folder: Path, size: tuple[int, int]) -> tuple[Path, Path]:
    from PIL import Image, ImageDraw

    photo = Image.open(DATA / "photos" / PHOTO).convert("RGB").resize(size, Image.BICUBIC)
    photo.save(folder / "photo.png")
    W, H = size
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).ellipse([0.3 * W, 0.35 * H, 0.3 * W + 0.3 * W, 0.35 * H + 0.34 * H], fill=255)  # ~8 %
    mask.save(folder / "mask.png")
    return folder / "photo.png", folder / "mask.png"


def command(photo: Path, mask: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "psal_cli", "inpaint", str(photo), "--mask", str(mask), "-o", str(out),
            "--overwrite", "--quiet"]


def run(commands: list[list[str]], together: bool) -> float:
    """Wall-clock seconds of the commands, all at once or in turn."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    start = time.perf_counter()
    if together:
        processes = [subprocess.Popen(c, env=env) for c in commands]
        codes = [p.wait() for p in processes]
    else:
        codes = [subprocess.run(c, env=env).returncode for c in commands]
    if any(codes):
        sys.exit(f"psal inpaint failed: exit statuses {codes}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="768x512", help="photo size WxH")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "concurrent-cpu.json")
    args = parser.parse_args()
    size = tuple(int(v) for v in args.size.lower().split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        photo, mask = inputs(folder, size)
        commands = [command(photo, mask, folder / f"out{i}.png") for i in range(2)]
        run(commands[:1], together=False)  # warm the file cache and the model file
        rows = []
        for r in range(args.rounds):
            apart, together = run(commands, together=False), run(commands, together=True)
            rows.append({"one_after_the_other_s": round(apart, 2), "together_s": round(together, 2)})
            print(f"round {r + 1}: one after the other {apart:6.2f} s   together {together:6.2f} s", flush=True)
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    apart = statistics.median(row["one_after_the_other_s"] for row in rows)
    together = statistics.median(row["together_s"] for row in rows)
    print(f"median: one after the other {apart:.2f} s, together {together:.2f} s, ratio {together / apart:.2f}; "
          f"peak memory of one process {peak_mb:.0f} MB")
    result = {"machine": platform.processor() or platform.machine(), "cpus": len(os.sched_getaffinity(0)),
              "command": "psal inpaint (default threads)", "size": list(size), "hole_fraction": 0.08,
              "rounds": rows, "median_one_after_the_other_s": apart, "median_together_s": together,
              "ratio": round(together / apart, 3), "peak_mb": round(peak_mb)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
