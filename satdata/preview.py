"""Contact sheets: look at a store before training on it.

``satdata preview STORE`` writes one PNG: a grid of randomly picked samples of one split,
each image upscaled (nearest neighbour, so pixels stay pixels) with one saliency map
overlaid, the sample's class name(s) and index under it, and a title line naming the
dataset, the split, the map and how the overlay is coloured. A wrong mask polarity, a box
shifted by the resize or a label off by one is visible at a glance.

The overlay follows the map's encoding, through the same ``S = scale * q + offset`` the
trainer uses (multi-channel maps are averaged over channels):

    binary  object (S = +1) tinted green with a yellow outline; background untouched
    unit    a heat colour (matplotlib's "jet") whose opacity grows with S in [0, 1]
    signed  red where S > 0, blue where S < 0, opacity growing with |S|

A store without maps still previews (images and labels only).

A map that records the class each sample's map was computed for (teacher maps added by
``satdata saliency``; ``MapInfo.targets``) adds a caption line per tile: ``teacher: <class>``
(the teacher's predicted class; ``map for: <class>`` for maps made with ``--target
label``). Where the teacher's class is not among the sample's labels the line reads
``teacher: <class> (wrong)`` in red and the tile gets a red frame, so a teacher that is
wrong on half the samples is visible at once. Maps without targets preview as before.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from satdata.errors import SatkitError
from satdata.store import TARGET_UNKNOWN, MapInfo, Store, decode_map, open_store

TARGET_TILE_PX = 128  # the default scale brings a tile's longer side near this
MAX_SCALE = 16
MAX_COLUMNS = 8
MIN_CELL_W = 96  # captions need room even when tiles are small
PAD = 8
BACKGROUND = (248, 248, 248)
TEXT = (20, 20, 20)
DIM_TEXT = (110, 110, 110)
OBJECT_TINT = np.array([0, 220, 60], dtype=np.float32)
OUTLINE = np.array([255, 235, 0], dtype=np.float32)
POSITIVE = np.array([230, 30, 30], dtype=np.float32)
NEGATIVE = np.array([30, 80, 255], dtype=np.float32)
TINT_ALPHA = 0.4
HEAT_ALPHA = 0.65
WRONG = (210, 20, 20)  # a teacher's class that is not the label: caption and tile frame
RIGHT = (20, 130, 40)
FRAME_PX = 2

LEGENDS = {
    "binary": "green = object (S=+1), yellow = its outline, untouched = background (S=-1)",
    "unit": "heat colour, more opaque where S (0..1) is higher",
    "signed": "red = S>0, blue = S<0, more opaque where |S| is larger",
}


@dataclass(frozen=True)
class Tile:
    """What one tile of a sheet says under its image."""

    index: int  # the sample's index in the split
    label: str  # its class name(s)
    teacher: str | None = None  # "teacher: 5", "teacher: 5 (wrong)", "map for: 3"; None: no targets
    wrong: bool = False  # the teacher's class is not among the sample's labels


@dataclass
class Sheet:
    """A composed contact sheet and what each tile says (``make_sheet``)."""

    image: Any  # PIL.Image.Image
    tiles: list[Tile]
    title: str
    subtitle: str

    @property
    def wrong(self) -> int:
        """How many tiles show a teacher's class that is not the label."""
        return sum(t.wrong for t in self.tiles)

    @property
    def with_teacher(self) -> int:
        """How many tiles show the teacher's predicted class (not "?", not a --target label map's)."""
        return sum(t.teacher is not None and t.teacher.startswith("teacher: ") and t.teacher != "teacher: ?"
                   for t in self.tiles)


def contact_sheet(store: Store | str | Path, out: str | Path, *, split: str | None = None,
                  map_name: str | None = None, n: int = 32, seed: int = 0,
                  scale: int | None = None) -> Path:
    """Write a PNG grid of ``n`` random samples of ``split`` with ``map_name`` overlaid.

    Defaults: the store's first split and first map (images only when it has no maps), a
    scale that makes tiles about 128 px. The same seed picks the same samples. Raises
    StoreError naming the store and listing what exists for an unknown split or map.
    See ``make_sheet`` for the sheet and its captions.

    >>> contact_sheet(open_store("digits.zarr"), "sheet.png", map_name="ink")  # doctest: +SKIP
    PosixPath('sheet.png')
    """
    check_sheet_out(out)
    sheet = make_sheet(store, split=split, map_name=map_name, n=n, seed=seed, scale=scale)
    return save_sheet(sheet, out)


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def check_sheet_out(out: str | Path) -> None:
    """Refuse an ``out`` a sheet must not replace: a link (it would redirect the write), a
    directory or special file, or a file that is neither empty nor a PNG (an earlier sheet)."""
    out = Path(out)
    if out.is_symlink() or (out.exists() and not out.is_file()):
        raise SatkitError(f"--out: {out} exists and is not a regular file; refusing to write the sheet there")
    if out.is_file() and out.stat().st_size:
        with out.open("rb") as f:
            if f.read(len(PNG_MAGIC)) != PNG_MAGIC:
                raise SatkitError(f"--out: {out} exists and is not a PNG image; refusing to replace it (remove it, "
                                  "or choose another --out)")


def save_sheet(sheet: Sheet, out: str | Path) -> Path:
    """Write ``sheet`` as the PNG ``out`` (checked by ``check_sheet_out``): aside, then renamed
    into place, so a killed preview leaves no torn file."""
    from satdata.atomic import atomic_write

    out = Path(out)
    check_sheet_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda f: sheet.image.save(f, format="PNG"))
    return out


def teacher_captions(targets: np.ndarray, labels: np.ndarray, classes: list[str], label_kind: str,
                     minfo: MapInfo) -> list[tuple[str, bool]]:
    """(caption, wrong) per sample for a map's recorded target classes.

    The teacher's class names come from the map's provenance (``teacher.classes``) when
    it records them, else from the store. A class is "wrong" when it is not among the
    sample's labels, judged only when the teacher's classes are the store's (otherwise a
    class index says nothing about the label). Maps made with ``--target label`` explain
    the label, so they read ``map for: <class>`` and are never wrong; -1 reads ``?``.
    """
    prov = minfo.provenance or {}
    names = (prov.get("teacher") or {}).get("classes") or list(classes)
    names = [str(c) for c in names]
    same_classes = names == list(classes)
    predicted = prov.get("target", "predicted") == "predicted"
    head = "teacher" if predicted else "map for"
    out = []
    for t, lab in zip(targets, labels):
        t = int(t)
        if t == TARGET_UNKNOWN or t < 0:
            out.append((f"{head}: ?", False))
            continue
        name = names[t] if t < len(names) else f"class {t}"
        if label_kind == "single":
            truth = {int(lab)}
        else:
            truth = {int(i) for i in np.flatnonzero(np.asarray(lab))}
        wrong = predicted and same_classes and t not in truth
        out.append((f"{head}: {name}" + (" (wrong)" if wrong else ""), wrong))
    return out


def make_sheet(store: Store | str | Path, *, split: str | None = None, map_name: str | None = None,
               n: int = 32, seed: int = 0, scale: int | None = None) -> Sheet:
    """The contact sheet ``contact_sheet`` writes, with each tile's captions.

    Tiles are ``n`` samples of ``split`` picked at random with ``seed`` and shown in
    index order. When the map records target classes (``MapInfo.targets``), each tile
    also says the teacher's class (``teacher_captions``); the subtitle counts the tiles
    where it is not the label.
    """
    if not isinstance(store, Store):
        store = open_store(store)
    if n < 1:
        raise SatkitError(f"-n: must be at least 1, got {n}")
    if seed < 0:  # numpy's generator takes no negative seed
        raise SatkitError(f"--seed: must be >= 0, got {seed}")
    if scale is not None and not 1 <= scale <= MAX_SCALE:
        raise SatkitError(f"--scale: must be between 1 and {MAX_SCALE}, got {scale}")
    info = store.info
    split = split if split is not None else next(iter(info.splits))
    images_arr = store.array(split, "images")  # raises for an unknown split, listing the splits
    if map_name is None and info.maps:
        map_name = next(iter(info.maps))
    minfo: MapInfo | None = None
    map_arr = None
    if map_name is not None:
        map_arr = store.array(split, "saliency", map_name)  # raises listing the maps
        minfo = info.maps[map_name]

    total = info.splits[split]
    if total == 0:
        raise SatkitError(f"--split: {store.path} has no samples in split {split!r}; nothing to show "
                          f"(splits: {', '.join(f'{s} {c:,}' for s, c in info.splits.items())})")
    k = min(n, total)
    idx = np.sort(np.random.default_rng(seed).choice(total, size=k, replace=False))
    images = np.asarray(images_arr.oindex[idx])
    labels = np.asarray(store.array(split, "labels").oindex[idx])
    maps = np.asarray(map_arr.oindex[idx]) if map_arr is not None else None
    teacher: list[tuple[str, bool]] | None = None
    if minfo is not None and minfo.targets:
        targets = np.asarray(store.array(split, "map_targets", map_name).oindex[idx])
        teacher = teacher_captions(targets, labels, info.classes, info.label_kind, minfo)

    h, w = info.image_size
    s = scale if scale is not None else max(1, min(MAX_SCALE, round(TARGET_TILE_PX / max(h, w))))
    tiles = []
    for j in range(k):
        tile = _upscale(images[j], s)
        if maps is not None and minfo is not None:
            tile = overlay(tile, _upscale(maps[j], s), minfo)
        tiles.append(tile)
    records = [Tile(index=int(idx[j]), label=_class_text(labels[j], info.classes, info.label_kind),
                    teacher=teacher[j][0] if teacher else None, wrong=teacher[j][1] if teacher else False)
               for j in range(k)]
    title = (f"{info.dataset}  |  split {split} ({total:,} samples)  |  "
             + (f"map {map_name} ({minfo.kind}, {minfo.encoding})" if minfo is not None else "no map"))
    subtitle = (f"{k} random samples (seed {seed}) in index order, {h}x{w} shown at x{s}"
                + (f"  |  {LEGENDS[minfo.encoding]}" if minfo is not None else ""))
    if teacher is not None:
        wrong = sum(t.wrong for t in records)
        subtitle += f"  |  red = the teacher's class is not the label ({wrong} of {k})"
    image = _compose(tiles, records, title, subtitle)
    return Sheet(image=image, tiles=records, title=title, subtitle=subtitle)


def overlay(tile: np.ndarray, q: np.ndarray, minfo: MapInfo) -> np.ndarray:
    """Blend a map (stored values q, already upscaled like the tile) onto an RGB tile."""
    sal = decode_map(q, minfo)
    if sal.ndim == 3:  # (h, w, C): one value per channel -> their mean
        sal = sal.mean(axis=2)
    base = tile.astype(np.float32)
    if minfo.encoding == "binary":
        obj = sal > 0
        alpha = np.where(obj, TINT_ALPHA, 0.0)[..., None]
        outimg = base * (1 - alpha) + OBJECT_TINT * alpha
        edge = obj & ~_erode(obj)
        outimg[edge] = OUTLINE
    elif minfo.encoding == "unit":
        from matplotlib import colormaps

        v = np.clip(sal, 0.0, 1.0)
        colour = colormaps["jet"](v)[..., :3].astype(np.float32) * 255
        alpha = (HEAT_ALPHA * v)[..., None]
        outimg = base * (1 - alpha) + colour * alpha
    else:  # signed
        v = np.clip(sal, -1.0, 1.0)
        colour = np.where((v >= 0)[..., None], POSITIVE, NEGATIVE)
        alpha = (HEAT_ALPHA * np.abs(v))[..., None]
        outimg = base * (1 - alpha) + colour * alpha
    return np.clip(np.rint(outimg), 0, 255).astype(np.uint8)


def _upscale(a: np.ndarray, s: int) -> np.ndarray:
    return a if s == 1 else np.repeat(np.repeat(a, s, axis=0), s, axis=1)


def _erode(m: np.ndarray) -> np.ndarray:
    """4-neighbour erosion; outside the tile counts as background, so an object that reaches
    the border is outlined along it (a box spanning the image shows all four sides)."""
    p = np.pad(m, 1, mode="constant", constant_values=False)
    return p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]


def _class_text(label: Any, classes: list[str], kind: str) -> str:
    if kind == "single":
        i = int(label)
        return classes[i] if 0 <= i < len(classes) else f"label {i}?"
    names = [classes[i] for i in np.flatnonzero(np.asarray(label)) if i < len(classes)]
    return ", ".join(names) if names else "(no class)"


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # a scalable font (Pillow >= 10.1 with FreeType)
    except (TypeError, OSError):
        return ImageFont.load_default()


def _fit_text(draw: Any, text: str, font: Any, width: float) -> str:
    """Shorten text with an ellipsis until it fits the width."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def _compose(tiles: list[np.ndarray], records: list[Tile], title: str, subtitle: str) -> Any:
    from PIL import Image, ImageDraw

    th, tw = tiles[0].shape[:2]
    cell_w = max(tw, MIN_CELL_W)
    font, small, title_font = _font(13), _font(11), _font(15)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line = int(math.ceil(probe.textbbox((0, 0), "Ag", font=font)[3])) + 3
    line_small = int(math.ceil(probe.textbbox((0, 0), "Ag", font=small)[3])) + 3
    title_h = int(math.ceil(probe.textbbox((0, 0), "Ag", font=title_font)[3])) + 4
    cols = min(len(tiles), MAX_COLUMNS)
    rows = math.ceil(len(tiles) / cols)
    has_teacher = any(r.teacher is not None for r in records)
    cell_h = th + 4 + line + line_small + (line if has_teacher else 0)
    grid_w = cols * cell_w + (cols - 1) * PAD
    text_w = max(probe.textlength(title, font=title_font), probe.textlength(subtitle, font=small))
    width = int(max(grid_w, min(text_w, 3 * grid_w))) + 2 * PAD
    head = PAD + title_h + line_small + PAD
    height = head + rows * cell_h + (rows - 1) * PAD + PAD
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    draw.text((PAD, PAD), _fit_text(draw, title, title_font, width - 2 * PAD), fill=TEXT, font=title_font)
    draw.text((PAD, PAD + title_h), _fit_text(draw, subtitle, small, width - 2 * PAD), fill=DIM_TEXT, font=small)
    for j, tile in enumerate(tiles):
        r, c = divmod(j, cols)
        x0 = PAD + c * (cell_w + PAD)
        y0 = head + r * (cell_h + PAD)
        rec = records[j]
        tx = x0 + (cell_w - tw) // 2
        sheet.paste(Image.fromarray(tile), (tx, y0))
        if rec.wrong:  # a frame drawn over the tile's own border pixels, inside the cell
            draw.rectangle((tx, y0, tx + tw - 1, y0 + th - 1), outline=WRONG, width=FRAME_PX)
        y = y0 + th + 4
        draw.text((x0, y), _fit_text(draw, rec.label, font, cell_w), fill=TEXT, font=font)
        if rec.teacher is not None:
            y += line
            draw.text((x0, y), _fit_text(draw, rec.teacher, font, cell_w),
                      fill=WRONG if rec.wrong else RIGHT, font=font)
        draw.text((x0, y + line), f"#{rec.index}", fill=DIM_TEXT, font=small)
    return sheet


__all__ = ["Sheet", "Tile", "contact_sheet", "make_sheet", "overlay", "teacher_captions"]
