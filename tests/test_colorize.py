"""Guided colorization: network contract, invariants, baselines, training and evaluation."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import random_image
from PIL import Image

from psal_cli import attention, edit
from psal_cli.color import rgb_to_lab, rgb_to_luma
from psal_cli.engine import Options, run_network
from psal_cli.modelfile import load_model, read_info
from psal_cli.networks.colorize import PSALColorize
from psal_cli.tasks import colorize as task

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def tiny(**overrides) -> PSALColorize:
    torch.manual_seed(0)
    config = {"encoder_width": 8, "qk_channels": 4, "feat_channels": 2, "decoder_width": 8, "dilations": [1, 2]}
    return PSALColorize(PSALColorize.Config(**{**config, **overrides})).eval()


def example(name: str, size: int) -> torch.Tensor:
    img = Image.open(EXAMPLES / name).convert("RGB")
    img = img.resize((size, round(size * img.height / img.width)), Image.BICUBIC)
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float() / 255


@pytest.mark.parametrize("exact_pairs", [0, attention.EXACT_PAIRS])  # PatchMatch, exhaustive search
def test_output_shape_range_and_exact_luminance(exact_pairs: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attention, "EXACT_PAIRS", exact_pairs)
    model = tiny()
    gray = rgb_to_luma(example("chelsea.png", 27))  # odd sizes: padding and cropping back
    ref = example("coffee.png", 33)
    with torch.no_grad():
        out = model(gray, ref)
    assert out.shape == (1, 3, *gray.shape[-2:])
    assert out.min() >= 0 and out.max() <= 1
    inside = ((out > 0) & (out < 1)).all(1, keepdim=True)  # not clipped to the RGB gamut
    assert inside.float().mean() > 0.9
    assert (rgb_to_luma(out) - gray)[inside].abs().max() < 1e-5


@pytest.mark.parametrize("exact_pairs", [0, attention.EXACT_PAIRS])  # PatchMatch, exhaustive search
@pytest.mark.parametrize("config, side", [({}, 5), ({"mirror": False}, 7), ({"neighbors": 9}, 7)])
def test_smallest_reference_runs_and_a_pixel_less_is_a_clear_error(config: dict, side: int, exact_pairs: int,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The reference's minimum follows patch size, neighbours, the half resolution and the
    mirror, whatever the image's size; it is exact: a pixel less fails inside the network too."""
    monkeypatch.setattr(attention, "EXACT_PAIRS", exact_pairs)
    model = tiny(**config)
    gray = random_image("L", (300, 200))
    assert edit.colorize(model, gray, random_image(size=(side, side))).size == (300, 200)
    for w, h in [(side - 1, side), (side, side - 1)]:
        with pytest.raises(ValueError, match=fr"^reference too small \({w}×{h} px\): psal-colorize needs at least {side}×{side}$"):
            edit.colorize(model, gray, random_image(size=(w, h)))
        with pytest.raises((ValueError, RuntimeError)):
            model(torch.rand(1, 1, 7, 9), torch.rand(1, 3, h, w))


@pytest.mark.parametrize("size", [(1, 1), (2, 3), (3, 200), (200, 3)])
def test_image_of_any_size_with_the_smallest_reference(size: tuple[int, int], monkeypatch: pytest.MonkeyPatch) -> None:
    """Even where PatchMatch searches (EXACT_PAIRS = 0): a target thinner than a patch at
    half resolution is searched replicate-padded."""
    monkeypatch.setattr(attention, "EXACT_PAIRS", 0)
    model = tiny()
    assert edit.colorize(model, random_image("L", size), random_image(size=(5, 5))).size == size


@pytest.mark.parametrize("exact_pairs", [0, attention.EXACT_PAIRS])
def test_tiled_engine_equals_whole_image(exact_pairs: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attention, "EXACT_PAIRS", exact_pairs)
    model = tiny()
    gray, ref = rgb_to_luma(example("chelsea.png", 50)), example("coffee.png", 40)
    whole = run_network(model, {"gray": gray, "reference": ref}, Options(device="cpu", precision="fp32", tile=0))
    tiled = run_network(model, {"gray": gray, "reference": ref}, Options(device="cpu", precision="fp32", tile=16))
    # Tiled stages equal untiled ones to ~3e-8, which can flip k-NN choices between tied patches
    # (flat quantised grey makes many): on an AVX2 CPU 2.8 % of the pixels differ, by < 0.01.
    off = (tiled - whole).abs().amax(1)
    assert (off <= 1 / 255).float().mean() >= 0.95 and off.max() <= 0.02
    seamy = run_network(model, {"gray": gray, "reference": ref},
                        Options(device="cpu", precision="fp32", tile=16, tile_overlap=0))
    assert (seamy - whole).abs().max() > 0.05  # without the overlap: 0.10


def test_gradient_reaches_psal_queries_and_keys() -> None:
    model = tiny().train()
    gray, ref = rgb_to_luma(example("chelsea.png", 24)), example("chelsea.png", 24)
    model.predict_chroma(task.Direct(), gray, ref).abs().mean().backward()
    # The last encoder convolution makes the q/k features; its gradient comes only through
    # PSAL's softmax weights (the decoder head starts at zero, so nothing else reaches it).
    qk_grad = model.encoder.low[-1].weight.grad[: model.config.qk_channels]
    assert qk_grad.abs().sum() > 0


def test_training_steps_reduce_the_loss_on_a_fixed_batch() -> None:
    photo = (example("chelsea.png", 96) * 255).round().byte()[0]
    batch = task.make_sampler([photo], 4, 32)(random.Random(0))
    model = tiny().train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss = task.chroma_l1(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.85 * losses[0]  # the matches move as the features learn: noisy


def test_reference_view_is_a_crop_at_unit_scale() -> None:
    photo = torch.rand(3, 20, 30)
    view = task._reference_view(photo, (9.5, 14.5), 8, 1.0, 0.0, False)  # centre of rows 6–13, cols 11–18
    assert torch.allclose(view, photo[:, 6:14, 11:19], atol=1e-5)
    mirrored = task._reference_view(photo, (9.5, 14.5), 8, 1.0, 0.0, True)
    assert torch.allclose(mirrored, photo[:, 6:14, 11:19].flip(-1), atol=1e-5)


def test_nearest_patch_copies_identical_content() -> None:
    rgb = task.quantize8(example("coffee.png", 40))
    gray = task.quantize8(rgb_to_luma(rgb))
    out = task.nearest_patch(gray, rgb)
    inner = (slice(None), slice(None), slice(2, -2), slice(2, -2))  # border query patches are padded
    assert (out - rgb)[inner].abs().max() < 3 / 255  # the only error: Y quantised to 8 bits


def test_reinhard_gives_a_gray_target_the_reference_mean_ab() -> None:
    gray = torch.linspace(0.3, 0.7, 64).view(1, 1, 8, 8)
    ref = torch.rand(1, 3, 10, 10) * 0.4 + 0.3
    lab = rgb_to_lab(task.reinhard(gray, ref))
    mean_ab = rgb_to_lab(ref)[:, 1:].mean((2, 3))
    assert torch.allclose(lab[:, 1:].flatten(2), mean_ab[..., None].expand(-1, -1, 64), atol=0.05)
    assert torch.allclose(lab[:, :1], rgb_to_lab(gray.expand(-1, 3, -1, -1))[:, :1], atol=0.05)


def test_scores_against_hand_computed_values() -> None:
    truth = torch.full((1, 3, 4, 4), 100 / 255)
    gray = rgb_to_luma(truth)
    same = task.scores(truth, truth, gray)
    assert same["psnr"] == math.inf and same["ab_mae"] < 1e-9 and same["y_err"] < 1e-4
    out = truth.clone()
    out[:, 0] += 10 / 255  # one of three channels off by 10 levels: MSE = 100/3 levels²
    s = task.scores(out, truth, gray)
    assert s["psnr"] == pytest.approx(10 * math.log10(255**2 / (100 / 3)))
    assert s["y_err"] == pytest.approx(0.299 * 10, abs=1e-4)


def test_evaluate_protocol_on_two_images(tmp_path: Path) -> None:
    data = tmp_path / "val"
    data.mkdir()
    # A flat colour photo: every method has one right answer and all find it.
    Image.new("RGB", (30, 20), (180, 120, 60)).save(data / "a_flat.png")
    Image.fromarray((example("chelsea.png", 30)[0].permute(1, 2, 0) * 255).round().byte().numpy()).save(data / "b.png")
    model = tiny()
    report = task.evaluate(data, model, size=None)
    assert [r["image"] for r in report.images] == ["a_flat", "b"]
    assert report.images[0]["size"] == [20, 21]  # 70 % of 30 columns
    flat = report.images[0]
    for variant in ("plain", "flipped"):
        for method in ("psal", "reinhard", "nearest"):
            assert flat[variant][method]["ab_mae"] < 0.5, (variant, method)
    means = report.mean["plain"]
    assert means["psnr"] == pytest.approx(np.mean([r["plain"]["psal"]["psnr"] for r in report.images]))
    assert set(report.baselines) == {"reinhard", "nearest"}
    text = task.format_report(report)
    assert "reinhard" in text and "nearest" in text
    assert set(task.metrics_for_file(report)) >= {"bsd100_full_plain_psnr", "bsd100_full_flipped_ab_mae"}


def test_train_writes_and_resumes(tmp_path: Path) -> None:
    data = tmp_path / "train"
    data.mkdir()
    for i, name in enumerate(("chelsea.png", "coffee.png")):
        Image.open(EXAMPLES / name).convert("RGB").resize((48, 40)).save(data / f"{i}.png")
    out = tmp_path / "m.safetensors"
    task.train(data, out, steps=2, batch=2, patch=24)
    task.train(data, out, init=out, steps=1, batch=2, patch=24)
    assert read_info(out).training["steps"] == 3
    assert [run["steps"] for run in read_info(out).training["runs"]] == ["0-2", "2-3"]
    model, info = load_model(out, task="colorize")
    assert info.architecture == "psal-colorize" and isinstance(model, PSALColorize)


def test_evaluate_precision_is_the_networks_alone(tmp_path: Path) -> None:
    """`psal eval --precision bf16` runs the network under bfloat16 autocast; the baselines
    (Reinhard's colour conversions are matrix products too) and the metrics stay as in float32."""
    data = tmp_path / "val"
    data.mkdir()
    Image.fromarray((example("chelsea.png", 40)[0].permute(1, 2, 0) * 255).round().byte().numpy()).save(data / "b.png")
    model = tiny()

    def figures(report: task.Report, method: str) -> list[float]:
        return [report.images[0][v][method][k] for v in ("plain", "flipped") for k in ("psnr", "ab_mae", "y_err")]

    full, half = (task.evaluate(data, model, size=None, nearest=False, precision=p) for p in ("fp32", "bf16"))
    assert figures(half, "reinhard") == figures(full, "reinhard")
    assert figures(half, "psal") != figures(full, "psal")  # the network did run in bfloat16
