"""Where a GPU's time goes in ×4 upscaling: the PatchMatch step sizes, then a profile of one call.

    python benchmarks/gpu_profile.py                 # cuda; a photo of shared/data/photos
    python benchmarks/gpu_profile.py --sides 600 --profile-side 600

1. time: ×4 of side×side inputs (a photo resized) with the model loaded and one warm-up
   call, once per PatchMatch step rule: (queries per step at most, steps per iteration at
   least) — (4096, 128) is attention's own, the others take fewer, larger steps.
2. profile: one call under torch.profiler with attention's own rule: the operations by
   their GPU time and by their host time, and the count of kernel launches, host-device
   copies and stream synchronisations.
A script, not a test: it needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from PIL import Image
from torch.profiler import ProfilerActivity, profile

from psal_cli import attention, edit
from psal_cli.engine import Options
from psal_cli.modelfile import default_model_path, load_model
from speed import DATA, PHOTO  # benchmarks/, the folder of this script: speed.py's photo
RULES = [(4096, 128), (65536, 8), (1 << 20, 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--photo", type=Path, default=DATA / "photos" / PHOTO)
    parser.add_argument("--sides", type=int, nargs="*", default=[600, 1000])
    parser.add_argument("--profile-side", type=int, default=600, help="0: no profile")
    args = parser.parse_args()

    photo = Image.open(args.photo).convert("RGB")
    model = load_model(default_model_path("upscale", 4), task="upscale")[0]
    options = Options(device=args.device)
    own = attention._GPU_CHUNK, attention._MIN_STEPS

    def call(image: Image.Image) -> float:
        start = time.perf_counter()
        edit.upscale(model, image, options)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    call(photo.resize((256, 256)))  # kernels loaded before timing
    for side in args.sides:
        image = photo.resize((side, side), Image.Resampling.BICUBIC)
        for chunk, steps in RULES:
            attention._GPU_CHUNK, attention._MIN_STEPS = chunk, steps
            print(f"side {side}, steps of at most {chunk} queries, at least {steps} per iteration: "
                  f"{call(image):.3f} s", flush=True)
    attention._GPU_CHUNK, attention._MIN_STEPS = own
    if not args.profile_side:
        return
    image = photo.resize((args.profile_side, args.profile_side), Image.Resampling.BICUBIC)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        wall = call(image)
    table = prof.key_averages()
    print(f"profiled call: {wall:.3f} s")
    print(table.table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=50))
    print(table.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=50))
    for name in ["cudaLaunchKernel", "cudaMemcpyAsync", "cudaStreamSynchronize", "aten::uniform_"]:
        print(name, sum(e.count for e in table if e.key == name))


if __name__ == "__main__":
    main()
