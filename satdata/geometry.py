"""Image, map and box geometry: fit a source image into the store's size, and draw boxes.

Every map goes through exactly the same resize and crop/pad as its image: a ``Fit`` is
planned once from the source size and then applied to the image, to each map, and to the
boxes (continuous pixel coordinates, x to the right, y down, the image spanning
[0, W) x [0, H)).

Modes:
  stretch  resize to H x W, ignoring aspect ratio: the whole image and every box survive
  crop     scale so the image covers H x W, then cut the centre (boxes are clipped)
  pad      scale so the image fits inside H x W, then pad the border with zeros
           (background in every map)
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

FIT_MODES = ("stretch", "crop", "pad")


@dataclass(frozen=True)
class Fit:
    """A planned geometry: resize (src_w, src_h) -> (rw, rh), then shift by (dx, dy).

    A point (x, y) of the source lands at (x * sx + dx, y * sy + dy) in the output.
    """

    src_hw: tuple[int, int]
    out_hw: tuple[int, int]
    resized_hw: tuple[int, int]
    dx: int
    dy: int

    @property
    def sx(self) -> float:
        return self.resized_hw[1] / self.src_hw[1]

    @property
    def sy(self) -> float:
        return self.resized_hw[0] / self.src_hw[0]


def plan_fit(src_hw: tuple[int, int], out_hw: tuple[int, int], mode: str) -> Fit:
    """Plan how a src_hw image becomes out_hw under the fit mode."""
    h, w = int(src_hw[0]), int(src_hw[1])
    oh, ow = int(out_hw[0]), int(out_hw[1])
    if h <= 0 or w <= 0:
        raise ValueError(f"empty source image {src_hw}")
    if mode == "stretch":
        return Fit((h, w), (oh, ow), (oh, ow), 0, 0)
    if mode == "crop":
        s = max(oh / h, ow / w)
        rh, rw = max(oh, round(h * s)), max(ow, round(w * s))
        return Fit((h, w), (oh, ow), (rh, rw), -((rw - ow) // 2), -((rh - oh) // 2))
    if mode == "pad":
        s = min(oh / h, ow / w)
        rh, rw = min(oh, max(1, round(h * s))), min(ow, max(1, round(w * s)))
        return Fit((h, w), (oh, ow), (rh, rw), (ow - rw) // 2, (oh - rh) // 2)
    raise ValueError(f"unknown fit mode {mode!r} (one of {', '.join(FIT_MODES)})")


def _place(resized: np.ndarray, fit: Fit) -> np.ndarray:
    oh, ow = fit.out_hw
    if fit.dx == 0 and fit.dy == 0 and resized.shape[:2] == (oh, ow):
        return resized
    out = np.zeros((oh, ow) + resized.shape[2:], dtype=resized.dtype)
    rh, rw = resized.shape[:2]
    # source window and destination window of the placement
    x0, y0 = max(0, -fit.dx), max(0, -fit.dy)
    X0, Y0 = max(0, fit.dx), max(0, fit.dy)
    cw, ch = min(rw - x0, ow - X0), min(rh - y0, oh - Y0)
    out[Y0:Y0 + ch, X0:X0 + cw] = resized[y0:y0 + ch, x0:x0 + cw]
    return out


def _resize(a: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    rh, rw = hw
    if a.shape[:2] == (rh, rw):
        return a
    shrinking = rh <= a.shape[0] and rw <= a.shape[1]
    interp = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    out = cv2.resize(a, (rw, rh), interpolation=interp)
    if a.ndim == 3 and out.ndim == 2:  # cv2 drops a trailing channel axis of size 1
        out = out[:, :, None]
    return out


def apply_image(img: np.ndarray, fit: Fit) -> np.ndarray:
    """Resize and place an (h, w, 3) uint8 image."""
    return _place(_resize(img, fit.resized_hw), fit)


def apply_map(m: np.ndarray, fit: Fit, encoding: str) -> np.ndarray:
    """Resize and place a map with exactly the image's geometry.

    A binary mask is area-averaged and thresholded at one half (a pixel is object when at
    least half of what it covers is); quantised maps are area-averaged and rounded.
    """
    if encoding == "binary":
        f = _resize(m.astype(np.float32), fit.resized_hw)
        return _place((f >= 0.5).astype(np.uint8), fit)
    dtype = m.dtype
    f = _resize(m.astype(np.float32), fit.resized_hw)
    lo, hi = (-127, 127) if dtype == np.int8 else (0, 255)
    return _place(np.clip(np.rint(f), lo, hi).astype(dtype), fit)


def apply_boxes(boxes: np.ndarray, fit: Fit) -> np.ndarray:
    """Map (k, 4) [x1, y1, x2, y2] boxes into the output frame, clipped to it.

    Boxes that end up with no area inside the output (cropped away) are dropped; the
    returned array has a boolean companion mask via ``keep_boxes``.
    """
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    out = np.empty_like(b)
    out[:, 0] = b[:, 0] * fit.sx + fit.dx
    out[:, 2] = b[:, 2] * fit.sx + fit.dx
    out[:, 1] = b[:, 1] * fit.sy + fit.dy
    out[:, 3] = b[:, 3] * fit.sy + fit.dy
    oh, ow = fit.out_hw
    out[:, [0, 2]] = np.clip(out[:, [0, 2]], 0, ow)
    out[:, [1, 3]] = np.clip(out[:, [1, 3]], 0, oh)
    return out


def keep_boxes(boxes: np.ndarray) -> np.ndarray:
    """Which output-frame boxes still have area."""
    b = np.asarray(boxes).reshape(-1, 4)
    return (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])


def rasterize_boxes(boxes: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Binary (H, W) mask, 1 inside any box: the union of the boxes.

    A pixel column j is inside [x1, x2) when its centre j + 0.5 is, i.e. columns
    round(x1) .. round(x2) - 1; a box with area that covers no pixel centre still marks
    the one pixel it overlaps most, so no object vanishes at a small store size.
    """
    h, w = hw
    m = np.zeros((h, w), dtype=np.uint8)
    for x1, y1, x2, y2 in np.asarray(boxes, dtype=np.float64).reshape(-1, 4):
        if not (x2 > x1 and y2 > y1) or x2 <= 0 or y2 <= 0 or x1 >= w or y1 >= h:
            continue  # no area, or wholly outside the frame
        x1, y1, x2, y2 = max(x1, 0.0), max(y1, 0.0), min(x2, float(w)), min(y2, float(h))
        c0, c1 = int(np.floor(x1 + 0.5)), int(np.floor(x2 + 0.5))
        r0, r1 = int(np.floor(y1 + 0.5)), int(np.floor(y2 + 0.5))
        if c1 <= c0:
            c0 = min(max(int(np.floor((x1 + x2) / 2)), 0), w - 1)
            c1 = c0 + 1
        if r1 <= r0:
            r0 = min(max(int(np.floor((y1 + y2) / 2)), 0), h - 1)
            r1 = r0 + 1
        m[max(0, r0):min(h, r1), max(0, c0):min(w, c1)] = 1
    return m


def to_rgb(img: np.ndarray) -> np.ndarray:
    """(h, w), (h, w, 1), (h, w, 3) or (h, w, 4) uint8 -> (h, w, 3) uint8."""
    if img.ndim == 2:
        return np.repeat(img[:, :, None], 3, axis=2)
    if img.shape[2] == 1:
        return np.repeat(img, 3, axis=2)
    if img.shape[2] == 4:
        return np.ascontiguousarray(img[:, :, :3])
    return img
