"""Several `psal` processes sharing one machine: two edits started together against the same
two one after the other.

    python benchmarks/shared_machine.py                 # inpaint, 768×512 photo, object-sized hole, 3 rounds
    python benchmarks/shared_machine.py --size 481x321 --rounds 5
    python benchmarks/shared_machine.py --command upscale --stagger 3   # ×4 of 1 MP, the second 3 s later
    OMP_WAIT_POLICY=PASSIVE python benchmarks/shared_machine.py --threads 2

A script, not a test. Each round runs the command on two copies of one photo (from
shared/data/photos, resized): `psal inpaint` with an elliptic hole of ~8 % of the image, or
`psal upscale --scale 4` (default size: 1 MP, as benchmarks/speed.py). First one after the
other, then both at once (`--stagger S`: the second S seconds after the first), every process
with psal's default threads unless `--threads N` is given (the environment, an OpenMP wait
policy say, passes through). Prints, per round, the wall-clock seconds of both ways and the
peak resident memory of the largest process, then the medians and their ratio (together /
one after the other: at most 1.0 means that sharing the machine costs nothing). Writes
benchmarks/results/concurrent-cpu.json (other settings: concurrent-cpu-<settings>.json).
"""

from __future__ import annotations

import argparse
import json
import math
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


def command(task: str, photo: Path, mask: Path, out: Path, threads: int | None) -> list[str]:
    edit = ["upscale", str(photo), "--scale", "4"] if task == "upscale" else ["inpaint", str(photo), "--mask", str(mask)]
    return ([sys.executable, "-m", "psal_cli", *edit, "-o", str(out), "--overwrite", "--quiet"]
            + ([] if threads is None else ["--threads", str(threads)]))


def run(commands: list[list[str]], together: bool, stagger: float = 0.0) -> float:
    """Wall-clock seconds of the commands, all at once (each `stagger` s after the one before) or in turn."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    start = time.perf_counter()
    if together:
        processes = []
        for i, c in enumerate(commands):
            time.sleep(max(0.0, start + i * stagger - time.perf_counter()))
            processes.append(subprocess.Popen(c, env=env))
        codes = [p.wait() for p in processes]
    else:
        codes = [subprocess.run(c, env=env).returncode for c in commands]
    if any(codes):
        sys.exit(f"psal failed: exit statuses {codes}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--command", choices=["inpaint", "upscale"], default="inpaint")
    parser.add_argument("--size", help="photo size WxH (default: inpaint 768x512, upscale 1 MP)")
    parser.add_argument("--stagger", type=float, default=0.0, help="seconds between the two starts")
    parser.add_argument("--threads", type=int, help="--threads of both processes (default: psal's own choice)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, help="default: benchmarks/results/concurrent-cpu[-settings].json")
    args = parser.parse_args()
    if args.size:
        size = tuple(int(v) for v in args.size.lower().split("x"))
    elif args.command == "upscale":  # 1 MP of the photo, as benchmarks/speed.py
        from PIL import Image

        W, H = Image.open(DATA / "photos" / PHOTO).size
        scale = math.sqrt(1e6 / (W * H))
        size = (round(W * scale / 2) * 2, round(H * scale / 2) * 2)
    else:
        size = (768, 512)
    settings = [s for s, on in [(args.command, args.command != "inpaint"), (f"stagger{args.stagger:g}", args.stagger),
                                (f"threads{args.threads}", args.threads is not None)] if on]
    out = args.out or ROOT / "benchmarks" / "results" / ("-".join(["concurrent-cpu", *settings]) + ".json")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        photo, mask = inputs(folder, size)
        commands = [command(args.command, photo, mask, folder / f"out{i}.png", args.threads) for i in range(2)]
        run(commands[:1], together=False)  # warm the file cache and the model file
        rows = []
        for r in range(args.rounds):
            apart, together = run(commands, together=False), run(commands, together=True, stagger=args.stagger)
            rows.append({"one_after_the_other_s": round(apart, 2), "together_s": round(together, 2)})
            print(f"round {r + 1}: one after the other {apart:6.2f} s   together {together:6.2f} s", flush=True)
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    apart = statistics.median(row["one_after_the_other_s"] for row in rows)
    together = statistics.median(row["together_s"] for row in rows)
    print(f"median: one after the other {apart:.2f} s, together {together:.2f} s, ratio {together / apart:.2f}; "
          f"peak memory of one process {peak_mb:.0f} MB")
    threads = "default threads" if args.threads is None else f"--threads {args.threads}"
    result = {"machine": platform.processor() or platform.machine(), "cpus": len(os.sched_getaffinity(0)),
              "command": f"psal {args.command}{' --scale 4' if args.command == 'upscale' else ''} ({threads})",
              "size": list(size), "stagger_s": args.stagger,
              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
              **({"hole_fraction": 0.08} if args.command == "inpaint" else {}),
              "rounds": rows, "median_one_after_the_other_s": apart, "median_together_s": together,
              "ratio": round(together / apart, 3), "peak_mb": round(peak_mb)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
