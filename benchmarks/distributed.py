"""Plain `psal upscale` against `psal upscale --ray` on one machine, and what Ray should do on many.

Writes N photos (crops of the training photos, else random pixels) of WxH, then times, each
in a fresh process, on the same photos:

  plain   psal upscale in/ -o plain/ --threads W            (one process, W threads)
  ray     psal upscale in/ -o ray/ --ray --workers W --threads 1   (W actors, 1 thread each)
  startup psal upscale ... --ray on W photos only: Ray's start-up (local cluster, actors,
          model shipped) is its wall time less one photo's time per worker

and prints one JSON line: images/s of each, Ray's start-up seconds, the per-image time
(the workers' own seconds, from --json) and the driver's per-image overhead, and the
expected images/s on 1, 2, 4, ... nodes of W workers:
  wall(nodes) = startup + N * max(per_image / (nodes * W), driver_overhead)
(the driver hands out the paths and collects the results one by one, so its per-image cost
bounds the throughput however many nodes). The load average before and after says how
busy the machine was: on a shared machine rerun it when quiet.

    python benchmarks/distributed.py                        # 200 images, 320x240, x2, 2 workers
    python benchmarks/distributed.py --images 20 --workers 2 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT.parent / "shared" / "data" / "train"


def make_photos(folder: Path, n: int, width: int, height: int) -> str:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True)
    photos = sorted(PHOTOS.glob("*.jpg")) if PHOTOS.is_dir() else []
    rng = np.random.default_rng(0)
    for k in range(n):
        if photos:
            img = Image.open(photos[k % len(photos)]).convert("RGB")
            x, y = (k * 37) % max(1, img.width - width), (k * 53) % max(1, img.height - height)
            img = img.crop((x, y, x + width, y + height))
        else:
            img = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        img.save(folder / f"{k:05}.png")
    return "training-photo crops" if photos else "random pixels"


def psal(*args: str, threads: int) -> tuple[float, dict]:
    """Wall seconds and the --json summary of one `psal` process."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "psal_cli", *args, "--json", "--quiet"], env=env,
                          capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"psal {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return wall, json.loads(done.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--size", default="320x240", help="WxH of the photos")
    ap.add_argument("--scale", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2, help="Ray workers, and the plain run's threads")
    ap.add_argument("--repeats", type=int, default=1, help="times each run is repeated (median kept)")
    ap.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    ap.add_argument("--keep", type=Path, help="keep the photos and outputs in this folder")
    args = ap.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))
    work = args.keep or Path(tempfile.mkdtemp(prefix="psal-distributed-"))
    photos = make_photos(work / "in", args.images, width, height)
    small = work / "small"
    small.mkdir()
    for p in sorted((work / "in").iterdir())[: args.workers]:
        shutil.copy(p, small / p.name)
    common = ["--scale", str(args.scale)]
    load_before = os.getloadavg()
    plain, ray, startup, per_image = [], [], [], []
    for r in range(args.repeats):
        wall, summary = psal("upscale", str(work / "in"), "-o", str(work / f"plain{r}"), *common,
                             "--threads", str(args.workers), threads=args.workers)
        plain.append(wall)
        wall, summary = psal("upscale", str(work / "in"), "-o", str(work / f"ray{r}"), *common, "--ray",
                             "--workers", str(args.workers), "--threads", "1", threads=1)
        ray.append(wall)
        per_image.append(statistics.median(x["seconds"] for x in summary["results"]))
        wall, small_summary = psal("upscale", str(small), "-o", str(work / f"small{r}"), *common, "--ray",
                                   "--workers", str(args.workers), "--threads", "1", threads=1)
        startup.append(wall - max(x["seconds"] for x in small_summary["results"]))
    load_after = os.getloadavg()
    t_plain, t_ray, t_start, t_img = (statistics.median(v) for v in (plain, ray, startup, per_image))
    # What the Ray run spent beyond start-up and its workers' share of the work: the driver.
    driver = max(0.0, (t_ray - t_start - args.images * t_img / args.workers) / args.images)
    expected = {n: round(args.images / (t_start + args.images * max(t_img / (n * args.workers), driver)), 3)
                for n in args.nodes}
    print(json.dumps({
        "images": args.images, "size": args.size, "scale": args.scale, "workers": args.workers,
        "photos": photos, "repeats": args.repeats, "cpus": os.cpu_count(),
        "plain_seconds": round(t_plain, 2), "ray_seconds": round(t_ray, 2),
        "plain_images_per_s": round(args.images / t_plain, 3), "ray_images_per_s": round(args.images / t_ray, 3),
        "ray_vs_plain": round(t_plain / t_ray, 3),
        "ray_startup_seconds": round(t_start, 2), "per_image_seconds": round(t_img, 3),
        "driver_seconds_per_image": round(driver, 4),
        "ray_images_per_s_without_startup": round(args.images / max(1e-9, t_ray - t_start), 3),
        "expected_images_per_s_by_nodes": expected,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in load_after],
        "all_runs": {"plain": [round(x, 2) for x in plain], "ray": [round(x, 2) for x in ray],
                     "startup": [round(x, 2) for x in startup]},
    }))
    if not args.keep:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
