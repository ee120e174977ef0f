"""PatchMatch's step size (queries updated per step) against quality, on the CPU.

A GPU takes larger steps than the CPU's 512 queries (fewer kernel launches); good matches
travel from step to step within an iteration, so fewer, larger steps can find worse ones.
This runs the CPU with another step size, a number or `gpu` (the rule a GPU follows,
`attention._search_chunk`), and measures what it changes:

1. examples: each network on its bundled example, PSNR against the CPU's own output, and
   the CPU's own output with another seed beside it (how far two searches as good differ);
2. colorize (BSD100 at 320 px: plain and flipped-reference PSNR) and inpaint (thin masks:
   PSNR), the figures of `psal eval colorize` / `psal eval inpaint --masks thin`.

    python benchmarks/search_steps.py --steps 512 1024 2048 4096 gpu
    python benchmarks/search_steps.py --steps 4096 --examples-only
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from devices import example_runs  # benchmarks/, the folder of this script
from psal_cli import attention
from psal_cli.engine import Options
from psal_cli.imageio import to_tensor
from psal_cli.metrics import psnr
from psal_cli.tasks import colorize, inpaint

ROOT = Path(__file__).resolve().parents[1]
CPU_RULE = attention._search_chunk


def use_steps(steps: str) -> None:
    """PatchMatch on the CPU from now on takes `steps` queries per step (`gpu`: a GPU's rule)."""
    if steps == "gpu":
        attention._search_chunk = lambda device, queries: CPU_RULE(torch.device("cuda"), queries)
    else:
        attention._search_chunk = lambda device, queries: int(steps)


def examples(steps: list[str]) -> None:
    for name, (model, run) in example_runs().items():
        attention._search_chunk = CPU_RULE
        own = to_tensor(run(model, Options(device="cpu")))[0]
        other_seed = to_tensor(run(model, Options(device="cpu", seed=1)))[0]
        line = f"{name:<11} seed 1: {psnr(other_seed, own, data_range=1.0):6.2f} dB"
        for size in steps:
            use_steps(size)
            out = to_tensor(run(model, Options(device="cpu")))[0]
            line += f"   steps {size}: " + (f"{psnr(out, own, data_range=1.0):6.2f} dB" if (out != own).any() else "identical")
        print(line, flush=True)
    attention._search_chunk = CPU_RULE


def evaluations(steps: list[str], data: Path, limit: int | None) -> None:
    for size in steps:
        use_steps(size)
        start = time.time()
        report = colorize.evaluate(data, nearest=False, limit=limit)
        plain, flipped = report["mean"]["plain"]["psnr"], report["mean"]["flipped"]["psnr"]
        print(f"steps {size:>5}: colorize {plain:.3f} / {flipped:.3f} dB (plain / flipped), {time.time() - start:.0f} s",
              flush=True)
        start = time.time()
        report = inpaint.evaluate(data, "thin", limit=limit)
        print(f"steps {size:>5}: inpaint thin {report['mean']['psnr']:.3f} dB, {time.time() - start:.0f} s", flush=True)
    attention._search_chunk = CPU_RULE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", nargs="+", default=["512", "4096", "gpu"], help="queries per step, or gpu")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "val")
    parser.add_argument("--limit", type=int, help="only the first photos of --data")
    parser.add_argument("--examples-only", action="store_true", help="skip the evaluations")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    examples(args.steps)
    if not args.examples_only:
        evaluations(args.steps, args.data, args.limit)


if __name__ == "__main__":
    main()
