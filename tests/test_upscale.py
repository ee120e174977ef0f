"""The PSAL super-resolution network, its training and the benchmark protocol."""

from __future__ import annotations

import json
from dataclasses import asdict
import logging
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import random_image
from PIL import Image

from psal_cli import attention, edit
from psal_cli.attention import exact_knn
from psal_cli.modelfile import read_info, save_model
from psal_cli.networks.upscale import PSALUpscale
from psal_cli.tasks import upscale as task
from psal_cli.training import to_float

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def tiny(scale: int = 2, **overrides) -> PSALUpscale:
    torch.manual_seed(0)
    config = dict(scale=scale, channels=8, blocks_before=1, blocks_after=1, qk_channels=4)
    return PSALUpscale(PSALUpscale.Config(**{**config, **overrides})).eval()


@pytest.mark.parametrize("scale", [2, 3, 4])
@pytest.mark.parametrize("exact_pairs", [0, attention.EXACT_PAIRS])  # PatchMatch and exact search
def test_output_shape_and_range(scale: int, exact_pairs: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attention, "EXACT_PAIRS", exact_pairs)
    with torch.no_grad():
        out = tiny(scale)(image=torch.rand(2, 3, 9, 13))
    assert out.shape == (2, 3, 9 * scale, 13 * scale)
    assert out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("config, side", [({}, 4), ({"neighbors": 9}, 5), ({"neighbors": 1}, 3),
                                          ({"patch_size": 5}, 6), ({"attention": False}, 1)])
def test_smallest_image_runs_and_a_pixel_less_is_a_clear_error(config: dict, side: int) -> None:
    """The declared minimum follows patch size and neighbours; it is exact: a pixel less
    fails inside the network too (so the check refuses nothing that would work)."""
    model = tiny(**config)
    assert edit.upscale(model, random_image(size=(side, side))).size == (2 * side, 2 * side)
    for w, h in [(side - 1, side), (side, side - 1)] if side > 1 else []:
        with pytest.raises(ValueError, match=fr"^image too small \({w}×{h} px\): psal-upscale needs at least {side}×{side}$"):
            edit.upscale(model, random_image(size=(w, h)))
        with pytest.raises(ValueError):
            model(image=torch.rand(1, 3, h, w))


def test_thin_images_run_while_they_hold_enough_patches() -> None:
    model = tiny()  # 3×3 patches, 4 neighbours: a 3-pixel strip needs 6 pixels of length
    for w, h in [(3, 6), (6, 3), (3, 200), (200, 3)]:
        assert edit.upscale(model, random_image(size=(w, h))).size == (2 * w, 2 * h)
    for w, h in [(3, 5), (200, 2)]:
        with pytest.raises(ValueError, match=fr"^image too small \({w}×{h} px\): psal-upscale needs at least 4×4$"):
            edit.upscale(model, random_image(size=(w, h)))


def test_stage_radii_bound_the_receptive_field() -> None:
    """Changing one input pixel changes a stage's output only within its declared radius."""
    model = tiny(3)
    for stage, inputs, scale in [(model.head, (torch.rand(1, 3, 31, 31),), 1),
                                 (model.tail, (torch.rand(1, 8, 31, 31), torch.rand(1, 3, 31, 31)), 3)]:
        with torch.no_grad():
            before = stage(*inputs)
            for x in inputs:
                x[..., 15, 15] += 1
            changed = (stage(*inputs) - before).abs().sum(1)[0] > 1e-6  # (H·s, W·s)
        ys, xs = changed.nonzero(as_tuple=True)
        r = stage.radius
        assert stage.scale == scale and len(ys) > 0
        assert ys.min() >= (15 - r) * scale and ys.max() < (16 + r) * scale
        assert xs.min() >= (15 - r) * scale and xs.max() < (16 + r) * scale


def test_attention_uses_exact_neighbours_on_small_maps_and_patchmatch_above(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny(2)
    monkeypatch.setattr(attention, "EXACT_PAIRS", 12**4)
    block = model.attention
    for side, exact in [(12, True), (13, False)]:
        feat = torch.randn(1, 8, side, side, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            out = block(feat, generator=torch.Generator().manual_seed(0))
            q, k = block.query(feat), block.key(feat)
            truth = exact_knn(q, k, patch_size=3, neighbors=4)
            with_truth = feat + block.gamma * block.out(block.value(block.psal.attend(q, k, feat, truth.indices)))
        assert torch.allclose(out, with_truth, atol=1e-6) == exact


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_tail_adds_torch_bicubic_of_the_input_in_float32(scale: int) -> None:
    """The tail's convolution-made bicubic is `interpolate`'s, borders included, and stays
    float32 when the network runs under bfloat16 autocast."""
    from psal_cli.networks.upscale import Tail

    torch.manual_seed(0)
    tail = Tail(8, 1, scale)
    zero, lr = torch.zeros(2, 8, 13, 17), torch.rand(2, 3, 13, 17)
    with torch.no_grad():
        tail.up.weight.zero_()
        tail.up.bias.zero_()  # the sub-pixel branch adds nothing: the tail is the bicubic alone
        bicubic = torch.nn.functional.interpolate(lr, scale_factor=scale, mode="bicubic", align_corners=False)
        assert (tail(zero, lr) - bicubic).abs().max() < 1e-5
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = tail(zero, lr)
    assert out.dtype == torch.float32 and (out - bicubic).abs().max() < 1e-5


def test_gradient_reaches_attention_inputs() -> None:
    model = tiny(2).train()
    model(image=torch.rand(2, 3, 12, 12)).mean().backward()
    for conv in (model.attention.query, model.attention.key, model.attention.value):
        assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0


def test_ablation_has_no_attention() -> None:
    with_attention, without = tiny(2), tiny(2, attention=False)
    assert without.attention is None
    assert not any(n.startswith("attention.") for n in without.state_dict())
    extra = sum(p.numel() for p in with_attention.attention.parameters())
    assert sum(p.numel() for p in with_attention.parameters()) - sum(p.numel() for p in without.parameters()) == extra


def test_augmented_crops_rescale_and_permute_colors() -> None:
    """On a photo that is a ramp (1 level per pixel) in one channel, a plain crop climbs 1 level
    per pixel, a crop reduced by f climbs 1/f; with colors the ramp moves to any channel."""
    ramp = torch.arange(200).repeat(200, 1)
    photo = torch.stack([ramp, torch.zeros_like(ramp), torch.zeros_like(ramp)]).byte()  # (3, 200, 200)

    def slopes_and_channels(**augment) -> tuple[list[float], set[int]]:
        sample = task.make_sampler([photo], 2, batch=64, patch=32, **augment)
        hr = sample(random.Random(0))["target"][:, :, 8:-8, 8:-8] * 255  # away from Pillow's edge handling
        channel = hr.abs().sum((2, 3)).argmax(1)  # where the ramp is
        ramps = hr[torch.arange(len(hr)), channel]
        steps = torch.maximum(ramps.diff(dim=1).abs().mean((1, 2)), ramps.diff(dim=2).abs().mean((1, 2)))
        return steps.tolist(), set(channel.tolist())

    plain, channels = slopes_and_channels()
    assert all(abs(s - 1) < 0.05 for s in plain) and channels == {0}
    rescaled, channels = slopes_and_channels(rescale=0.5)
    assert all(0.95 < s < 2.05 for s in rescaled) and channels == {0}
    assert 16 < sum(s > 1.1 for s in rescaled) < 48  # about half the crops, by up to 2×
    _, channels = slopes_and_channels(colors=True)
    assert channels == {0, 1, 2}


@pytest.mark.parametrize("name", ["l1", "l2"])
def test_training_steps_reduce_the_loss(name: str) -> None:
    model = tiny(2).train()
    photos = [torch.from_numpy(np.array(Image.open(EXAMPLES / "chelsea.png").convert("RGB"))).permute(2, 0, 1)]
    batch = task.make_sampler(photos, 2, batch=4, patch=24)(random.Random(0))
    assert batch["image"].shape == (4, 3, 12, 12) and batch["target"].shape == (4, 3, 24, 24)
    loss_fn = task.loss_function(name)
    error = model(image=batch["image"]) - batch["target"]
    by_hand = error.abs().mean() if name == "l1" else error.square().mean()
    torch.testing.assert_close(loss_fn(model, batch), by_hand)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = loss_fn(model, batch).item()
    for _ in range(30):
        loss = loss_fn(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss_fn(model, batch).item() < 0.7 * first


def test_unknown_loss_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown loss 'l3' \\(use l1 or l2\\)"):
        task.loss_function("l3")


def test_degrade_crops_to_a_multiple_of_the_scale() -> None:
    hr, lr = task.degrade(Image.new("RGB", (37, 29)), 4)
    assert hr.size == (36, 28) and lr.size == (9, 7)


def _y_psnr_by_hand(a: np.ndarray, b: np.ndarray, border: int) -> float:
    """The benchmark's Y PSNR, written independently of psal_cli.metrics (uint8 RGB inputs)."""
    def y(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64) / 255
        return 16 + 65.481 * x[..., 0] + 128.553 * x[..., 1] + 24.966 * x[..., 2]

    d = (y(a) - y(b))[border:-border, border:-border]
    return 10 * math.log10(255**2 / np.mean(d**2))


def test_evaluate_protocol(tmp_path: Path) -> None:
    for name in ("chelsea", "coffee"):
        Image.open(EXAMPLES / f"{name}.png").convert("RGB").crop((0, 0, 50, 38)).save(tmp_path / f"{name}.png")
    model = tiny(3)
    report = task.evaluate(tmp_path, 3, model)
    assert [r["name"] for r in report.images] == ["chelsea", "coffee"]
    for row in report.images:
        hr = np.array(Image.open(tmp_path / f"{row['name']}.png"))[:36, :48]  # 38×50 → multiples of 3
        lr = Image.fromarray(hr).resize((16, 12), Image.Resampling.BICUBIC)
        bicubic = np.array(lr.resize((48, 36), Image.Resampling.BICUBIC))
        assert row["bicubic_psnr"] == pytest.approx(_y_psnr_by_hand(bicubic, hr, 3), abs=1e-6)
        with torch.no_grad():
            sr = model(image=to_float(lr))[0].permute(1, 2, 0).mul(255).round().byte().numpy()
        assert row["psnr"] == pytest.approx(_y_psnr_by_hand(sr, hr, 3), abs=1e-6)
        assert 0 < row["ssim"] <= 1 and 0 < row["lanczos_ssim"] <= 1
    assert report.mean["psnr"] == pytest.approx(sum(r["psnr"] for r in report.images) / 2)
    assert "bicubic" in task.format_report(report) and "mean" in task.format_report(report)
    figures = task.metrics_for_file(report)
    assert figures["psnr"] == pytest.approx(report.mean["psnr"], abs=1e-3)
    assert figures["bicubic_psnr"] == pytest.approx(report.baselines["bicubic"]["psnr"], abs=1e-3)
    json.dumps(asdict(report))


def test_evaluate_with_self_ensemble_records_beside_the_plain_figures(tmp_path: Path) -> None:
    from psal_cli.modelfile import save_model, write_metrics

    data = tmp_path / "set"
    data.mkdir()
    Image.open(EXAMPLES / "chelsea.png").convert("RGB").crop((0, 0, 48, 36)).save(data / "chelsea.png")
    path = tmp_path / "x3.safetensors"
    save_model(tiny(3), path)
    plain = task.evaluate(data, 3, path)
    write_metrics(path, {"set": task.metrics_for_file(plain)})
    both = task.evaluate(data, 3, path, ensemble=True)
    assert both.settings["ensemble"] and "self-ensemble" in task.format_report(both)
    assert both.images[0]["psnr"] != plain.images[0]["psnr"]
    assert both.baselines == plain.baselines
    figures = task.metrics_for_file(both)
    assert figures["psnr"] == round(plain.mean["psnr"], 3)  # kept
    assert figures["ensemble_psnr"] == round(both.mean["psnr"], 3)


def test_evaluate_refuses_another_scale(tmp_path: Path) -> None:
    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")
    with pytest.raises(ValueError, match="×2, not ×4"):
        task.evaluate(tmp_path, 4, tiny(2))


def test_evaluate_names_an_image_too_small_for_the_network(tmp_path: Path) -> None:
    Image.new("RGB", (40, 40)).save(tmp_path / "a.png")
    Image.new("RGB", (10, 10)).save(tmp_path / "b.png")  # 2×2 px reduced ×4: fewer than 4 patches
    with pytest.raises(ValueError, match=r"b.png reduced ×4 too small \(2×2 px\).*at least 4×4"):
        task.evaluate(tmp_path, 4, tiny(4))


def test_train_refuses_crops_too_small_for_psal_and_photos_smaller_than_the_crop(tmp_path: Path) -> None:
    data = tmp_path / "train"
    data.mkdir()
    Image.new("RGB", (64, 48)).save(data / "big.png")
    out = tmp_path / "x4.safetensors"
    with pytest.raises(ValueError, match="--patch 8 makes 2×2-px inputs at ×4"):
        task.train(data, out, 4, steps=1, batch=1, patch=8)
    Image.new("RGB", (30, 30)).save(data / "small.png")
    with pytest.raises(ValueError, match="small.png is smaller than the 32-px training crop"):
        task.train(data, out, 4, steps=1, batch=1, patch=32)
    assert not out.exists()


def test_train_resumes_and_changes_scale(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = tmp_path / "train"
    data.mkdir()
    for name in ("chelsea", "coffee"):
        Image.open(EXAMPLES / f"{name}.png").convert("RGB").resize((64, 48)).save(data / f"{name}.png")
    out = tmp_path / "x2.safetensors"
    task.train(data, out, 2, steps=2, batch=2, patch=24, config={"channels": 8, "blocks_after": 1})
    assert read_info(out).training["steps"] == 2
    task.train(data, out, 2, init=out, steps=3, batch=2, patch=24, loss="l2")
    assert read_info(out).training["steps"] == 5
    runs = read_info(out).training["runs"]
    assert [(run["steps"], run["loss"]) for run in runs] == [("0-2", "l1"), ("2-5", "l2")]
    x4 = tmp_path / "x4.safetensors"
    with caplog.at_level(logging.INFO, logger="psal"):
        task.train(data, x4, 4, init=out, steps=1, batch=2, patch=24)
    info = read_info(x4)
    assert info.config["scale"] == 4 and info.training["steps"] == 1 and "x2" in info.training["init_from"]
    assert any("initialised" in r.getMessage() for r in caplog.records)


def trained_looking(model: PSALUpscale) -> PSALUpscale:
    """The network with every weight nudged: no zero convolution left to hide a mistake."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def assert_same_function(model: PSALUpscale, grown: PSALUpscale) -> None:
    """`grown` gives `model`'s output (same PatchMatch seed); then backpropagates once."""
    image = torch.rand(1, 3, 14, 18)
    torch.manual_seed(1)
    before = model(image=image)
    torch.manual_seed(1)
    torch.testing.assert_close(grown(image=image), before, atol=1e-6, rtol=1e-6)
    grown(image=image).sum().backward()


def one_step_x2(tmp_path: Path) -> tuple[Path, Path]:
    """A one-photo training folder and a tiny ×2 model file trained one step on it."""
    data = tmp_path / "train"
    data.mkdir()
    Image.open(EXAMPLES / "chelsea.png").convert("RGB").resize((64, 48)).save(data / "a.png")
    out = tmp_path / "x2.safetensors"
    task.train(data, out, 2, steps=1, batch=1, patch=24, config={"channels": 8, "blocks_after": 1})
    return data, out


def test_deepen_keeps_the_function_and_adds_trainable_blocks(tmp_path: Path) -> None:
    model = trained_looking(tiny(2, blocks_after=2))
    deeper = model.deepen(3)
    assert deeper.config.blocks_after == 5 and model.config.blocks_after == 2
    assert_same_function(model, deeper)
    assert deeper.tail.body[0].conv2.weight.grad.abs().sum() > 0  # the new blocks learn

    data, out = one_step_x2(tmp_path)
    task.train(data, out, 2, init=out, deepen=2, steps=1, batch=1, patch=24)
    info = read_info(out)
    assert info.config["blocks_after"] == 3 and info.training["steps"] == 2 and "+2" in info.training["grown"][0]
    with pytest.raises(ValueError, match="deepen"):
        task.train(data, tmp_path / "x4.safetensors", 4, init=out, deepen=1, steps=1)


def test_widen_keeps_the_function_and_trains_the_added_channels(tmp_path: Path) -> None:
    model = trained_looking(tiny(2, blocks_after=2))
    wider = model.widen(13)
    assert wider.head.body[0].conv1.weight.shape[0] == 13 and wider.tail.body[1].conv2.weight.shape[1] == 13
    assert_same_function(model, wider)
    width = model.config.channels
    assert wider.tail.body[0].conv2.weight.grad[:, width:].abs().sum() > 0  # the added channels learn
    with pytest.raises(ValueError, match="inner channels"):
        wider.widen(13)

    data, out = one_step_x2(tmp_path)
    task.train(data, out, 2, init=out, widen=12, steps=1, batch=1, patch=24)
    info = read_info(out)
    assert info.config["inner_channels"] == 12 and "12 channels" in info.training["grown"][-1]


def test_model_file_round_trip(tmp_path: Path) -> None:
    from psal_cli.modelfile import load_model

    model = tiny(4, attention=False)
    save_model(model, tmp_path / "m.safetensors")
    loaded, info = load_model(tmp_path / "m.safetensors", task="upscale")
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(image=x), model(image=x))
    assert info.scale == 4


@pytest.mark.parametrize("exact_pairs", [0, attention.EXACT_PAIRS])  # PatchMatch and exact search
def test_banded_inference_attention_equals_the_training_formula(exact_pairs: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """At inference the attention aggregates features in bands and projects values after
    aggregating; it must equal feat + γ·out(attend(q, k, value(feat))) computed whole."""
    monkeypatch.setattr(attention, "EXACT_PAIRS", exact_pairs)
    block = tiny(2).attention
    block.psal.query_chunk = 40  # bands of 2–3 rows on a 17-wide map
    feat = torch.randn(2, 8, 23, 17, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        banded = block(feat, generator=torch.Generator().manual_seed(0))
    q, k, v = block.query(feat), block.key(feat), block.value(feat)
    indices = block.psal.search(q, k, generator=torch.Generator().manual_seed(0)).indices
    with torch.no_grad():
        whole = feat + block.gamma * block.out(block.psal.attend(q, k, v, indices))
    assert torch.allclose(banded, whole, atol=1e-5)


def test_real_degradation_crops_are_degraded_and_weights_choose_photos() -> None:
    """The sampler's "real" LR differs from the clean bicubic LR of the same HR crop (same
    seed, so the same first crop; the draws then move the later ones) and stays reproducible;
    photos are cropped in proportion to their weights."""
    flat = torch.full((3, 64, 64), 100, dtype=torch.uint8)
    photo = torch.from_numpy(np.array(Image.open(EXAMPLES / "chelsea.png").convert("RGB"))).permute(2, 0, 1).contiguous()
    # Seed 6: the first crop's draw is not one of the clean ones (a fifth of them are).
    clean = task.make_sampler([photo], 4, batch=8, patch=32)(random.Random(6))
    real = task.make_sampler([photo], 4, batch=8, patch=32, degradation="real")
    first, again = real(random.Random(6)), real(random.Random(6))
    assert torch.equal(first["image"], again["image"]) and torch.equal(first["target"][0], clean["target"][0])
    assert not torch.equal(first["image"][0], clean["image"][0])
    only_flat = task.make_sampler([photo, flat], 4, batch=16, patch=32, weights=[0.0, 1.0])(random.Random(0))
    assert torch.all(only_flat["target"] == 100 / 255)
    with pytest.raises(ValueError, match="unknown degradation 'blurry'"):
        task.make_sampler([photo], 4, batch=1, patch=32, degradation="blurry")


def test_train_real_holds_out_a_selection_split_and_records_the_degradation(tmp_path: Path) -> None:
    folders = [tmp_path / "a", tmp_path / "b"]
    for k, folder in enumerate(folders):
        folder.mkdir()
        for i in range(11 if k == 0 else 3):
            Image.open(EXAMPLES / "coffee.png").convert("RGB").crop((i, k, 64 + i, 48 + k)).save(folder / f"{k}_{i:02d}.png")
    out = tmp_path / "real.safetensors"
    task.train(folders, out, 4, steps=2, batch=2, patch=32, degradation="real", validate_every=1,
               config={"channels": 8, "blocks_after": 1, "qk_channels": 4})
    info = read_info(out)
    degradation = info.training["degradation"]
    assert degradation["name"] == "real" and "earlier" not in degradation
    assert [(r["probability"], r["jpeg_quality"]) for r in degradation["ranges"]] == [(0.5, [40, 90]), (0.5, [30, 95])]
    assert degradation["selection"] == ["0_00.png", "0_10.png", "1_00.png"]  # every tenth photo of each folder
    assert info.training["data"] == f"{folders[0]} (9 photos) + {folders[1]} (2 photos)"
    curve = info.training["curve"]
    assert [point["step"] for point in curve] == [1, 2]
    assert {"selection_real_psnr", "selection_psnr", "selection_real_bicubic_psnr"} <= set(curve[-1])
    assert info.metrics["selection_real_psnr"] == pytest.approx(curve[-1]["selection_real_psnr"], abs=1e-4)
    assert degradation["from_step"] == 0
    # Resumed, the run still records the step its real-photo training started from.
    resumed = tmp_path / "resumed.safetensors"
    task.train(folders, resumed, 4, init=out, steps=1, batch=2, patch=32, degradation="real", validate_every=1)
    again = read_info(resumed).training
    assert again["steps"] == 3 and again["degradation"]["from_step"] == 0


def test_a_resumed_real_run_records_the_ranges_its_earlier_steps_had(tmp_path: Path, monkeypatch) -> None:
    from psal_cli import degradations

    (tmp_path / "photos").mkdir()
    for i in range(3):
        Image.open(EXAMPLES / "coffee.png").convert("RGB").crop((i, 0, 64 + i, 48)).save(tmp_path / "photos" / f"{i}.png")
    first, second, third = (tmp_path / f"{n}.safetensors" for n in ("first", "second", "third"))
    tiny = {"channels": 8, "blocks_after": 1, "qk_channels": 4}
    monkeypatch.setattr(degradations, "TRAINING", ((1.0, degradations.WIDE),))
    task.train(tmp_path / "photos", first, 4, steps=2, batch=1, patch=32, degradation="real", config=tiny)
    monkeypatch.undo()
    task.train(tmp_path / "photos", second, 4, init=first, steps=1, batch=1, patch=32, degradation="real")
    task.train(tmp_path / "photos", third, 4, init=second, steps=1, batch=1, patch=32, degradation="real")
    clean = tmp_path / "clean.safetensors"
    task.train(tmp_path / "photos", clean, 4, init=second, steps=1, batch=1, patch=32)
    assert read_info(clean).training["degradation"] == {"name": "bicubic", "from_step": 3,
                                                        "before": read_info(second).training["degradation"]}
    once, twice = (read_info(f).training["degradation"] for f in (second, third))
    assert once["from_step"] == twice["from_step"] == 0
    assert once["ranges"] == twice["ranges"] == degradations.describe_mixture(degradations.TRAINING)
    # The same ranges again add nothing; the first run's are kept with the step they ended at.
    assert once["earlier"] == twice["earlier"] == [{"until_step": 2, "ranges": degradations.describe_mixture(((1.0, degradations.WIDE),))}]


def test_evaluate_real_degradation_is_each_photo_its_own_seeded_draw(tmp_path: Path) -> None:
    from psal_cli import degradations

    for name in ("chelsea", "coffee"):
        Image.open(EXAMPLES / f"{name}.png").convert("RGB").crop((0, 0, 48, 40)).save(tmp_path / f"{name}.png")
    model = tiny(4)
    clean = task.evaluate(tmp_path, 4, model)
    real = task.evaluate(tmp_path, 4, model, degradation="real", seed=5)
    assert real.images == task.evaluate(tmp_path, 4, model, degradation="real", seed=5).images
    assert task.evaluate(tmp_path, 4, model, degradation="real", seed=6).images[0]["degradation"] != real.images[0]["degradation"]
    row = real.images[1]
    hr = Image.open(tmp_path / "coffee.png").convert("RGB")
    lr, recipe = degradations.camera(hr, 4, 5, "coffee")  # the pipeline by its own entry point
    assert row["degradation"] == recipe.describe()
    bicubic = np.asarray(lr.resize(hr.size, Image.Resampling.BICUBIC))
    assert row["bicubic_psnr"] == pytest.approx(_y_psnr_by_hand(bicubic, np.asarray(hr), 4), abs=1e-6)
    assert row["bicubic_psnr"] < clean.images[1]["bicubic_psnr"]
    figures = task.metrics_for_file(real)
    assert figures["real_psnr"] == round(real.mean["psnr"], 3) and "psnr" not in figures
    assert "camera-like degradation seed 5" in task.format_report(real)
    with pytest.raises(ValueError, match="unknown degradation"):
        task.evaluate(tmp_path, 4, model, degradation="jpeg")
