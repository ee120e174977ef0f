"""PSAL benchmark: speed, memory and match quality against exact k-NN and dense attention.

    python benchmarks/attention.py                     # the full table (~5–10 min on 2 idle cores)
    python benchmarks/attention.py --sides 64 128      # a quick look
    python benchmarks/attention.py --bsd /work/shared/data/val   # + the RGB protocol on BSD100 photos

A script, not a test. Inputs are realistic: C = 64 features of two different photos
(benchmarks/data: astronaut as queries, coffee as keys, resized to side×side) through a
fixed random 3×3 conv + ReLU stack; one row uses i.i.d. noise instead. Each measurement
runs in a fresh subprocess (OMP_WAIT_POLICY=PASSIVE) that loads its inputs from disk;
"peak MB" = the peak resident memory during the call (VmHWM, reset just before it through
/proc/self/clear_refs, Linux) − the resident memory just before it. Times are wall-clock;
"cpu s" is the process CPU time (user + system), which is less sensitive to a busy machine.
Dense attention is torch.nn.functional.scaled_dot_product_attention on the same q, k, v
flattened to (1, 1, H·W, C); it is skipped (and extrapolated from the quadratic trend,
marked "est.") when it would take more than 3 minutes or 8 GB. Recall@1 = share of query
positions whose best match is as good as the exact best; ratio = mean matched distance /
mean exact k-NN distance, over queries whose patch lies inside the map.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Waiting OpenMP threads sleep instead of spinning (set before torch loads OpenMP): on a
# shared, loaded machine threads spinning for a descheduled sibling made 2-thread runs up
# to 5× slower than 1 thread. The measurement subprocesses inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
from psal_cli.attention import PSAL, exact_knn, patchmatch

PATCH, NEIGHBORS, CHANNELS = 3, 4, 64
DENSE_MAX_S, DENSE_MAX_MB = 180.0, 8000.0


def photo(name: str, side: int) -> torch.Tensor:
    """benchmarks/data/<name>.jpg resized to side×side, (1, 3, side, side) in [0, 1]."""
    img = Image.open(ROOT / "data" / f"{name}.jpg").convert("RGB").resize((side, side), Image.BICUBIC)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)[None].contiguous()


def features(x: torch.Tensor, channels: int, layers: int = 2) -> torch.Tensor:
    """A fixed random conv + ReLU stack: conv-like features of a photo."""
    g = torch.Generator().manual_seed(0)
    for _ in range(layers):
        weight = torch.randn(channels, x.shape[1], 3, 3, generator=g) / math.sqrt(9 * x.shape[1])
        x = F.relu(F.conv2d(x, weight, padding=1))
    return x


def brute_force(query: torch.Tensor, key: torch.Tensor, k: int) -> torch.Tensor:
    """Exact k-NN distances (1, Hq, Wq, k) in query chunks: float32 shortlist, float64 re-rank."""
    r = PATCH // 2
    qp = F.unfold(F.pad(query, (r, r, r, r), mode="replicate"), PATCH)[0].T  # (Nq, C·p²)
    kp = F.unfold(key, PATCH)[0].T.contiguous()  # (Nk', C·p²): valid centres only
    knorm = kp.square().sum(1)
    out = []
    for a in range(0, qp.shape[0], 1024):
        qc = qp[a : a + 1024]
        approx = qc.square().sum(1, keepdim=True) + knorm - 2 * qc @ kp.T  # (c, Nk')
        short = approx.topk(k + 16, 1, largest=False).indices
        exact = (kp[short].double() - qc[:, None].double()).square().sum(-1)
        out.append(exact.topk(k, 1, largest=False).values.float())
    return torch.cat(out).view(1, *query.shape[-2:], k)


def quality(found: torch.Tensor, exact: torch.Tensor) -> tuple[float, float]:
    r = PATCH // 2
    d, e = found[:, r:-r, r:-r], exact[:, r:-r, r:-r]
    recall = (d[..., 0] <= e[..., 0] * (1 + 1e-4) + 1e-6).float().mean().item()
    return recall, (d.mean() / e.mean()).item()


def memory_mb(field: str) -> float:
    """VmRSS (resident now) or VmHWM (peak resident) of this process, from /proc/self/status."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def child(spec: dict) -> dict:
    """One measurement, in this fresh process."""
    torch.set_num_threads(spec["threads"])
    q, k, v = torch.load(spec["inputs"])
    if spec["what"] == "train":  # forward + backward through the layer
        q, k, v = (t.requires_grad_() for t in (q, k, v))
    warm = [t[..., :32, :32].detach() for t in (q, k, v)]
    layer = PSAL(PATCH, NEIGHBORS)
    with torch.no_grad():
        layer(*warm, generator=torch.Generator().manual_seed(0))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current resident size
    before = memory_mb("VmRSS")
    wall, cpu = time.perf_counter(), time.process_time()
    if spec["what"] == "dense":
        with torch.no_grad():
            flat = [t.flatten(2).transpose(1, 2)[:, None] for t in (q, k, v)]  # (1, 1, N, C)
            F.scaled_dot_product_attention(*flat)
    elif spec["what"] == "train":
        layer(q, k, v, generator=torch.Generator().manual_seed(0)).square().mean().backward()
    else:
        with torch.no_grad():
            layer(q, k, v, generator=torch.Generator().manual_seed(0))
    result = {"s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}
    result["peak_mb"] = memory_mb("VmHWM") - before
    if spec["what"] == "psal" and spec.get("quality"):
        nnf = layer.search(q, k, generator=torch.Generator().manual_seed(0))
        result["recall"], result["ratio"] = quality(nnf.distances, brute_force(q, k, NEIGHBORS))
    return result


def measure(tmp: Path, tensors: tuple[torch.Tensor, ...], what: str, threads: int, with_quality: bool = False) -> dict:
    path = tmp / "inputs.pt"
    torch.save(tuple(t.contiguous() for t in tensors), path)
    spec = {"inputs": str(path), "what": what, "threads": threads, "quality": with_quality}
    run = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True, check=True)
    return json.loads(run.stdout.strip().splitlines()[-1])


def natural(side: int, channels: int = CHANNELS) -> tuple[torch.Tensor, torch.Tensor]:
    return features(photo("astronaut", side), channels), features(photo("coffee", side), channels)


def speed_table(sides: list[int], threads: int, tmp: Path) -> None:
    print(f"\nSquare maps, C = {CHANNELS}, patch {PATCH}, neighbors {NEIGHBORS}, iterations {PSAL().iterations} (default), inference (no grad)")
    print("| input | side | PSAL s (cpu s) | PSAL peak MB | recall@1 | ratio | dense s | dense peak MB | dense / PSAL |")
    print("|---|---|---|---|---|---|---|---|---|")
    reference = None  # (pixels, the largest dense measurement so far)
    for side in sides:
        q, k = natural(side)
        psal = measure(tmp, (q, k, k), "psal", threads, with_quality=side <= 256)
        if reference is None and side > 128:  # dense would not fit: measure the trend at 128² first
            q128, k128 = natural(128)
            reference = (128 * 128, measure(tmp, (q128, k128, k128), "dense", threads))
        growth = (side * side / reference[0]) ** 2 if reference else None
        if reference and (reference[1]["s"] * growth > DENSE_MAX_S or reference[1]["peak_mb"] * growth > DENSE_MAX_MB):
            dense = {key: reference[1][key] * growth for key in ("s", "peak_mb")}
            note = " est."
        else:
            dense, note = measure(tmp, (q, k, k), "dense", threads), ""
            reference = (side * side, dense)
        quality_cols = f"{psal['recall']:.3f} | {psal['ratio']:.4f}" if "recall" in psal else "– | –"
        print(
            f"| photos | {side}² | {psal['s']:.2f} ({psal['cpu_s']:.2f}) | {psal['peak_mb']:.0f} | {quality_cols} | "
            f"{dense['s']:.2f}{note} | {dense['peak_mb']:.0f}{note} | {dense['s'] / psal['s']:.1f}× |",
            flush=True,
        )
    side = min(128, max(sides))
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, CHANNELS, side, side, generator=g), torch.randn(1, CHANNELS, side, side, generator=g)
    psal, dense = measure(tmp, (q, k, k), "psal", threads, with_quality=True), measure(tmp, (q, k, k), "dense", threads)
    print(
        f"| i.i.d. noise | {side}² | {psal['s']:.2f} ({psal['cpu_s']:.2f}) | {psal['peak_mb']:.0f} | {psal['recall']:.3f} | "
        f"{psal['ratio']:.4f} | {dense['s']:.2f} | {dense['peak_mb']:.0f} | {dense['s'] / psal['s']:.1f}× |",
        flush=True,
    )


def training_table(threads: int, tmp: Path) -> None:
    print("\nTraining-sized batches (self-attention on photo features, forward + backward, patch 3, neighbors 4)")
    print("| batch | C | inference s | train step s | train peak MB |")
    print("|---|---|---|---|---|")
    for side in (32, 64):
        for channels in (8, 16, 32):
            x = torch.cat([features(photo(name, side * 2)[..., ::2, ::2], channels) for name in ("astronaut", "coffee")] * 4)
            infer, train = measure(tmp, (x, x, x), "psal", threads), measure(tmp, (x, x, x), "train", threads)
            print(f"| 8×{side}² | {channels} | {infer['s']:.2f} | {train['s']:.2f} | {train['peak_mb']:.0f} |", flush=True)


def bsd_table(folder: Path, iterations: list[int]) -> None:
    """RGB protocol: 12 BSD100 photos, a 48×48 query crop vs a 64×64 key crop from another region."""
    names = sorted(folder.glob("*.jpg"))[:12]
    pairs = []
    for name in names:
        rgb = torch.from_numpy(np.asarray(Image.open(name).convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)[None]
        H, W = rgb.shape[-2:]
        query, key = rgb[..., 40:88, 40:88], rgb[..., H - 104 : H - 40, W - 104 : W - 40]
        pairs.append((query, key, exact_knn(query, key, patch_size=PATCH, neighbors=NEIGHBORS).distances))
    print(f"\nBSD100 RGB crops ({folder}): 12 pairs, 48×48 query vs 64×64 key from another region, patch 3, k = 4")
    print("| iterations | recall@1 | mean of ratios | pooled ratio | s per pair |")
    print("|---|---|---|---|---|")
    for its in iterations:
        recalls, ratios, found_sum, exact_sum, wall = [], [], 0.0, 0.0, 0.0
        for i, (query, key, exact) in enumerate(pairs):
            start = time.perf_counter()
            nnf = patchmatch(query, key, iterations=its, generator=torch.Generator().manual_seed(i))
            wall += time.perf_counter() - start
            recall, ratio = quality(nnf.distances, exact)
            recalls.append(recall)
            ratios.append(ratio)
            found_sum += nnf.distances[:, 1:-1, 1:-1].sum().item()
            exact_sum += exact[:, 1:-1, 1:-1].sum().item()
        print(f"| {its} | {np.mean(recalls):.3f} | {np.mean(ratios):.4f} | {found_sum / exact_sum:.4f} | {wall / len(pairs):.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sides", type=int, nargs="+", default=[64, 128, 256, 512])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-training", action="store_true", help="skip the training-sized batches")
    parser.add_argument("--bsd", type=Path, help="a folder of BSD100 photos for the RGB protocol")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory() as tmp:
        speed_table(args.sides, args.threads, Path(tmp))
        if not args.no_training:
            training_table(args.threads, Path(tmp))
    if args.bsd:
        bsd_table(args.bsd, [5, 6])
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
