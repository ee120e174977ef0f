"""The inference engine: runs any network on any image size, in bounded memory, on any device.

Networks are written as local stages around whole-map stages (networks/stages.py). The
engine's `Tiled` executor runs each local stage tile by tile, with an overlap of the
stage's receptive radius, and stitches the kept centres into a buffer held in host
memory, so the stitched map equals the untiled one. Whole-map stages (PSAL) run once on
the full map on the compute device: attention still reaches across tiles, and PSAL
itself bounds its memory by working in chunks of queries. Only one tile's activations
are ever on the device at a time (unlike tools that move the whole image first).
"""

from __future__ import annotations

import logging
import math
import os
from contextlib import nullcontext
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, ContextManager

import torch
from torch import Tensor, nn

from psal_cli.choices import PRECISIONS
from psal_cli.networks.stages import LocalStage, view

log = logging.getLogger("psal")

OnTile = Callable[[int, int], None]
# An upsampling stage's output tile may be this many tiles on a side: at ×4 a 512-px tile
# thus has 256-px inputs, not 128, and a receptive radius of 14 px adds 23 %, not 48 %.
OUTPUT_TILES = 2


@dataclass
class Options:
    """How to run a network: where, in which precision, in which tiles, with which seed."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    tile: int | None = None  # tile side in pixels (a stage's input side, engine.OUTPUT_TILES); 0 = whole; None = auto
    tile_overlap: int | None = None  # context around a tile; None = the stage's receptive radius (exact)
    half: bool = False  # float16 on CUDA/MPS; ignored on CPU
    precision: str = "auto"  # the convolutions on the CPU: auto | fp32 | bf16 (`resolve_precision`)
    seed: int = 0
    views: int = 1  # geometric self-ensemble: mean output over 1, 2, 4 or 8 flips/transposes (stages.VIEWS)


def resolve_device(name: str = "auto") -> torch.device:
    """The torch device for a user's `--device`; ValueError with a clear message if unusable."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r} (use auto, cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps":
        if not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
            raise ValueError(f"device {name!r}: MPS is not available on this machine")
    elif device.type != "cpu":
        raise ValueError(f"unsupported device {name!r} (use auto, cpu, cuda, cuda:N or mps)")
    return device


def native_bf16(device: torch.device) -> bool:
    """Whether the device is a CPU that computes bfloat16 natively (AVX-512 BF16 or AMX)."""
    return device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of the convolutions on the CPU for `--precision`, or None (float32).

    bfloat16 autocast makes the networks' convolutions several times faster on a CPU that
    has it natively and emulates it slowly elsewhere, so `auto` takes it only where native.
    PSAL's searches stay float32 under any precision (`attention.full_precision`). On a
    GPU the precision is `--half`'s: float16 autocast.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if device.type != "cpu" or precision == "fp32":
        return None
    if precision == "auto" and not native_bf16(device):
        return None
    return torch.bfloat16


def network_precision(model: nn.Module, precision: str) -> str:
    """`precision` for this network: `auto` stays float32 for a network whose figures move under
    bfloat16 (one without `auto_bf16 = True`: inpainting's fill, colorization)."""
    return "fp32" if precision == "auto" and not getattr(model, "auto_bf16", False) else precision


def autocast(device: torch.device, precision: str) -> ContextManager:
    """Autocast for `--precision` on `device` (nothing when that is float32): for networks run
    without the engine (`Direct`); `run_network` applies it per stage itself."""
    dtype = resolve_precision(precision, device)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


class NotEnoughMemory(ValueError):
    """An image whose edit would need more memory than this process may use (one line)."""


def available_memory() -> int | None:
    """Bytes this process may still allocate, or None where that cannot be read.

    The least of: the machine's available memory, the headroom of this process's cgroup
    (containers, batch schedulers), and of its own address-space and data limits
    (`ulimit -v`, `resource.setrlimit`).
    """
    limits = []
    meminfo = _read_kb("/proc/meminfo", "MemAvailable:")
    if meminfo is not None:
        limits.append(meminfo)
    limits += _cgroup_headroom()
    try:
        import resource
    except ImportError:  # not on Windows
        resource = None
    if resource is not None:
        for limit, used in ((resource.RLIMIT_AS, "VmSize:"), (resource.RLIMIT_DATA, "VmData:")):
            soft = resource.getrlimit(limit)[0]
            current = _read_kb("/proc/self/status", used)
            if soft != resource.RLIM_INFINITY and current is not None:
                limits.append(soft - current)
    if not limits:
        try:  # other Unix systems
            limits.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (AttributeError, ValueError, OSError):
            return None
    return max(0, min(limits))


def _read_kb(path: str, key: str) -> int | None:
    """A `key: N kB` line of a /proc file, in bytes."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_headroom() -> list[int]:
    """Limit minus usage of this process's memory cgroup (v2, else v1), where limited."""
    try:
        with open("/proc/self/cgroup") as f:
            entries = [line.strip().split(":", 2) for line in f]
    except OSError:
        return []
    found = []
    for _, controllers, path in entries:
        if controllers == "":  # v2
            base = f"/sys/fs/cgroup{path}"
            files = (f"{base}/memory.max", f"{base}/memory.current")
        elif "memory" in controllers.split(","):
            base = f"/sys/fs/cgroup/memory{path}"
            files = (f"{base}/memory.limit_in_bytes", f"{base}/memory.usage_in_bytes")
        else:
            continue
        try:
            with open(files[0]) as f:
                limit = f.read().strip()
            with open(files[1]) as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:  # "max", or v1's huge "unlimited"
            found.append(int(limit) - usage)
    return found


def check_memory(need: int, what: str) -> None:
    """NotEnoughMemory naming `what`, the memory it needs and what is available, if it does not fit."""
    available = available_memory()
    log.debug("%s: needs about %s, %s available", what, _size(need),
              "unknown" if available is None else _size(available))
    if available is not None and need > available:
        raise NotEnoughMemory(f"{what} needs about {_size(need)} of memory, "
                              f"{_size(available)} is available (tiling does not lower this: free memory, "
                              "or give a smaller image)")


def _size(n: float) -> str:
    return f"{n / 2**30:.1f} GB" if n >= 2**30 else f"{n / 2**20:.0f} MB"


def auto_tile(device: torch.device) -> int:
    """A tile side that keeps one tile's activations well inside the device's free memory."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # ~64 float32 channels × ~8 live activations per pixel, with a safety margin of 2.
        side = int(math.sqrt(free / (64 * 4 * 8 * 2)))
        return max(256, min(2048, side // 64 * 64))
    return 512


class Tiled:
    """Executor that tiles local stages and runs whole-map stages once (see module docstring).

    Inputs and outputs of every stage stay in host memory (`storage`); each tile, and each
    whole-map stage, is moved to `device` for the computation only.
    """

    def __init__(
        self,
        device: torch.device,
        tile: int,
        overlap: int | None = None,
        half: bool = False,
        on_tile: OnTile | None = None,
        storage: torch.device = torch.device("cpu"),
        precision: str = "fp32",
        generator: torch.Generator | None = None,
    ) -> None:
        self.device, self.tile, self.overlap, self.on_tile, self.storage = device, tile, overlap, on_tile, storage
        self.generator = generator
        self.half = half and device.type in ("cuda", "mps")
        self.dtype = torch.float16 if self.half else resolve_precision(precision, device)
        self.layout = self.layout_for(device)

    @staticmethod
    def layout_for(device: torch.device) -> torch.memory_format:
        """Channels-last on the CPU: its convolutions run faster so, and PSAL gathers pixel rows."""
        return torch.channels_last if device.type == "cpu" else torch.contiguous_format

    def _precision(self) -> ContextManager:
        if self.dtype is not None:
            return torch.autocast(self.device.type, dtype=self.dtype)
        return nullcontext()

    def _to_device(self, x: Tensor) -> Tensor:
        x = x.to(self.device)
        return x.contiguous(memory_format=self.layout) if x.dim() == 4 else x

    def whole(self, fn: Callable[..., Tensor], *inputs: Tensor) -> Tensor:
        with self._precision():
            out = fn(*(self._to_device(x) for x in inputs))
        return out.float().to(self.storage)

    def local(self, stage: LocalStage, *inputs: Tensor) -> Tensor:
        H, W = inputs[0].shape[-2:]
        scale = Fraction(stage.scale)
        align = scale.denominator  # a stride-s stage must see tiles on its stride grid
        if H % align or W % align:
            raise ValueError(f"{type(stage).__name__} needs sizes divisible by {align}, got {W}×{H}")
        radius = stage.radius if self.overlap is None else self.overlap
        context = -(-radius // align) * align  # rounded up to the stride grid
        # The tile bounds the stage's input side, and its output side at OUTPUT_TILES tiles: an
        # upsampling stage's activations are at its input resolution (its output has few channels).
        side = H * W if self.tile <= 0 else max(1, int(self.tile / max(Fraction(1), scale / OUTPUT_TILES)))
        side = max(align, side // align * align)
        rows, cols = range(0, H, side), range(0, W, side)
        total, out = len(rows) * len(cols), None
        for i, y0 in enumerate(rows):
            for j, x0 in enumerate(cols):
                y1, x1 = min(H, y0 + side), min(W, x0 + side)
                cy0, cx0 = max(0, y0 - context), max(0, x0 - context)
                cy1, cx1 = min(H, y1 + context), min(W, x1 + context)
                crops = [self._to_device(x[..., cy0:cy1, cx0:cx1]) for x in inputs]
                with self._precision():
                    result = stage(*crops)
                if out is None:
                    # Channels-last: whole-map stages (PSAL) gather pixel rows of it without a copy.
                    shape = (*result.shape[:-2], int(H * scale), int(W * scale))
                    layout = torch.channels_last if len(shape) == 4 else torch.contiguous_format
                    out = torch.empty(shape, dtype=torch.float32, device=self.storage, memory_format=layout)
                # Keep the tile's own area: its context was only there to make it exact.
                oy, ox = int((y0 - cy0) * scale), int((x0 - cx0) * scale)
                oh, ow = int((y1 - y0) * scale), int((x1 - x0) * scale)
                out[..., int(y0 * scale) : int(y0 * scale) + oh, int(x0 * scale) : int(x0 * scale) + ow] = (
                    result[..., oy : oy + oh, ox : ox + ow].float().to(self.storage)
                )
                if self.on_tile is not None:
                    self.on_tile(i * len(cols) + j + 1, total)
        return out


def run_network(
    model: nn.Module,
    inputs: dict[str, Tensor],
    options: Options | None = None,
    on_tile: OnTile | None = None,
) -> Tensor:
    """Run `model.run` on host-memory inputs with tiling; returns the output on the CPU, float32.

    The same seed, device and inputs give the same output: each view's patch searches
    draw from a generator of their own, seeded with `options.seed` (torch's global
    generator is left alone). With `options.views` > 1 the
    output is the mean over that many mirrored/transposed copies of the inputs, each
    brought back (EDSR's self-ensemble): a network's errors differ between views and
    partly cancel, for `views`× the time. Only for networks whose output should follow
    such a transform: upscaling, not stochastic texture (inpaint's copied detail would
    average out into blur).
    """
    options = options or Options()
    device = resolve_device(options.device)
    if options.half and device.type == "cpu":
        log.warning("half precision has no effect on the CPU: running in float32")
    tile = auto_tile(device) if options.tile is None else options.tile
    if tile < 0:
        raise ValueError(f"tile must be >= 0 (0 = whole image), got {tile}")
    if options.views not in (1, 2, 4, 8):  # the first 2 and 4 views are mirror images, 8 adds transposes
        raise ValueError(f"views must be 1, 2, 4 or 8, got {options.views}")
    model = model.to(device, memory_format=Tiled.layout_for(device)).eval()
    precision = network_precision(model, options.precision)
    total = None
    with torch.inference_mode():
        for which in range(options.views):
            generator = torch.Generator().manual_seed(options.seed)
            executor = Tiled(device, tile, options.tile_overlap, options.half, on_tile, generator=generator,
                             precision=precision)
            out = model.run(executor, **{name: view(x.float().cpu(), which) for name, x in inputs.items()})
            out = view(out.float().cpu(), which, undo=True)
            total = out if total is None else total.add_(out)
    return total / options.views if options.views > 1 else total
