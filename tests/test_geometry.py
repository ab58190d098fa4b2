"""Property tests of the geometry: images, maps and boxes stay aligned under every fit.

The scene in most tests is a red rectangle on black, its mask, and its box, at a random
source size, store size and fit mode. Tolerances are exact consequences of the resampling
(area averaging when shrinking, bilinear otherwise, a binary map thresholded at one half):
a map pixel is set only when its centre lies within half an output pixel of the
rectangle, and set for sure when its centre lies half a source pixel (or half an output
pixel, whichever is more) inside it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from satdata.build import transform
from satdata.geometry import (
    FIT_MODES,
    Fit,
    apply_boxes,
    apply_image,
    apply_map,
    keep_boxes,
    plan_fit,
    rasterize_boxes,
)
from satdata.sources import BadSamples, Decoded, MapSpec, Record, Source, SourceOptions

EPS = 1e-6
SETTINGS = settings(max_examples=150, deadline=None)

src_side = st.integers(2, 90)
out_side = st.integers(2, 40)


@st.composite
def scenes(draw: st.DrawFn) -> tuple[tuple[int, int], tuple[int, int], str, tuple[int, int, int, int]]:
    h, w = draw(src_side), draw(src_side)
    oh, ow = draw(out_side), draw(out_side)
    mode = draw(st.sampled_from(FIT_MODES))
    x1 = draw(st.integers(0, w - 1))
    x2 = draw(st.integers(x1 + 1, w))
    y1 = draw(st.integers(0, h - 1))
    y2 = draw(st.integers(y1 + 1, h))
    return (h, w), (oh, ow), mode, (x1, y1, x2, y2)


def scene_arrays(hw: tuple[int, int], rect: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    x1, y1, x2, y2 = rect
    img = np.zeros(hw + (3,), dtype=np.uint8)
    img[y1:y2, x1:x2] = (255, 0, 0)
    mask = np.zeros(hw, dtype=np.uint8)
    mask[y1:y2, x1:x2] = 1
    return img, mask


def out_box(fit: Fit, rect: tuple[int, int, int, int]) -> tuple[float, float, float, float]:
    """The rectangle in the output frame, not clipped."""
    x1, y1, x2, y2 = rect
    return x1 * fit.sx + fit.dx, y1 * fit.sy + fit.dy, x2 * fit.sx + fit.dx, y2 * fit.sy + fit.dy


def centres(hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    cy, cx = np.mgrid[0:hw[0], 0:hw[1]]
    return cy + 0.5, cx + 0.5


def core_margins(fit: Fit) -> tuple[float, float]:
    """How far inside the rectangle (output px, x and y) a pixel centre is surely object."""
    return 0.5 * max(1.0, fit.sx) + EPS, 0.5 * max(1.0, fit.sy) + EPS


def dilate(m: np.ndarray) -> np.ndarray:
    p = np.pad(m.astype(bool), 1)
    out = np.zeros_like(p)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            out |= np.roll(np.roll(p, dy, 0), dx, 1)
    return out[1:-1, 1:-1]


@SETTINGS
@given(scenes())
def test_plan_fit_shapes(scene: tuple) -> None:
    (h, w), (oh, ow), mode, _ = scene
    fit = plan_fit((h, w), (oh, ow), mode)
    rh, rw = fit.resized_hw
    assert rh >= 1 and rw >= 1 and fit.out_hw == (oh, ow)
    if mode == "stretch":
        assert (rh, rw, fit.dx, fit.dy) == (oh, ow, 0, 0)
    elif mode == "crop":  # covers the output; the window lies inside the resized image
        assert rh >= oh and rw >= ow and fit.dx <= 0 and fit.dy <= 0
        assert -fit.dx + ow <= rw and -fit.dy + oh <= rh
    else:  # pad: fits inside, centred
        assert rh <= oh and rw <= ow and fit.dx >= 0 and fit.dy >= 0
        assert fit.dx + rw <= ow and fit.dy + rh <= oh
        assert abs((ow - rw) - 2 * fit.dx) <= 1 and abs((oh - rh) - 2 * fit.dy) <= 1
    if mode != "stretch":  # one scale for both sides, up to a pixel of rounding
        s = (max if mode == "crop" else min)(oh / h, ow / w)
        assert abs(rh - h * s) <= 1 + EPS and abs(rw - w * s) <= 1 + EPS


@SETTINGS
@given(scenes())
def test_image_and_map_stay_aligned(scene: tuple) -> None:
    hw, out_hw, mode, rect = scene
    fit = plan_fit(hw, out_hw, mode)
    img, mask = scene_arrays(hw, rect)
    out_img = apply_image(img, fit)
    out_map = apply_map(mask, fit, "binary")
    assert out_img.shape == out_hw + (3,) and out_img.dtype == np.uint8
    assert out_map.shape == out_hw and out_map.dtype == np.uint8
    assert set(np.unique(out_map)) <= {0, 1}
    assert not out_img[..., 1:].any(), "the colour bled into other channels"
    # wherever the image is clearly red or clearly black, the map says object / background
    red = out_img[..., 0].astype(np.float64)
    sure = np.abs(red - 127.5) > 2
    assert np.array_equal(out_map[sure] == 1, red[sure] > 127.5)


@SETTINGS
@given(scenes())
def test_map_lands_where_the_rectangle_goes(scene: tuple) -> None:
    hw, out_hw, mode, rect = scene
    fit = plan_fit(hw, out_hw, mode)
    _, mask = scene_arrays(hw, rect)
    out_map = apply_map(mask, fit, "binary").astype(bool)
    x1, y1, x2, y2 = out_box(fit, rect)
    cy, cx = centres(out_hw)
    near = (cx >= x1 - 0.5 - EPS) & (cx <= x2 + 0.5 + EPS) & (cy >= y1 - 0.5 - EPS) & (cy <= y2 + 0.5 + EPS)
    assert not (out_map & ~near).any(), "object pixels away from the rectangle"
    mx, my = core_margins(fit)
    core = (cx >= x1 + mx) & (cx <= x2 - mx) & (cy >= y1 + my) & (cy <= y2 - my)
    assert not (core & ~out_map).any(), "background inside the rectangle"


@SETTINGS
@given(scenes())
def test_boxes_match_their_rasterisation_and_the_map(scene: tuple) -> None:
    hw, out_hw, mode, rect = scene
    fit = plan_fit(hw, out_hw, mode)
    oh, ow = out_hw
    boxes = apply_boxes(np.array([rect], dtype=np.float64), fit)
    assert boxes.shape == (1, 4)
    assert (boxes[:, [0, 2]] >= 0).all() and (boxes[:, [0, 2]] <= ow).all()
    assert (boxes[:, [1, 3]] >= 0).all() and (boxes[:, [1, 3]] <= oh).all()
    ux1, uy1, ux2, uy2 = out_box(fit, rect)
    keep = keep_boxes(boxes)
    if not keep[0]:
        assert mode == "crop" and (ux2 <= 0 or uy2 <= 0 or ux1 >= ow or uy1 >= oh), "a visible box was dropped"
        return
    x1, y1, x2, y2 = boxes[0]
    drawn = rasterize_boxes(boxes, out_hw).astype(bool)
    assert drawn.shape == out_hw and drawn.any(), "a kept box vanished"
    cy, cx = centres(out_hw)
    for c, lo, hi, axis in ((cx, x1, x2, 1), (cy, y1, y2, 0)):
        inside_1d = (c > lo + EPS) & (c < hi - EPS)
        outside_1d = (c < lo - EPS) | (c > hi + EPS)
        if inside_1d.any():  # a pixel is in when its centre is
            assert not (drawn & outside_1d).any()
        else:  # a box between pixel centres marks the one line it overlaps most
            lines = np.flatnonzero(drawn.any(axis=1 - axis))
            assert len(lines) == 1 and abs(lines[0] + 0.5 - (lo + hi) / 2) <= 0.5 + EPS
    inside = (cx > x1 + EPS) & (cx < x2 - EPS) & (cy > y1 + EPS) & (cy < y2 - EPS)
    assert not (inside & ~drawn).any()
    # the mask of the same rectangle, resized as a map, lies on the drawn box (one pixel of slack)
    _, mask = scene_arrays(hw, rect)
    out_map = apply_map(mask, fit, "binary").astype(bool)
    assert not (out_map & ~dilate(drawn)).any()


@SETTINGS
@given(src_side, src_side, out_side, out_side, st.sampled_from(FIT_MODES))
def test_pad_border_is_background_and_nothing_else_is_lost(h: int, w: int, oh: int, ow: int, mode: str) -> None:
    fit = plan_fit((h, w), (oh, ow), mode)
    ones = np.ones((h, w), dtype=np.uint8)
    full = {
        "binary": (ones, 1),
        "unit": (np.full((h, w), 255, np.uint8), 255),
        "signed+": (np.full((h, w), 127, np.int8), 127),
        "signed-": (np.full((h, w, 2), -127, np.int8), -127),
    }
    region = np.zeros((oh, ow), dtype=bool)
    rh, rw = fit.resized_hw
    if mode == "pad":
        region[fit.dy:fit.dy + rh, fit.dx:fit.dx + rw] = True
    else:
        region[:] = True
    img = apply_image(np.full((h, w, 3), 255, np.uint8), fit)
    assert (img[region] == 255).all() and (img[~region] == 0).all()
    for name, (m, v) in full.items():
        enc = name.rstrip("+-")
        out = apply_map(m, fit, enc)
        assert out.dtype == m.dtype and out.shape[:2] == (oh, ow) and out.shape[2:] == m.shape[2:], name
        assert (out[region] == v).all(), f"{name}: the map lost pixels inside the image"
        assert (out[~region] == 0).all(), f"{name}: the pad border is not 0"


@SETTINGS
@given(src_side, src_side, out_side, out_side, st.sampled_from(FIT_MODES), st.integers(0, 2**31 - 1))
def test_quantised_maps_keep_their_range(h: int, w: int, oh: int, ow: int, mode: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    fit = plan_fit((h, w), (oh, ow), mode)
    unit = rng.integers(0, 256, (h, w)).astype(np.uint8)
    signed = rng.integers(-127, 128, (h, w, 3)).astype(np.int8)
    u = apply_map(unit, fit, "unit")
    s = apply_map(signed, fit, "signed")
    assert u.dtype == np.uint8 and u.shape == (oh, ow)
    assert s.dtype == np.int8 and s.shape == (oh, ow, 3) and s.min() >= -127
    # resampling averages: no value outside the source's own range
    assert unit.min() <= u.min() or mode == "pad"
    assert u.max() <= unit.max() and s.max() <= signed.max()


@SETTINGS
@given(st.lists(st.tuples(*[st.floats(-50, 100, allow_nan=False)] * 4), max_size=6), out_side, out_side)
def test_rasterize_never_draws_outside_the_frame(raw: list, oh: int, ow: int) -> None:
    """The builder's path: boxes go through apply_boxes (clipped), keep_boxes, rasterize."""
    boxes = np.array(raw, dtype=np.float64).reshape(-1, 4)
    fit = plan_fit((100, 100), (oh, ow), "stretch")
    clipped = apply_boxes(boxes, fit)
    keep = keep_boxes(clipped)
    m = rasterize_boxes(clipped[keep], (oh, ow))
    assert m.shape == (oh, ow) and set(np.unique(m)) <= {0, 1}
    assert bool(m.any()) == bool(keep.any())


@SETTINGS
@given(out_side, out_side, st.floats(1, 30), st.floats(0.1, 20))
def test_rasterize_ignores_boxes_outside_the_frame(oh: int, ow: int, gap: float, size: float) -> None:
    """rasterize_boxes is public: boxes that were not clipped first must not wrap around."""
    outside = np.array([
        [-gap - size, -gap - size, -gap, -gap],  # above and left
        [ow + gap, 0, ow + gap + size, oh],  # right
        [0, oh + gap, ow, oh + gap + size],  # below
        [-gap - size, 0, -gap, oh],  # left
    ], dtype=np.float64)
    for box in outside:
        assert not rasterize_boxes(box[None], (oh, ow)).any(), f"{box} drew inside the {ow}x{oh} frame"


class _RectSource(Source):
    """A stub source: one red rectangle with its mask and its box (the builder's view)."""

    name = "rect-test"
    maps = {"mask": MapSpec(kind="mask"), "box": MapSpec(kind="boxes", from_boxes=True)}

    def available_splits(self) -> list[str]:
        return ["train"]

    def records(self, split: str) -> list[Record]:
        return []  # the test hands records to transform() directly

    def decode(self, record: Record) -> Decoded:
        hw, rect = record.data
        img, mask = scene_arrays(hw, rect)
        return Decoded(image=img, masks={"mask": mask}, boxes=np.array([[3, *rect]], dtype=np.float64))


@SETTINGS
@given(scenes())
def test_builder_gives_image_mask_and_box_one_geometry(scene: tuple) -> None:
    hw, out_hw, mode, rect = scene
    src = _RectSource(Path("."), SourceOptions(), BadSamples(False))
    img, maps, boxes = transform(src, Record(id="r", label=0, data=(hw, rect)), out_hw, mode)
    fit = plan_fit(hw, out_hw, mode)
    ref_img, ref_mask = scene_arrays(hw, rect)
    assert np.array_equal(img, apply_image(ref_img, fit))
    assert np.array_equal(maps["mask"], apply_map(ref_mask, fit, "binary"))
    expect_boxes = apply_boxes(np.array([rect], dtype=np.float64), fit)
    expect_boxes = expect_boxes[keep_boxes(expect_boxes)]
    assert boxes.shape == (len(expect_boxes), 5)
    assert (boxes[:, 0] == 3).all()
    assert np.allclose(boxes[:, 1:], expect_boxes)
    assert np.array_equal(maps["box"], rasterize_boxes(expect_boxes, out_hw))
