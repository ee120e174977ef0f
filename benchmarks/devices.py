"""The shipped networks on another device (a GPU) against the CPU: agreement and time.

    python benchmarks/devices.py --device cuda
    python benchmarks/devices.py --device cuda --batches 16 64 --side 1000

1. agreement: each network on its bundled example (examples/), once on the CPU and once
   on --device, plain and with --half (float16 autocast): PSNR of the device's output
   against the CPU's. Not bit-equal: float summation order flips near-tied patch matches.
2. speed: ×4 of a side×side input (examples/chelsea.png enlarged), in process: model
   loaded, one warm-up run, then the engine's time for one run, synchronised.
3. training: one ×4 optimiser step (L1, 192-px crops, batch B, data already on the
   device) and the CPU's time to make one such batch (Pillow crops and bicubic LR).
One JSON line per measurement. A script, not a test: it needs the device it measures.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from psal_cli import edit
from psal_cli.engine import Options
from psal_cli.imageio import to_tensor
from psal_cli.metrics import psnr
from psal_cli.modelfile import default_model_path, load_model

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def example_runs() -> dict[str, tuple[torch.nn.Module, Callable[[torch.nn.Module, Options], Image.Image]]]:
    """Each shipped network, loaded, and how it edits its bundled example: name → (model, run(model, options))."""
    def image(name: str) -> Image.Image:
        return Image.open(EXAMPLES / name)

    jobs = {
        "upscale x4": ("upscale", 4, lambda m, o: edit.upscale(m, image("chelsea.png"), o)),
        "inpaint": ("inpaint", None, lambda m, o: edit.inpaint(m, image("coffee.png"),
                                                                edit.hole_mask(image("coffee.png"), image("coffee_mask.png")), o)),
        "colorize": ("colorize", None, lambda m, o: edit.colorize(m, image("motorcycle_gray.png"),
                                                                  image("motorcycle_reference.png"), o)),
    }
    return {name: (load_model(default_model_path(task, scale), task=task)[0].eval(), run)
            for name, (task, scale, run) in jobs.items()}


def agreement(device: str) -> None:
    for name, (model, run) in example_runs().items():
        reference = to_tensor(run(model, Options(device="cpu")))[0]
        for half in (False, True):
            start = time.time()
            out = to_tensor(run(model, Options(device=device, half=half)))[0]
            print(json.dumps({"part": "agreement", "network": name, "device": device, "half": half,
                              "psnr_vs_cpu": (round(psnr(out, reference, data_range=1.0), 2)
                                              if (out != reference).any() else "identical"),
                              "max_diff_255": round(float((out - reference).abs().max()) * 255),
                              "seconds": round(time.time() - start, 2)}), flush=True)


def speed(device: str, side: int) -> None:
    model = load_model(default_model_path("upscale", 4), task="upscale")[0].eval()
    photo = Image.open(EXAMPLES / "chelsea.png").convert("RGB").resize((side, side), Image.Resampling.BICUBIC)
    for half in (False, True):
        edit.upscale(model, photo, Options(device=device, half=half))  # warm-up: kernels, allocator
        synchronize(device)
        start = time.time()
        edit.upscale(model, photo, Options(device=device, half=half))
        synchronize(device)
        print(json.dumps({"part": "speed", "network": "upscale x4", "input": f"{side}x{side}", "device": device,
                          "half": half, "seconds": round(time.time() - start, 2)}), flush=True)


def training(device: str, batches: list[int], data: Path) -> None:
    from psal_cli.tasks.upscale import loss_function, make_sampler
    from psal_cli.training import load_photos

    photos = load_photos(data)
    model = load_model(default_model_path("upscale", 4), task="upscale")[0].to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-6)
    loss_fn, rng = loss_function("l1"), random.Random(0)
    for batch in batches:
        sampler = make_sampler(photos, 4, batch, 192)
        start = time.time()
        ready = [{k: v.to(device) for k, v in sampler(rng).items()} for _ in range(4)]
        make = (time.time() - start) / 4

        def step(i: int) -> None:
            loss = loss_fn(model, ready[i % 4])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        for i in range(2):
            step(i)
        synchronize(device)
        start, steps = time.time(), 10
        for i in range(steps):
            step(i)
        synchronize(device)
        print(json.dumps({"part": "training", "network": "upscale x4", "batch": batch, "patch": 192, "device": device,
                          "ms_per_step": round((time.time() - start) / steps * 1000),
                          "ms_per_batch_made": round(make * 1000)}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--side", type=int, default=1000, help="input side for the ×4 speed run")
    parser.add_argument("--batches", type=int, nargs="*", default=[16, 64], help="training batch sizes (none: skip)")
    # ../shared beside the checkout; on a lent device machine it travels inside it, as shared/
    beside, inside = ROOT.parent / "shared" / "data" / "train", ROOT / "shared" / "data" / "train"
    parser.add_argument("--data", type=Path, default=beside if beside.is_dir() or not inside.is_dir() else inside,
                        help="training photos for the training part (skipped when absent)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (the CPU reference, the batches)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    agreement(args.device)
    speed(args.device, args.side)
    if args.batches and args.data.is_dir():
        training(args.device, args.batches, args.data)


if __name__ == "__main__":
    main()
