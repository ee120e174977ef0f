"""The tiled engine against its independent truth: the same network run untiled."""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from psal_cli import attention
from psal_cli.attention import PSAL
from psal_cli.engine import OUTPUT_TILES, Options, Tiled, resolve_device, run_network
from psal_cli.networks.stages import Direct, LocalStage, conv_radius, pad_to_multiple


class Convs(LocalStage):
    """A stack of 3×3 convolutions (radius = their count), optional stride 2 or ×2 upsampling."""

    def __init__(self, cin: int, cout: int, depth: int, scale: Fraction = Fraction(1)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=1), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.scale = Fraction(scale)
        self.radius = conv_radius(self.body) + (1 if self.scale < 1 else 0)
        self.down = nn.Conv2d(cout, cout, 3, stride=2, padding=1) if self.scale < 1 else None
        up = int(self.scale)
        self.up = nn.Sequential(nn.Conv2d(cout, cout * up * up, 3, padding=1), nn.PixelShuffle(up)) if up > 1 else None
        if self.up is not None:
            self.radius += 1

    def forward(self, *xs: Tensor) -> Tensor:
        x = self.body(torch.cat(xs, 1))
        if self.down is not None:
            x = self.down(x)
        if self.up is not None:
            x = self.up(x)
        return x


class Mixed(nn.Module):
    """Every kind of stage the networks use: local, stride 2, global PSAL, ×2 upsampling."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encode = Convs(3, 8, depth=2, scale=Fraction(1, 2))
        self.attention = PSAL(patch_size=3, neighbors=3, iterations=3, aggregation="patch")
        self.decode = Convs(16, 8, depth=2, scale=Fraction(2))
        self.out = Convs(11, 3, depth=1)

    def run(self, ex, image: Tensor) -> Tensor:
        h, w = image.shape[-2:]
        padded = pad_to_multiple(image, 2)
        feat = ex.local(self.encode, padded)
        attended = ex.whole(lambda f: self.attention(f, f, f), feat)
        up = ex.local(self.decode, feat, attended)
        return ex.local(self.out, up, padded)[..., :h, :w]


@pytest.mark.parametrize("size", [(37, 53), (64, 64), (20, 9)])
@pytest.mark.parametrize("tile", [16, 24])
def test_tiled_equals_untiled(size: tuple[int, int], tile: int) -> None:
    net = Mixed().eval()
    image = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(5)
    with torch.no_grad():
        whole = net.run(Direct(), image)
    tiled = run_network(net, {"image": image}, Options(device="cpu", precision="fp32", tile=tile, seed=5))
    assert tiled.shape == whole.shape == (1, 3, *size)
    assert (tiled - whole).abs().max().item() < 1e-4


def test_tiled_counts_tiles_and_crops_context() -> None:
    seen: list[tuple[int, int]] = []
    stage = Convs(3, 4, depth=3)
    ex = Tiled(torch.device("cpu"), tile=10, on_tile=lambda done, total: seen.append((done, total)))
    x = torch.rand(1, 3, 25, 31)
    with torch.no_grad():
        assert torch.allclose(ex.local(stage, x), stage(x), atol=1e-5)
    assert seen[-1] == (12, 12) and len(seen) == 12  # 3 rows × 4 columns of tiles


@pytest.mark.parametrize("scale, side", [(2, 10), (4, 5)])
def test_upsampling_tiles_bound_the_input_and_twice_the_output(scale: int, side: int) -> None:
    """A ×s stage's input tiles are `tile` px, or tile·OUTPUT_TILES/s where its output would exceed that."""
    assert OUTPUT_TILES == 2
    seen: list[tuple[int, int]] = []
    stage = Convs(3, 4, depth=2, scale=Fraction(scale)).eval()
    ex = Tiled(torch.device("cpu"), tile=10, on_tile=lambda done, total: seen.append((done, total)))
    x = torch.rand(1, 3, 25, 31)
    with torch.no_grad():
        assert torch.allclose(ex.local(stage, x), stage(x), atol=1e-5)
    assert seen[-1][1] == math.ceil(25 / side) * math.ceil(31 / side)


def test_too_small_overlap_is_not_exact() -> None:
    """The overlap default is what makes tiling exact: with none, seams appear."""
    stage = Convs(3, 4, depth=3)
    x = torch.rand(1, 3, 40, 40)
    with torch.no_grad():
        exact = Tiled(torch.device("cpu"), tile=16).local(stage, x)
        seamy = Tiled(torch.device("cpu"), tile=16, overlap=0).local(stage, x)
        truth = stage(x)
    assert torch.allclose(exact, truth, atol=1e-5)
    assert (seamy - truth).abs().max() > 1e-3


class CopyFromFar(nn.Module):
    """Hand-built, untrained: replaces the hidden region with the best-matching visible pixels.

    Queries see the whole image (a stand-in for a coarse fill); keys touching the hidden
    region are masked, so whatever lands there must come from elsewhere in the image.
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = Convs(3, 3, depth=1)
        with torch.no_grad():  # identity features
            self.features.body[0].weight.zero_()
            self.features.body[0].bias.zero_()
            for c in range(3):
                self.features.body[0].weight[c, c, 1, 1] = 1
        self.attention = PSAL(patch_size=5, neighbors=1, iterations=8, temperature=1e-3)

    def run(self, ex, image: Tensor, hidden: Tensor) -> Tensor:
        feat = ex.local(self.features, image)
        copied = ex.whole(lambda f, h: self.attention(f, f, f, key_mask=h[:, 0] > 0), feat, hidden)
        return torch.where(hidden > 0, copied, image)


def test_attention_stays_global_under_tiling() -> None:
    """The only visible copy of a texture lies several tiles away: it is still what gets copied."""
    image = torch.full((1, 3, 96, 96), 0.5)
    stripes = (torch.arange(24) % 4 < 2).float().view(1, 1, 1, 24).expand(1, 3, 24, 24)
    image[..., 2:26, 2:26] = stripes  # top-left tile
    image[..., 66:90, 66:90] = stripes  # bottom-right tile: hidden, to be recreated
    image = image + 0.01 * torch.rand(image.shape, generator=torch.Generator().manual_seed(0))
    hidden = torch.zeros(1, 1, 96, 96)
    hidden[..., 62:94, 62:94] = 1
    net = CopyFromFar()
    tiled = run_network(net, {"image": image, "hidden": hidden}, Options(device="cpu", precision="fp32", tile=32))
    region = (..., slice(70, 86), slice(70, 86))
    error = (tiled[region] - image[region]).abs().mean()
    assert error < 0.05  # the stripes, in phase, from 60+ pixels and two tiles away
    assert torch.allclose(tiled, run_network(net, {"image": image, "hidden": hidden}, Options(device="cpu", precision="fp32", tile=0)), atol=1e-4)


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="unknown device|unsupported"):
        resolve_device("toaster")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


def test_same_seed_same_output() -> None:
    net = Mixed().eval()
    image = torch.rand(1, 3, 30, 30)
    a = run_network(net, {"image": image}, Options(device="cpu", precision="fp32", tile=16, seed=3))
    b = run_network(net, {"image": image}, Options(device="cpu", precision="fp32", tile=16, seed=3))
    assert torch.equal(a, b)


def _dihedral_mean(fn, x: Tensor) -> Tensor:
    """Mean of g⁻¹(fn(g(x))) over the 8 rotations and mirrored rotations g, by rot90."""
    total = torch.zeros_like(fn(x))
    for mirror in (False, True):
        for k in range(4):
            g = x.flip(-1) if mirror else x
            y = torch.rot90(fn(torch.rot90(g, k, (-2, -1))), -k, (-2, -1))
            total += y.flip(-1) if mirror else y
    return total / 8


class OneStage(nn.Module):
    """A network of one local stage (convolutions: their output follows no flip by itself)."""

    def __init__(self) -> None:
        super().__init__()
        self.stage = Convs(3, 3, depth=2)

    def run(self, ex, image: Tensor) -> Tensor:
        return ex.local(self.stage, image)

    def forward(self, image: Tensor) -> Tensor:
        return self.stage(image)


def test_self_ensemble_is_the_mean_over_the_eight_views() -> None:
    torch.manual_seed(0)
    net = OneStage().eval()
    image = torch.rand(1, 3, 21, 34)
    with torch.no_grad():
        truth = _dihedral_mean(net, image)
        plain = net(image)
    for tile in (0, 16):
        got = run_network(net, {"image": image}, Options(device="cpu", precision="fp32", tile=tile, views=8))
        torch.testing.assert_close(got, truth, atol=1e-5, rtol=1e-5)
    assert (got - plain).abs().max() > 1e-3  # a random network is no more symmetric than that
    two = run_network(net, {"image": image}, Options(device="cpu", precision="fp32", tile=0, views=2))
    with torch.no_grad():
        torch.testing.assert_close(two, (plain + net(image.flip(-1)).flip(-1)) / 2, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="views must be 1, 2, 4 or 8"):
        run_network(net, {"image": image}, Options(device="cpu", precision="fp32", views=3))


def test_self_ensemble_of_a_symmetric_network_changes_nothing() -> None:
    """A network with mirror- and rotation-symmetric kernels gives the same output in every view."""
    net = OneStage().eval()
    with torch.no_grad():
        for conv in net.stage.body:
            if isinstance(conv, nn.Conv2d):
                w = conv.weight
                views = [w, w.transpose(-1, -2)]
                views += [v.flip(dims) for v in views for dims in ((-1,), (-2,), (-2, -1))]
                w.copy_(sum(views) / 8)
    image = torch.rand(1, 3, 19, 26)
    plain = run_network(net, {"image": image}, Options(device="cpu", precision="fp32"))
    torch.testing.assert_close(run_network(net, {"image": image}, Options(device="cpu", precision="fp32", views=8)), plain, atol=1e-5, rtol=1e-5)


TINY_NETWORKS = {
    "upscale-x3": ("psal-upscale", dict(scale=3, channels=8, blocks_before=1, blocks_after=1, qk_channels=4)),
    "colorize": ("psal-colorize", dict(encoder_width=8, qk_channels=4, feat_channels=2, decoder_width=8, dilations=[1, 2])),
    "inpaint": ("psal-inpaint", dict(width=8, encoder_dilations=(1, 2), decoder_dilations=(1,), refine_width=4,
                                     attn_channels=4, work_size=32, detail_search=16)),
}


def photo(name: str, h: int, w: int) -> Tensor:
    """A bundled example photo resized to h×w: natural content, so few exact ties between patches."""
    import numpy as np
    from PIL import Image

    img = Image.open(Path(__file__).parents[1] / "examples" / name).convert("RGB").resize((w, h), Image.BICUBIC)
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float() / 255


def tiny_inputs(task: str, h: int, w: int) -> dict[str, Tensor]:
    image = photo("chelsea.png", h, w)
    if task == "psal-colorize":
        return {"gray": image.mean(1, keepdim=True), "reference": photo("coffee.png", 23, 31)}
    if task == "psal-inpaint":
        mask = torch.zeros(1, 1, h, w)
        mask[..., h // 3 : h // 2 + 2, w // 4 : w // 2] = 1
        return {"image": image * (1 - mask), "mask": mask}
    return {"image": image}


@pytest.mark.parametrize("size", [(45, 61), (13, 17), (40, 40)], ids=["several tiles, odd", "smaller than a tile", "even"])
@pytest.mark.parametrize("name", list(TINY_NETWORKS))
def test_every_network_tiled_equals_untiled(name: str, size: tuple[int, int]) -> None:
    """Each real network with tiny random weights: tiles of 16 px give the untiled output to 1/255.

    The stages themselves are exact (see above); what can differ is a k-NN choice between
    patches tied to ~1e-7 (tiny random features make many), which float summation order
    flips (which it flips differs between CPUs: 96.7 % within 1/255 on an AVX2 one). So: at
    least 95 % of the pixels within 1/255, none off by more than 0.02. A real tiling error (no
    overlap) puts pixels off by 0.13–0.2, as the last check shows.
    """
    from psal_cli.networks import create_model

    architecture, config = TINY_NETWORKS[name]
    torch.manual_seed(0)
    model = create_model(architecture, **config).eval()
    inputs = tiny_inputs(architecture, *size)
    whole = run_network(model, inputs, Options(device="cpu", precision="fp32", tile=0, seed=1))
    tiled = run_network(model, inputs, Options(device="cpu", precision="fp32", tile=16, seed=1))
    assert tiled.shape == whole.shape

    def agreement(out: Tensor) -> float:
        return ((out - whole).abs().amax(1) <= 1 / 255).float().mean().item()

    assert agreement(tiled) >= 0.95
    assert (tiled - whole).abs().max().item() <= 0.02
    if min(size) > 32:  # several tiles each way
        seamy = run_network(model, inputs, Options(device="cpu", precision="fp32", tile=16, tile_overlap=0, seed=1))
        assert (seamy - whole).abs().max().item() > 0.05


SEARCH_CASES = {  # each network with each search (PatchMatch: EXACT_PAIRS = 0): (network, EXACT_PAIRS)
    "upscale, PatchMatch": (TINY_NETWORKS["upscale-x3"], 0),
    "upscale, exact": (TINY_NETWORKS["upscale-x3"], attention.EXACT_PAIRS),
    "colorize, exact": (TINY_NETWORKS["colorize"], attention.EXACT_PAIRS),
    "colorize, PatchMatch": (TINY_NETWORKS["colorize"], 0),
    "inpaint, PatchMatch": (TINY_NETWORKS["inpaint"], 0),
    "inpaint, exact": (TINY_NETWORKS["inpaint"], attention.EXACT_PAIRS),
}


@pytest.mark.parametrize("precision, tolerance", [("fp16", 2 / 255), ("bf16", 16 / 255)])
@pytest.mark.parametrize("name", list(SEARCH_CASES))
def test_every_network_runs_in_half_precision(name: str, precision: str, tolerance: float,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """`--half` on a GPU runs the stages under float16 autocast (the CPU's float16 autocast
    stands in for it), `--precision bf16` under bfloat16 autocast on the CPU. The searches
    must keep to float32 (a float16 query map once met the float32 search tables in one
    matrix product on CUDA), and the output stay close: bfloat16 keeps 3 fewer mantissa
    bits than float16, hence 8× the tolerance."""
    from psal_cli.networks import create_model

    (architecture, config), exact_pairs = SEARCH_CASES[name]
    monkeypatch.setattr(attention, "EXACT_PAIRS", exact_pairs)
    torch.manual_seed(0)
    model = create_model(architecture, **config).eval()
    inputs = tiny_inputs(architecture, 40, 40)
    full = run_network(model, inputs, Options(device="cpu", precision="fp32", seed=1))
    if precision == "fp16":
        monkeypatch.setattr(Tiled, "_precision", lambda self: torch.autocast("cpu", dtype=torch.float16))
    half = run_network(model, inputs, Options(device="cpu", precision="bf16" if precision == "bf16" else "fp32", seed=1))
    assert half.dtype == torch.float32 and half.shape == full.shape
    assert not torch.equal(half, full)  # it did run in half precision
    assert ((half - full).abs().amax(1) <= tolerance).float().mean().item() >= 0.95


def test_precision_resolves_from_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    from psal_cli import engine

    cpu = torch.device("cpu")
    assert engine.resolve_precision("fp32", cpu) is None
    assert engine.resolve_precision("bf16", cpu) is torch.bfloat16
    assert engine.resolve_precision("bf16", torch.device("cuda")) is None  # a GPU's precision is --half's
    for native in (True, False):
        monkeypatch.setattr(engine, "native_bf16", lambda device, native=native: native)
        assert engine.resolve_precision("auto", cpu) is (torch.bfloat16 if native else None)
    with pytest.raises(ValueError, match="precision must be one of"):
        engine.resolve_precision("fp16", cpu)


@pytest.mark.parametrize("name", list(SEARCH_CASES))
def test_every_network_makes_its_tensors_on_the_inputs_device(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under torch's default device `meta`, a tensor made without naming the inputs' device
    lands there and the first operation mixing it with them fails: what a GPU run would hit
    (results on the CPU indexed with GPU tensors), caught on a CPU-only machine."""
    from psal_cli.networks import create_model

    (architecture, config), exact_pairs = SEARCH_CASES[name]
    monkeypatch.setattr(attention, "EXACT_PAIRS", exact_pairs)
    torch.manual_seed(0)
    model = create_model(architecture, **config).eval()
    inputs = tiny_inputs(architecture, 24, 28)
    expected = run_network(model, inputs, Options(device="cpu", tile=0, seed=1))
    with torch.device("meta"):
        out = run_network(model, inputs, Options(device="cpu", tile=0, seed=1))
    assert out.device == expected.device and torch.equal(out, expected)


def test_runs_leave_torch_global_generator_alone() -> None:
    """The engine seeds each run's searches with a generator of its own: the global one is
    neither reseeded nor drawn from, and the output is what the global generator seeded
    with the same seed gives (so seeds keep their outputs)."""
    from psal_cli.networks import create_model

    architecture, config = TINY_NETWORKS["inpaint"]
    torch.manual_seed(0)
    model = create_model(architecture, **config).eval()
    inputs = tiny_inputs(architecture, 40, 40)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    out = run_network(model, inputs, Options(device="cpu", precision="fp32", tile=0, seed=7))
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(7)
    with torch.inference_mode():  # the same executor drawing from the global generator
        assert torch.equal(out, model.run(Tiled(torch.device("cpu"), 0), **inputs))
    assert not torch.equal(out, run_network(model, inputs, Options(device="cpu", precision="fp32", tile=0, seed=8)))


@pytest.mark.parametrize("name, auto", [("upscale-x3", "bf16"), ("inpaint", "fp32"), ("colorize", "fp32")])
def test_auto_precision_takes_bfloat16_only_for_networks_that_keep_their_figures(
        name: str, auto: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from psal_cli import engine
    from psal_cli.networks import create_model

    monkeypatch.setattr(engine, "native_bf16", lambda device: True)
    architecture, config = TINY_NETWORKS[name]
    torch.manual_seed(0)
    model = create_model(architecture, **config).eval()
    inputs = tiny_inputs(architecture, 40, 40)
    chosen = run_network(model, inputs, Options(device="cpu", precision="auto", seed=1))
    assert torch.equal(chosen, run_network(model, inputs, Options(device="cpu", precision=auto, seed=1)))
