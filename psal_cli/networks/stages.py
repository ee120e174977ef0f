"""How networks are split so that one engine can tile any of them.

A network is written as *local stages* (convolutions: each output pixel depends only on
inputs within `radius` pixels) around *whole-map stages* (PSAL: global). Its `run` method
calls every stage through an `Executor`: `Direct` just calls them (training, small
images); the engine's tiled executor runs local stages tile by tile with an overlap of
`radius` and whole-map stages once on the full map, so tiling changes nothing but memory.

A network whose PSAL needs a minimum number of key patches also defines
`accepts_size(input_name, height, width) -> bool` (the input named as in its `run`), from its
own config; the edit layer turns a smaller input into a clear error (`edit.check_size`)
instead of a failure deep inside the search.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Callable, Protocol

import torch
from torch import Tensor, nn


class LocalStage(nn.Module):
    """A module whose output at a pixel depends only on inputs within `radius` pixels.

    `radius` is counted in input pixels on each side; `scale` is output size / input size
    (2 for a ×2 upsampler, Fraction(1, 2) for a stride-2 encoder). All inputs of a stage
    share one resolution. Subclasses set both in `__init__`.
    """

    radius: int = 0
    scale: Fraction = Fraction(1)


class Executor(Protocol):
    """Runs the stages of a network; `Direct` or the engine's tiled executor.

    `generator` seeds the network's patch searches (None: torch's global generator).
    """

    generator: torch.Generator | None

    def local(self, stage: LocalStage, *inputs: Tensor) -> Tensor: ...

    def whole(self, fn: Callable[..., Tensor], *inputs: Tensor) -> Tensor: ...


class Direct:
    """Calls every stage on whole tensors where they are: training and small images."""

    def __init__(self, generator: torch.Generator | None = None) -> None:
        self.generator = generator

    def local(self, stage: LocalStage, *inputs: Tensor) -> Tensor:
        return stage(*inputs)

    def whole(self, fn: Callable[..., Tensor], *inputs: Tensor) -> Tensor:
        return fn(*inputs)


def conv_radius(*modules: nn.Module) -> int:
    """Receptive radius of a chain of stride-1 convolutions (sum of their half-extents)."""
    radius = 0
    for module in modules:
        for m in module.modules():
            if isinstance(m, nn.Conv2d):
                k = m.kernel_size[0]
                radius += (k // 2) * m.dilation[0]
    return radius


def holds_patches(height: int, width: int, patch: int, count: int) -> bool:
    """Whether a height×width map has `count` patch×patch patches wholly inside it: what PSAL
    needs of its key map (as valid centres), the map being at least one patch in each side."""
    return height >= patch and width >= patch and (height - patch + 1) * (width - patch + 1) >= count


# The dihedral views of an image as (transpose, flip height, flip width), in the order used:
# the first 2 and 4 are mirror images, all 8 add the transposes (90° rotations). Averaging
# a network's outputs over views (a self-ensemble) cancels part of its errors: the engine
# does it for any network (`Options.views`), the inpaint network for its fill.
VIEWS = ((False, False, False), (False, False, True), (False, True, False), (False, True, True),
         (True, False, False), (True, False, True), (True, True, False), (True, True, True))


def view(x: Tensor, which: int, undo: bool = False) -> Tensor:
    """`x` seen in dihedral view `which` (`VIEWS`), or brought back from it with `undo`."""
    transpose, flip_h, flip_w = VIEWS[which]
    if transpose and not undo:
        x = x.transpose(-1, -2)
    dims = [d for d, flip in ((-2, flip_h), (-1, flip_w)) if flip]
    if dims:
        x = x.flip(dims)
    if transpose and undo:
        x = x.transpose(-1, -2)
    return x


def pad_to_multiple(x: Tensor, multiple: int) -> Tensor:
    """Replicate-pad bottom/right so H and W divide `multiple` (crop the result back)."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return x
    return torch.nn.functional.pad(x, (0, pw, 0, ph), mode="replicate")
