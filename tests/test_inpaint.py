"""The PSAL inpainting network and its task module: invariants, training, evaluation."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import random_image
from PIL import Image

from psal_cli import edit
from psal_cli.attention import patch_distances, valid_key_centres
from psal_cli.engine import Options, run_network
from psal_cli.modelfile import default_model_path, load_model, read_info
from psal_cli.networks import create_model
from psal_cli.networks.inpaint import (Band, _bicubic_crop, _reduce, _resize, coherent_nnf, far_share, hole_box, hole_radius,
                                      pyramid_fill)
from psal_cli.networks.stages import Direct, pad_to_multiple
from psal_cli.tasks import inpaint as task
from psal_cli.training import to_float

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TINY = dict(width=8, encoder_dilations=(1, 2), decoder_dilations=(1,), refine_width=4, attn_channels=4,
            attn_iterations=2, detail_iterations=2)


def photo(h: int, w: int) -> torch.Tensor:
    image = Image.open(EXAMPLES / "coffee.png").convert("RGB").resize((w, h), Image.Resampling.BICUBIC)
    return to_float(image)


def box_hole(h: int, w: int, y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
    hole = torch.zeros(1, 1, h, w)
    hole[..., y0:y1, x0:x1] = 1
    return hole


def tiny(**over) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("psal-inpaint", **{**TINY, **over}).eval()


@pytest.mark.parametrize("size, work", [((44, 60), 512), ((70, 90), 40)])
def test_shape_range_and_known_pixels_exact(size, work):
    """Native size and the working-resolution path (photo larger than work_size) alike."""
    h, w = size
    image, hole = photo(h, w), box_hole(h, w, 10, 30, 15, 40)
    with torch.no_grad():
        out = tiny(work_size=work, work_pixels=0)(image=image * (1 - hole), mask=hole)
    assert out.shape == (1, 3, h, w)
    assert out.min() >= 0 and out.max() <= 1
    known = ~hole.bool().expand_as(image)
    assert torch.equal(out[known], image[known])
    assert (out - image * (1 - hole))[~known].abs().sum() > 0  # the hole was filled


@pytest.mark.parametrize("rows, cols, radius", [(1, 1, 1), (4, 100, 2), (5, 9, 3), (30, 40, 15), (200, 250, 100)])
def test_hole_radius_counts_the_erosions_that_remove_a_box(rows, cols, radius):
    """A rows×cols box inside a photo of at most 256 px (one pixel per cell) goes in ⌈min/2⌉ erosions."""
    hole = box_hole(240, 256, 20, 20 + rows, 3, 3 + cols)
    assert hole_radius(hole) == radius
    assert hole_radius(torch.zeros(1, 1, 240, 256)) == 0


def test_working_size_is_the_largest_at_which_the_hole_is_work_radius_wide():
    """A hole of half-width work_radius or less is filled at native size, within work_pixels;
    a wider one at the size where its half-width is work_radius, within work_pixels and never
    below work_size; no mask, at work_size."""
    model = tiny(work_size=64, work_pixels=384 * 512, work_radius=8)
    H, W = 384, 512
    assert model.working_size(H, W) == (48, 64)
    assert model.working_size(H, W, hole_radius(box_hole(H, W, 100, 104, 0, W))) == (H, W)  # a 4-px scratch
    assert model.working_size(H, W, hole_radius(box_hole(H, W, 100, 116, 0, W))) == (H, W)  # half-width 8
    assert model.working_size(H, W, hole_radius(box_hole(H, W, 100, 120, 0, W))) == (307, 410)  # half-width 10: × 0.8
    assert model.working_size(H, W, hole_radius(box_hole(H, W, 100, 300, 100, 400))) == (48, 64)  # half-width 100: × 0.08
    capped = tiny(work_size=64, work_pixels=96 * 128, work_radius=8)
    assert capped.working_size(H, W, hole_radius(box_hole(H, W, 100, 104, 0, W))) == (96, 128)
    assert capped.working_size(H, W, hole_radius(box_hole(H, W, 100, 120, 0, W))) == (96, 128)


def test_the_detail_band_is_native_for_a_narrow_hole_and_the_reductions_for_a_wide_one(monkeypatch):
    """On a photo larger than work_pixels, a scratch is filled near native size and only
    texture is missing (the native band); a wide hole at work_size lacks all the reduction lost."""
    model = tiny(work_size=64, work_pixels=96 * 128, work_radius=8).eval()
    H, W = 384, 512
    seen = []
    monkeypatch.setattr(type(model), "add_detail", lambda self, fill, mask, generator=None, reduction=1.0:
                        seen.append(reduction) or fill)
    with torch.no_grad():
        for hole in (box_hole(H, W, 100, 104, 0, W), box_hole(H, W, 100, 300, 100, 400)):
            model.run(Direct(torch.Generator().manual_seed(0)), photo(H, W), hole)
    assert seen == [1.0, 8.0]


def test_the_detail_gain_is_full_up_to_a_reduction_of_two_then_goes_to_one():
    """Deep inside a hole the copied band's weight is detail_gain at native size and at a
    reduction of 2 (a 1024-px photo's wide hole), and falls towards 1 as the reduction grows."""
    model = tiny()
    c, hole = model.config, box_hole(64, 64, 8, 56, 8, 56)
    weight = [model.detail_weight(hole, model.detail_band(hole, r))[0, 0, 32, 32].item() for r in (1, 2, 3, 8)]
    assert weight[0] == pytest.approx(c.detail_gain) and weight[1] == pytest.approx(c.detail_gain)
    assert c.detail_gain > weight[2] > weight[3] > 1 and weight[3] < 1 + 0.1 * (c.detail_gain - 1)


@pytest.mark.parametrize("radius", [1, 3, 6])
def test_far_share_against_the_distance_to_the_nearest_known_pixel(radius):
    """Random dots and blobs: the share of hole pixels more than `radius` pixels (Chebyshev)
    from a known one, the photo's border not counting as known."""
    gen = torch.Generator().manual_seed(radius)
    for trial in range(36):
        cell, grow = (1, 3, 6, 9)[trial % 4], trial // 4 % 3  # sparse dots and blobs, grown by 0–2 px
        hole = (torch.rand(1, 1, 54 // cell, 72 // cell, generator=gen) < 0.02 + 0.04 * (trial % 5)).float()
        hole = torch.nn.functional.interpolate(hole, size=(54, 72), mode="nearest")
        hole = torch.nn.functional.max_pool2d(hole, 2 * grow + 1, 1, grow)
        known = torch.nonzero(hole[0, 0] == 0)  # (n, 2)
        far = 0  # hole pixels farther than radius from their nearest known pixel
        for y, x in torch.nonzero(hole[0, 0]).tolist():
            far += not len(known) or (known - torch.tensor([y, x])).abs().amax(1).min().item() > radius
        assert far_share(hole, radius) == pytest.approx(far / max(1, hole.sum().item()))


def test_thin_holes_get_the_thin_band_and_wide_ones_the_wide_band():
    model = tiny()
    c = model.config
    scratch, patch = box_hole(64, 96, 30, 35, 5, 90), box_hole(64, 96, 20, 44, 30, 66)  # half-widths 3 and 12
    blot = scratch.clone()
    blot[..., 27:40, 40:53] = 1  # a blot 13 px across on the scratch: its centre is 7 px from a known pixel
    assert 0 < far_share(blot, c.thin_radius) <= c.thin_share
    assert model.detail_band(scratch) == model.detail_band(blot) == Band(c.thin_sigma, c.thin_ramp, c.thin_gain)
    assert model.detail_band(patch) == Band(c.detail_sigma, c.detail_ramp, c.detail_gain)
    assert tiny(thin_radius=0).detail_band(scratch) == Band(c.detail_sigma, c.detail_ramp, c.detail_gain)


def test_a_reduced_photo_keeps_full_resolution_edges_across_a_thin_scratch():
    """A 3-px scratch across stripes 6 px wide on a photo four times the working size: the
    network's correction up-sampled onto the full-size push-pull fill keeps the stripes,
    which the working-size fill up-sampled as a whole has lost."""
    model = load_model(default_model_path("inpaint"), task="inpaint")[0].eval()
    H, W = 480, 640
    y, x = torch.arange(H).view(-1, 1), torch.arange(W).view(1, -1)
    truth = torch.where((x + y // 8) % 12 < 6, 0.2, 0.8).expand(3, H, W)[None].float()  # stripes finer than the working size
    hole = box_hole(H, W, 200, 203, 0, W)
    seen = truth * (1 - hole)
    size = (120, 160)
    with torch.no_grad():
        small = _reduce(seen, hole, size)
        fill = model.fill_ensemble(Direct(torch.Generator().manual_seed(0)), small[:, :3], small[:, 3:])
        whole = seen + hole * _resize(fill, (H, W))
        ours = model.upsample_fill(seen, hole, fill, small)
    known = ~hole.bool().expand_as(truth)
    assert torch.equal(ours[known], truth[known])
    error = lambda out: (out - truth).abs()[~known].mean().item()
    assert error(ours) < 0.7 * error(whole), (error(ours), error(whole))


@pytest.mark.parametrize("config, H, W, box, size", [
    ({"work_pixels": 0}, 256, 320, (60, 200, 80, 260), (51, 64)),
    # Filled a little above the working size (where the box is work_radius wide), but reduced 5 times.
    ({"work_radius": 8}, 384, 512, (150, 230, 190, 310), (77, 102)),
])
def test_a_wide_hole_on_a_reduced_photo_is_the_working_size_fill_enlarged(config, H, W, box, size):
    """A box on a photo far above its working size (detail off): the result is the network's
    fill at the working size, enlarged (torch's bicubic resize). The photo's own push-pull fill
    under the enlarged correction, which a scratch gets, strays from that fill: across a hole
    this wide the two push-pull fills differ."""
    model = tiny(work_size=64, detail=False, **config)
    truth = photo(H, W)
    hole = box_hole(H, W, *box)
    assert model.working_size(H, W, hole_radius(hole)) == size
    seen = truth * (1 - hole)
    with torch.no_grad():
        out = model(image=seen, mask=hole)
        small = _reduce(seen, hole, size)
        fill = model.fill_ensemble(Direct(), small[:, :3], small[:, 3:])
        narrow = model.upsample_fill(seen, hole, fill, small)  # what a scratch would get
    enlarged = seen + hole * _resize(fill, (H, W))
    torch.testing.assert_close(out, enlarged, rtol=0, atol=1e-5)
    inside = F.max_pool2d(1 - small[:, 3:], 5, 1, 2) == 0  # hole cells 2 cells from a known one
    gap = lambda x: (F.interpolate(x, size=size, mode="area") - fill).abs()[inside.expand_as(fill)].mean().item()
    assert gap(narrow) > 2 * gap(out), (gap(narrow), gap(out))


def test_the_copy_rules_out_an_upsampled_source_at_the_maps_edge():
    """An upsampled field may point a patch at a source within a patch radius of the map's
    edge, where it has no pixels: the vote is then that of the same field without the patch,
    everywhere but at the patch's own centre (trust high, so that the copy shows; temperature
    high, so that a vote that counted would move every pixel it covers)."""
    model = tiny(copy_patch=15, copy_trust=1e3, copy_temperature=1e3)  # every vote weighs alike
    H, W = 48, 60
    estimate = photo(H, W)
    mask = box_hole(H, W, 18, 28, 24, 34)
    box = hole_box(mask, 14)
    y0, y1, x0, x1 = box
    voters = F.max_pool2d(mask[..., y0:y1, x0:x1], 15, 1, 7)
    valid = valid_key_centres(estimate.shape, 15, mask[:, 0] > 0)
    centres = valid.flatten().nonzero()[:, 0]
    pick = torch.randint(len(centres), (1, y1 - y0, x1 - x0, 1), generator=torch.Generator().manual_seed(0))
    field = centres[pick]  # valid sources at random
    py, px = 18, 18  # a hole pixel of the box
    silent = voters.clone()
    silent[0, 0, py, px] = 0
    with torch.no_grad():
        want = model.copy_vote(estimate, mask, estimate, box, silent, field, valid)
        for edge in (H * W - 1, W // 2, 3 * W):  # the bottom-right corner, the top row, the left column
            stray = field.clone()
            stray[0, py, px, 0] = edge
            got = model.copy_vote(estimate, mask, estimate, box, voters, stray, valid)
            keep = torch.ones_like(mask, dtype=torch.bool)
            keep[..., y0 + py, x0 + px] = False
            torch.testing.assert_close(got[keep.expand_as(got)], want[keep.expand_as(want)])
    assert (want - estimate).abs().amax() > 0.05  # the copy changed the hole


@pytest.mark.parametrize("config, boxes", [
    ({}, [(20, 35, 30, 50)]),
    ({}, [(55, 70, 71, 90)]),
    ({}, [(0, 70, 40, 41)]),
    ({"decoder_dilations": (1, 4, 8)}, [(30, 33, 40, 44)]),  # a decoder that reads farther than the refinement
    ({}, [(20, 35, 30, 50), (5, 9, 60, 75)]),  # a batch: the box around both holes
])
def test_the_fill_decodes_and_refines_the_holes_box_as_the_whole_map_would(config, boxes):
    """The decoder and the refinement run on the hole's box and their receptive margins: the
    fill equals the same network run over the whole map (a box inside, one in a corner, a
    column from edge to edge, a small hole and a wide-reaching decoder, a batch of two)."""
    model = tiny(**config)
    H, W = 70, 90
    hole = torch.cat([box_hole(H, W, *box) for box in boxes])
    seen = photo(H, W) * (1 - hole)
    with torch.no_grad():
        out = model.fill(Direct(torch.Generator().manual_seed(3)), seen, hole)
        base = pyramid_fill(seen, hole, model.config.prefill_iterations)
        x, m = pad_to_multiple(base, 4), pad_to_multiple(hole, 4)
        feat = model.encoder(x, m)
        attended = model.attend(feat, m, generator=torch.Generator().manual_seed(3))
        coarse = (base + model.decoder(feat, attended)[..., :H, :W]).clamp(0, 1)
        whole = seen + hole * model.refine(seen + hole * coarse, hole)
    torch.testing.assert_close(out, whole, rtol=0, atol=1e-5)


@pytest.mark.parametrize("small, size", [((51, 40), (225, 178)), ((64, 48), (32, 24)), ((1, 5), (3, 9))])
def test_bicubic_crop_is_the_crop_of_torchs_resize(small, size):
    """Up, down and from a single row: every crop, the image's corners and edges included."""
    x = torch.rand(2, 3, *small, generator=torch.Generator().manual_seed(1))
    whole = F.interpolate(x, size=size, mode="bicubic", align_corners=False)
    H, W = size
    for box in [(0, H, 0, W), (H // 3, H // 2 + 1, W // 5, W - 1), (H - 1, H, 0, 1)]:
        y0, y1, x0, x1 = box
        torch.testing.assert_close(_bicubic_crop(x, size, box), whole[..., y0:y1, x0:x1], rtol=0, atol=1e-6)


def fill_centre(model: torch.nn.Module, w: int, h: int) -> Image.Image:
    """`edit.inpaint` of a random w×h photo with its centre pixel as the hole."""
    return edit.inpaint(model, random_image(size=(w, h)), box_hole(h, w, h // 2, h // 2 + 1, w // 2, w // 2 + 1))


@pytest.mark.parametrize("config, side", [({}, 5), ({"attn_neighbors": 9}, 9), ({"attn_patch": 3}, 13)])
def test_smallest_photo_runs_and_a_pixel_less_is_a_clear_error(config, side):
    """The minimum follows PSAL's patch and neighbours at 1/4 of the working size; it is
    exact: a pixel less fails inside the network too."""
    model = tiny(**config)
    assert fill_centre(model, side, side).size == (side, side)
    for w, h in [(side - 1, side), (side, side - 1)]:
        with pytest.raises(ValueError, match=fr"^image too small \({w}×{h} px\): psal-inpaint needs at least {side}×{side}$"):
            fill_centre(model, w, h)
        with pytest.raises(ValueError):
            model(image=torch.rand(1, 3, h, w), mask=box_hole(h, w, 0, 1, 0, 1))


def test_thin_photos_run_while_their_features_hold_enough_patches():
    model = tiny()  # features at 1/4: a 1-pixel strip needs 13 pixels of length for 4 neighbours
    for w, h in [(13, 1), (1, 13), (3, 1000), (1000, 3)]:
        assert fill_centre(model, w, h).size == (w, h)
    with pytest.raises(ValueError, match=r"^image too small \(12×1 px\): psal-inpaint needs at least 5×5$"):
        fill_centre(model, 12, 1)


def test_attention_never_matches_hole_cells():
    image, hole = photo(48, 64), box_hole(48, 64, 8, 32, 8, 40)
    model = tiny(detail=False)
    searched = []
    search = model.attn.search
    model.attn.search = lambda *args, **kw: searched.append(search(*args, **kw)) or searched[-1]
    with torch.no_grad():
        model(image=image * (1 - hole), mask=hole)
    cells = torch.nn.functional.max_pool2d(hole, 4)[0, 0].flatten() > 0  # (12·16,) hole cells
    assert searched and not any(cells[nnf.indices.flatten()].any() for nnf in searched)


def test_detail_copies_known_texture_only():
    """Flat known pixels have no texture to copy: the detail stage changes nothing. Textured
    known pixels: the hole gets texture of the same strength, from a flat fill."""
    model = tiny(detail_ramp=0)
    hole = box_hole(64, 96, 20, 44, 30, 66)
    flat = torch.full((1, 3, 64, 96), 0.4)
    torch.manual_seed(0)
    assert torch.allclose(model.add_detail(flat, hole), flat, atol=1e-6)  # up to float rounding of the low-pass
    gen = torch.Generator().manual_seed(1)
    texture = 0.5 + 0.2 * torch.rand(1, 1, 64, 96, generator=gen).expand(1, 3, 64, 96)
    filled = torch.where(hole.bool(), torch.full_like(texture, 0.6), texture)
    out = model.add_detail(filled, hole)
    assert torch.equal(out[~hole.bool().expand_as(out)], filled[~hole.bool().expand_as(out)])
    assert task.sharpness_ratio(filled, hole) == 0
    assert task.sharpness_ratio(out, hole) > 0.5 * task.sharpness_ratio(texture, hole)


@pytest.mark.parametrize("where", ["corner pixel", "scratch across", "scratch on the edge"])
def test_detail_of_holes_thinner_than_a_search_patch(where):
    """A one-pixel hole's box is thinner than PatchMatch's 3-block patch (it failed with
    "query map (1, 94) is smaller than one 3×3 patch"); the long scratch makes 3-px blocks.
    As wide holes (thin_radius=0): a thin hole's fade-in leaves a one-pixel one no texture."""
    model = tiny(detail_ramp=0, thin_radius=0)
    rows, cols = {"corner pixel": (slice(0, 1), slice(0, 1)), "scratch across": (slice(20, 21), slice(10, 290)),
                  "scratch on the edge": (slice(39, 40), slice(0, 300))}[where]
    hole = torch.zeros(1, 1, 40, 300)
    hole[..., rows, cols] = 1
    gen = torch.Generator().manual_seed(1)
    texture = 0.5 + 0.2 * torch.rand(1, 1, 40, 300, generator=gen).expand(1, 3, 40, 300)
    filled = torch.where(hole.bool(), torch.full_like(texture, 0.6), texture)
    torch.manual_seed(0)
    out = model.add_detail(filled, hole)
    known = ~hole.bool().expand_as(out)
    assert torch.equal(out[known], filled[known])
    assert (out - filled)[~known].abs().mean() > 0.01  # texture was copied into the hole


def _cut_out(seed: int, size: tuple[int, int], box: tuple[int, int, int, int], noise: float,
             forbidden: tuple[int, int, int, int]):
    """A coherence problem: a random key map, the query cut out of it at `box` plus noise,
    keys touching `forbidden` ruled out, and a random start field of valid keys."""
    gen = torch.Generator().manual_seed(seed)
    key = torch.rand(1, 4, *size, generator=gen)
    y0, y1, x0, x1 = box
    query = key[..., y0:y1, x0:x1] + noise * torch.rand(1, 4, y1 - y0, x1 - x0, generator=gen)
    forbid = torch.zeros(1, *size, dtype=torch.bool)
    forbid[:, forbidden[0] : forbidden[1], forbidden[2] : forbidden[3]] = True
    valid = valid_key_centres(key.shape, 3, forbid)
    allowed = valid.flatten().nonzero()[:, 0]
    start = allowed[torch.randint(len(allowed), (1, y1 - y0, x1 - x0), generator=gen)]
    return query, key, valid, start


def _full_map_push_pull(image, mask, iterations):
    """pyramid_fill's push-pull with Jacobi steps over every cell of every level, as written first."""
    xs, ks = [image * (1 - mask)], [1 - mask]
    while min(xs[-1].shape[-2:]) > 1 and bool((ks[-1] == 0).any()):
        xs.append(torch.nn.functional.avg_pool2d(xs[-1], 2, ceil_mode=True))
        ks.append(torch.nn.functional.avg_pool2d(ks[-1], 2, ceil_mode=True))
    filled = xs[-1] / ks[-1].clamp(min=1e-8)
    for x, k in zip(reversed(xs[:-1]), reversed(ks[:-1])):
        filled = x + torch.nn.functional.interpolate(filled, size=x.shape[-2:], mode="bilinear",
                                                     align_corners=False) * (1 - k)
        for _ in range(iterations):
            p = torch.nn.functional.pad(filled, (1, 1, 1, 1), mode="replicate")
            filled = x + (p[..., :-2, 1:-1] + p[..., 2:, 1:-1] + p[..., 1:-1, :-2] + p[..., 1:-1, 2:]) * 0.25 * (1 - k)
    return filled


@pytest.mark.parametrize("holes", [
    [(0, 20, 30, 26, 41)],  # inside
    [(0, 0, 9, 0, 5), (0, 50, 61, 70, 77)],  # two, one in a corner, one on the bottom-right edges
    [(0, 5, 12, 60, 70), (1, 30, 45, 3, 9)],  # a batch whose photos have holes in different places
    [],  # nothing to fill
])
def test_pyramid_fill_relaxes_only_where_it_changes_anything(holes):
    """The fill equals the push-pull whose Jacobi steps run over the whole map of every level."""
    g = torch.Generator().manual_seed(3)
    image = torch.rand(2, 3, 61, 77, generator=g)
    mask = torch.zeros(2, 1, 61, 77)
    for b, y0, y1, x0, x1 in holes:
        mask[b, :, y0:y1, x0:x1] = 1
    out = pyramid_fill(image, mask, iterations=7)
    truth = _full_map_push_pull(image, mask, iterations=7)
    assert torch.allclose(out, truth, atol=1e-6, rtol=0)
    assert torch.equal(out * (1 - mask), image * (1 - mask))


def test_coherent_nnf_grows_coherent_regions_from_valid_keys_only():
    """A query map cut out of the key map: a random NNF becomes mostly coherent (neighbours
    copy neighbours), every returned key is a valid centre, and matches get no worse on average."""
    query, key, valid, start = _cut_out(0, (24, 24), (4, 16, 6, 18), 0.01, (8, 12, 8, 12))
    out = coherent_nnf(query, key, start, valid, 3, 1.0, 8)
    assert valid.flatten()[out.flatten()].all()

    def coherence(nnf: torch.Tensor) -> float:
        return ((nnf[:, :, 1:] == nnf[:, :, :-1] + 1).float().mean() + (nnf[:, 1:] == nnf[:, :-1] + 24).float().mean()).item() / 2

    assert coherence(start) < 0.1 and coherence(out) > 0.5
    before = patch_distances(query, key, start[..., None], 3).mean()
    assert patch_distances(query, key, out[..., None], 3).mean() <= before


def _coherent_nnf_reference(query, key, nnf, valid, patch, price, sweeps):
    """The ICM of `coherent_nnf` block by block in plain loops: every block of the colour
    scores its current source and each neighbour's shifted one, all at once per half-sweep."""
    from psal_cli.networks.inpaint import _STEPS

    _, hq, wq = nnf.shape
    hk, wk = key.shape[-2:]
    scale = price * patch_distances(query, key, nnf[..., None], patch).flatten().median().clamp(min=1e-12)
    nnf = nnf.clone()
    for t in range(2 * sweeps):
        old = nnf.clone()
        for y in range(hq):
            for x in range(wq):
                if (y + x) % 2 != t % 2:
                    continue
                proposals = []
                for dy, dx in _STEPS:
                    if not (0 <= y + dy < hq and 0 <= x + dx < wq):
                        proposals.append(-1)
                        continue
                    s = int(old[0, y + dy, x + dx])
                    sy, sx = s // wk - dy, s % wk - dx
                    ok = 0 <= sy < hk and 0 <= sx < wk and bool(valid[0, sy, sx])
                    proposals.append(sy * wk + sx if ok else -1)
                cand = [int(old[0, y, x])] + [p if p >= 0 else int(old[0, y, x]) for p in proposals]
                d = patch_distances(query, key, torch.tensor(cand).expand(1, hq, wq, -1), patch)[0, y, x]
                cost = [float(d[i]) - float(scale) * sum(c == p for p in proposals) for i, c in enumerate(cand)]
                nnf[0, y, x] = cand[min(range(len(cand)), key=cost.__getitem__)]
    return nnf


def test_coherent_nnf_is_the_plain_block_by_block_icm():
    query, key, valid, start = _cut_out(1, (20, 22), (3, 12, 5, 15), 0.05, (6, 10, 7, 11))
    out = coherent_nnf(query, key, start, valid, 3, 1.0, 3)
    assert torch.equal(out, _coherent_nnf_reference(query, key, start, valid, 3, 1.0, 3))
    assert not torch.equal(out, start)
    # A batch is its items, each with its own median price.
    other = coherent_nnf(query.flip(-1), key.flip(-2), start.flip(-1), valid, 3, 1.0, 3)
    both = coherent_nnf(torch.cat([query, query.flip(-1)]), torch.cat([key, key.flip(-2)]),
                        torch.cat([start, start.flip(-1)]), valid.expand(2, -1, -1), 3, 1.0, 3)
    assert torch.equal(both, torch.cat([out, other]))


def test_fill_ensemble_keeps_known_pixels_and_averages_views():
    image, hole = photo(40, 56), box_hole(40, 56, 10, 30, 12, 40)
    seen = image * (1 - hole)
    with torch.no_grad():
        one = tiny(fill_flips=1).fill_ensemble(Direct(), seen, hole)
        four = tiny(fill_flips=4).fill_ensemble(Direct(), seen, hole)
        views = [tiny().fill(Direct(), seen.flip(d), hole.flip(d)).flip(d) for d in ((-1,), (-2,), (-2, -1))]
    known = ~hole.bool().expand_as(image)
    assert torch.equal(four[known], seen[known])
    assert torch.allclose(four, seen + hole * (one + sum(views)) / 4, atol=1e-6)


def test_a_wide_hole_is_filled_as_the_mean_of_two_scales():
    image, hole = photo(96, 128), box_hole(96, 128, 24, 72, 32, 96)  # half-width 24: wide above 8
    seen = image * (1 - hole)
    plain = dict(detail=False, work_radius=8)
    run = lambda model: model.run(Direct(), image=seen, mask=hole)
    with torch.no_grad():
        both = run(tiny(fill_scales=2, **plain))
        native = run(tiny(**plain))
        half = run(tiny(work_size=64, **plain))  # the wide hole's working size: 48×64
        narrow = run(tiny(fill_scales=2, detail=False, work_radius=24))
        reduced = run(tiny(fill_scales=2, work_size=64, **plain))
        model, small = tiny(**plain), _reduce(seen, hole, (48, 64))
        coarse = model.upsample_fill(seen, hole, model.fill_ensemble(Direct(), small[:, :3], small[:, 3:]), small)
    assert torch.allclose(both, (native + coarse) / 2, atol=1e-6)
    assert (both - native).abs().max() > 1e-3
    assert torch.equal(narrow, native)  # a narrow hole is filled once
    assert torch.equal(reduced, half)  # and so is a hole of a photo above the working size
    known = ~hole.bool().expand_as(image)
    assert torch.equal(both[known], seen[known])


@pytest.mark.parametrize("over", [{}, {"fill_scales": 2, "work_radius": 4}])
def test_tiled_equals_untiled(over):
    image, hole = photo(72, 88), torch.from_numpy(task.eval_mask("thick", 72, 88, 0))[None, None].float()
    model = tiny(**over)
    inputs = {"image": image * (1 - hole), "mask": hole}
    whole = run_network(model, inputs, Options(device="cpu", precision="fp32", tile=0))
    tiled = run_network(model, inputs, Options(device="cpu", precision="fp32", tile=24))
    # Float rounding (1e-7) in the stitched features is amplified by the detail stage's
    # near-hard vote softmax (temperature 1e-5) to ~1e-5; a seam would be orders larger.
    assert torch.allclose(whole, tiled, atol=1e-3)


def test_gradient_reaches_psal_inputs():
    sample = task.make_sampler([(photo(60, 60)[0] * 255).byte()], batch=2, patch=32)
    model = tiny().train()
    task.hole_l1(model, sample(random.Random(0))).backward()
    for layer in (model.to_q, model.to_k, model.to_v):
        assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


def test_training_crops_are_never_enlarged():
    # Each pixel holds its own (row, column): a photo whose short side is the crop side can
    # only be cropped, so every crop pixel is one of the photo's, each exactly once.
    rows, cols = torch.meshgrid(torch.arange(40), torch.arange(70), indexing="ij")
    photo = torch.stack([rows, cols, torch.zeros_like(rows)]).byte()
    target = task.make_sampler([photo], batch=6, patch=40)(random.Random(0))["target"] * 255
    assert torch.allclose(target, target.round(), atol=1e-3)
    for crop in target.round().long():
        positions = crop[0] * 70 + crop[1]
        assert positions.unique().numel() == 40 * 40


def test_training_reduces_large_photos_to_the_largest_side_first():
    # A ramp of one level per 4 px along a 1024-px photo: reduced to 256 px its slope is one
    # level per pixel, and the random reduction after that only steepens it. Without the
    # first reduction the slope would be at most 0.25 / 0.35 = 0.71.
    ramp = (torch.arange(1024) / 4).expand(3, 512, 1024).byte()
    target = task.make_sampler([ramp], batch=8, patch=32, largest=256)(random.Random(0))["target"] * 255
    slopes = torch.maximum(target.diff(dim=-1).abs().mean((1, 2, 3)), target.diff(dim=-2).abs().mean((1, 2, 3)))
    assert (slopes > 0.95).all() and (slopes < 0.25 / 0.087 + 0.05).all(), slopes


@pytest.mark.parametrize("weighted, white", [(False, 0.5), (True, 16 / 17)])
def test_training_photos_are_drawn_by_their_pixels_when_weighted(weighted, white):
    small, large = torch.zeros(3, 64, 64, dtype=torch.uint8), torch.full((3, 256, 256), 255, dtype=torch.uint8)
    target = task.make_sampler([small, large], batch=400, patch=32, weighted=weighted)(random.Random(0))["target"]
    share = (target.mean((1, 2, 3)) > 0.5).float().mean().item()
    assert abs(share - white) < 0.05, share


def test_training_steps_reduce_loss_on_a_fixed_batch():
    sample = task.make_sampler([(photo(80, 80)[0] * 255).byte()], batch=4, patch=32)
    batch = sample(random.Random(0))
    model = tiny().train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = task.hole_l1(model, batch).item()
    for _ in range(50):
        loss = task.hole_l1(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert task.hole_l1(model, batch).item() < 0.85 * first  # 0.63-0.76 over the first four batches


@pytest.mark.parametrize("family", list(task.FAMILIES))
def test_eval_masks_are_deterministic_and_in_range(family):
    (lo, hi), _ = task.FAMILIES[family]
    for index in range(3):
        mask = task.eval_mask(family, 321, 481, index)
        assert np.array_equal(mask, task.eval_mask(family, 321, 481, index))
        assert lo - 0.005 <= mask.mean() <= hi + 0.005
    assert not np.array_equal(task.eval_mask(family, 321, 481, 0), task.eval_mask(family, 321, 481, 1))


def test_sharpness_ratio_of_checkerboards():
    """Gray checkerboards of amplitude a in the hole and b outside: the ratio is (a / b)²."""
    y, x = torch.meshgrid(torch.arange(40), torch.arange(40), indexing="ij")
    sign = ((y + x) % 2 * 2 - 1).float()
    hole = box_hole(40, 40, 10, 30, 10, 30)
    image = (0.5 + sign * torch.where(hole.bool()[0, 0], 0.1, 0.3)).expand(1, 3, 40, 40)
    assert task.sharpness_ratio(image, hole) == pytest.approx((0.1 / 0.3) ** 2, rel=1e-6)


def test_evaluate_on_two_images(tmp_path):
    """Two-tone gray images: the known-mean baseline's hole MAE, computed here with numpy."""
    h, w = 48, 64
    for i, (a, b) in enumerate(((0.2, 0.6), (0.3, 0.5))):
        img = np.zeros((h, w, 3), np.uint8)
        img[:, : w // 2], img[:, w // 2 :] = round(a * 255), round(b * 255)
        Image.fromarray(img).save(tmp_path / f"im{i}.png")
    report = task.evaluate(tmp_path, "box", tiny())
    assert report.task == "inpaint" and len(report.images) == 2
    maes = []
    for i in range(2):
        truth = np.asarray(Image.open(tmp_path / f"im{i}.png"), np.float64)
        hole = task.eval_mask("box", h, w, i)
        fill = np.round(truth[~hole].mean(0))  # known mean, to 8-bit levels
        maes.append(np.abs(truth[hole] - fill).mean())
    assert report.baselines["mean"]["mae"] == pytest.approx(np.mean(maes), abs=1e-4)  # float32 sums
    for key in ("psnr", "ssim", "mae"):
        assert math.isfinite(report.mean[key])
    assert "mean" in task.format_report(report)


def test_evaluate_says_once_which_baselines_it_cannot_measure(tmp_path, monkeypatch, caplog):
    """A baseline whose package is missing is named once in the log, not silently left out."""
    for i in range(2):
        random_image("RGB", (64, 48), seed=i).save(tmp_path / f"im{i}.png")
    monkeypatch.setitem(task.CLASSICAL, "telea", lambda image, hole: None)  # what a missing OpenCV gives
    with caplog.at_level("WARNING", logger="psal"):
        report = task.evaluate(tmp_path, "box", tiny())
    said = [r.getMessage() for r in caplog.records if "not measured" in r.getMessage()]
    # once for two images (Navier–Stokes too where OpenCV is missing)
    assert said.count('telea not measured: unavailable (pip install "psal-cli[eval]")') == 1
    assert "telea" not in report.baselines and "mean" in report.baselines


def test_classical_baselines_fill_only_the_hole_and_continue_a_vertical_edge():
    """Telea, Navier–Stokes and PatchMatch (when installed) across a box in a two-tone image:
    known pixels kept, each side of the edge filled with its own tone."""
    h, w = 48, 64
    truth = torch.full((1, 3, h, w), 0.2)
    truth[..., w // 2 :] = 0.6
    hole = box_hole(h, w, 18, 30, 20, 44)
    seen = truth * (1 - hole)
    outs = {m: task.opencv_inpaint(seen, hole, m) for m in ("telea", "ns")} | {"patchmatch": task.patchmatch_inpaint(seen, hole)}
    outs = {m: out for m, out in outs.items() if out is not None}
    if not outs:
        pytest.skip("neither opencv nor pypatchmatch is installed")
    for method, out in outs.items():
        known = ~hole.bool().expand_as(out)
        assert torch.allclose(out[known], truth[known], atol=0.5 / 255), method
        inside = (out - truth).abs()[..., 18:30, 20:44]
        assert inside[..., :, :6].mean() < 0.05 and inside[..., :, -6:].mean() < 0.05, method  # away from the edge


def test_train_writes_and_resumes(tmp_path):
    for i in range(2):
        Image.fromarray((photo(70, 90)[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(tmp_path / f"{i}.png")
    out = tmp_path / "m.safetensors"
    task.train(tmp_path, out, steps=2, batch=1, patch=32)
    assert read_info(out).training["steps"] == 2
    before = load_model(out, task="inpaint")[0].state_dict()
    task.train(tmp_path, out, init=out, steps=1, batch=1, patch=32, lr=2e-4, seed=5)
    model, info = load_model(out, task="inpaint")
    assert info.training["steps"] == 3 and info.architecture == "psal-inpaint"
    first, second = info.training["runs"]  # each run's recipe is kept
    assert first["steps"] == "0-2" and second["steps"] == "2-3" and (second["lr"], second["seed"]) == (2e-4, 5)
    after = model.state_dict()  # the resumed run trained the weights it started from
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)
    image, hole = photo(32, 32), box_hole(32, 32, 8, 20, 8, 20)
    with torch.no_grad():
        filled = model(image=image * (1 - hole), mask=hole)
    assert torch.equal(filled * (1 - hole), image * (1 - hole))  # known pixels kept exactly
    assert filled.isfinite().all() and 0 <= filled.min() and filled.max() <= 1


def test_train_on_several_folders_records_each(tmp_path):
    for folder, count in (("a", 2), ("b", 1)):
        (tmp_path / folder).mkdir()
        for i in range(count):
            image = (photo(70, 90)[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
            Image.fromarray(image).save(tmp_path / folder / f"{i}.png")
    out = tmp_path / "m.safetensors"
    task.train([tmp_path / "a", tmp_path / "b"], out, steps=1, batch=1, patch=32)
    assert read_info(out).training["data"] == f"{tmp_path / 'a'} (2 photos) + {tmp_path / 'b'} (1 photos)"


def test_ssim_equals_the_2d_window_formula():
    """metrics.ssim blurs with two 1-D passes; the 2-D 11×11 Gaussian window is the definition."""
    from psal_cli.metrics import ssim

    a = photo(40, 52) * 255
    b = (a + 20 * torch.rand(a.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 255)
    a, b = a.double(), b.double()
    g = torch.exp(-((torch.arange(11, dtype=torch.float64) - 5) ** 2) / 4.5)
    g = g / g.sum()
    window = (g[:, None] * g[None, :]).expand(3, 1, 11, 11)
    blur = lambda x: torch.nn.functional.conv2d(x, window, groups=3)
    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b, cov = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2, blur(a * b) - mu_a * mu_b
    c1, c2 = 2.55**2, 7.65**2
    truth = (((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))).mean().item()
    assert ssim(a, b) == pytest.approx(truth, abs=1e-12) and 0 < truth < 0.99


def windows(h: int, w: int) -> torch.Tensor:
    """A facade: dark 6×8 windows with a lit frame on a wall, every 12 rows and 16 columns."""
    y, x = torch.arange(h).view(-1, 1), torch.arange(w).view(1, -1)
    wall = torch.tensor([0.75, 0.6, 0.45]).view(3, 1, 1)
    window = torch.tensor([0.15, 0.2, 0.3]).view(3, 1, 1)
    inside = ((y % 12 >= 3) & (y % 12 < 9) & (x % 16 >= 4) & (x % 16 < 12)).float()
    return (wall * (1 - inside) + window * inside)[None]


def test_copy_restores_structure_repeated_elsewhere_at_full_resolution():
    """A scratch across a facade four times the working size: the coarse-to-fine copy puts
    the windows back from their intact copies (all levels searched, or the top one voted
    with the field upsampled from below); without it the hole holds the network's upsampled guess."""
    h, w = 96, 192
    truth = windows(h, w)
    hole = box_hole(h, w, 40, 45, 20, 170)
    seen = truth * (1 - hole)
    errors = {}
    for name, over in {"copy": {"copy": True}, "copy, top level voted only": {"copy": True, "copy_search_size": 100},
                       "no copy": {"copy": False}}.items():
        torch.manual_seed(0)
        with torch.no_grad():
            out = tiny(work_size=48, work_pixels=0, detail=False, **over)(image=seen, mask=hole)
        known = ~hole.bool().expand_as(out)
        assert torch.equal(out[known], truth[known])
        errors[name] = (out - truth).abs()[~known].mean().item()
    assert errors["copy"] < 0.02 and errors["copy, top level voted only"] < 0.04, errors
    assert errors["no copy"] > 0.05, errors


def test_a_narrow_hole_above_the_working_size_is_copied_from_the_structure_beside_it():
    """A 4-px scratch across a facade four times the working size is filled at the native
    size, then copied coarse to fine: the windows come back from their intact copies, where
    the (untrained) network alone leaves a wrong guess. At the working size the copy does
    not run: the output is the network's, bit for bit."""
    h, w = 96, 192
    truth = windows(h, w)
    hole = box_hole(h, w, 40, 44, 20, 170)
    seen = truth * (1 - hole)
    errors = {}
    for name, over in {"copy": {}, "no copy": {"copy_narrow": False}}.items():
        with torch.no_grad():
            out = tiny(work_size=48, work_pixels=1 << 20, detail=False, **over)(image=seen, mask=hole)
        known = ~hole.bool().expand_as(out)
        assert torch.equal(out[known], truth[known])
        errors[name] = (out - truth).abs()[~known].mean().item()
    assert errors["copy"] < 0.02 and errors["no copy"] > 0.05, errors
    with torch.no_grad():
        outs = [tiny(work_size=192, detail=False, copy_narrow=on)(image=seen, mask=hole) for on in (True, False)]
        assert torch.equal(*outs)
        # Above copy_pixels (here one pixel less than the photo) it does not run either.
        outs = [tiny(work_size=48, work_pixels=1 << 20, detail=False, copy_pixels=h * w - 1, copy_narrow=on)(
            image=seen, mask=hole) for on in (True, False)]
    assert torch.equal(*outs)


@pytest.mark.parametrize("rows, start", [(8, (64, 96)), (16, (32, 48)), (32, (32, 48)), (4, (128, 192))])
def test_the_copy_of_a_narrow_hole_starts_where_its_half_width_is_one_to_two_start_radii(rows, start):
    """Halved while the half-width stays ≥ copy_start_radius (2 px) and the short side ≥ 32:
    an 8-row scratch (half-width 4) starts at half size, 16 rows (8) at a quarter, 32 rows
    stop at the short side's 32 px, and a 4-row one (2 px) at full size."""
    hole = box_hole(128, 192, 50, 50 + rows, 10, 180)
    assert tiny().copy_start(hole) == start


def test_the_copy_keeps_the_fill_where_nothing_known_matches():
    """A scratch across a patch of noise, unique in the photo: no known patch rebuilds the
    noise beside the hole, so the copy is not trusted there and the fill (here the truth)
    stays; trusted everywhere, the copy replaces it with something else. Votes of known
    patches that match themselves would make the copy look perfect beside the hole."""
    h, w = 96, 192
    truth = (0.3 + 0.4 * torch.arange(w) / w).expand(h, w).clone()
    truth[34:51, 92:109] = torch.rand(17, 17, generator=torch.Generator().manual_seed(0))
    truth = truth.expand(3, h, w)[None].clone()
    hole = box_hole(h, w, 40, 44, 20, 170)
    noise = torch.zeros_like(hole, dtype=torch.bool)
    noise[..., 40:44, 92:109] = True
    errors = {}
    for name, trust in {"trusted as measured": 0.05, "trusted everywhere": 1e6}.items():
        model = tiny(detail=False, copy_trust=trust)
        with torch.no_grad():
            out = model.copy_structure(truth * (1 - hole), hole, truth, start=model.copy_start(hole))
        errors[name] = (out - truth).abs()[noise.expand_as(out)].mean().item()
    assert errors["trusted as measured"] < 0.01 and errors["trusted everywhere"] > 0.1, errors


def test_the_copy_is_the_same_in_either_memory_layout():
    """A scratch across the whole width of a noisy facade, in channels-last tensors (as the engine may
    hand them over) and in contiguous ones: the same copy, and its inputs untouched. (Votes
    written through a view of the estimate once overwrote the network's fill, the fallback.)"""
    h, w = 96, 192
    truth = windows(h, w) + 0.1 * torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(0))
    hole = box_hole(h, w, 40, 44, 0, w)
    fill = torch.full_like(truth, 0.5)
    model = tiny(detail=False)
    outs = []
    for layout in (torch.contiguous_format, torch.channels_last):
        seen, mask, guess = (x.contiguous(memory_format=layout) for x in (truth * (1 - hole), hole, fill))
        before = [x.clone() for x in (seen, mask, guess)]
        with torch.no_grad():
            outs.append(model.copy_structure(seen, mask, guess, generator=torch.Generator().manual_seed(0),
                                             start=model.copy_start(mask)))
        assert all(torch.equal(x, y) for x, y in zip((seen, mask, guess), before))
    assert torch.allclose(*outs, atol=1e-6), (outs[0] - outs[1]).abs().max()
