"""What every source provides, the registry of sources, and shared readers.

A source reads one dataset's real on-disk layout. It has two steps, so that decoding can
run in worker processes:

* ``records(split)`` parses the annotations (cheap, in the main process) and returns a
  list of picklable ``Record``s;
* ``decode(record)`` reads one image and its masks (in a worker) and returns a
  ``Decoded`` at the source's own resolution, with boxes in source pixel coordinates.

The builder then applies one geometry to the image, every mask and the boxes, and draws
box maps in the store's frame. A source never resizes.

Adding a source is adding one file with a class decorated by ``@register_source``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from contextlib import contextmanager
from typing import Any, ClassVar, Iterator, Sequence

import numpy as np

from satdata.errors import SatkitError, SourceError


@dataclass(frozen=True)
class SourceOptions:
    """Options a source may accept; each source lists the ones it understands."""

    label: str = "multi"  # VOC: "multi" (multi-hot over the classes) or "largest"
    drop_difficult: bool = False  # VOC: ignore objects marked difficult
    unmasked: str = "skip"  # Flowers-17: images without a mask: "skip" or "whole"
    year: str | None = None  # VOC: which VOC20xx under the root (default: the only/newest)

    def non_default(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if getattr(self, f.name) != f.default}


@dataclass(frozen=True)
class MapSpec:
    """A map a source produces: from its own masks, or drawn from its boxes."""

    kind: str  # "boxes", "mask", ...
    encoding: str = "binary"
    from_boxes: bool = False  # drawn by the builder from Decoded.boxes after geometry
    channels: int = 1  # 1: (h, w) maps; C: (h, w, C)
    provenance: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)  # e.g. of imported maps


@dataclass(frozen=True)
class Record:
    """One sample as listed from the annotations (picklable; decoded in a worker)."""

    id: str  # the source's id: a file name relative to the root
    label: int | tuple[int, ...]  # class index, or class indices for multi-label
    data: Any = None  # whatever decode needs (paths, boxes, annotation dicts)


@dataclass
class Decoded:
    """One decoded sample at the source's resolution."""

    image: np.ndarray  # (h, w, 3) uint8
    masks: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (h, w) 0/1 uint8
    boxes: np.ndarray | None = None  # (k, 5) float [class, x1, y1, x2, y2], source pixels


class BadSamples:
    """Collects bad samples under --skip-bad; otherwise the first one is an error."""

    def __init__(self, skip: bool) -> None:
        self.skip = skip
        self.items: list[tuple[str, str]] = []

    def __call__(self, path: str | Path, problem: str) -> None:
        if not self.skip:
            raise SourceError(path, problem)
        self.items.append((str(path), problem))


class Source:
    """Base class of the dataset readers."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    options: ClassVar[tuple[str, ...]] = ()  # SourceOptions fields this source reads
    label_kind: str = "single"  # "single" or "multi"
    maps: dict[str, MapSpec] = {}
    # Whether a horizontal flip keeps a sample's class: recorded in the store
    # (StoreInfo.hflip) so that training's default augmentation fits the data. True for
    # photographs of objects and scenes; a source of mirror-sensitive data says False.
    hflip: bool = True

    def __init__(self, root: Path, opts: SourceOptions, bad: BadSamples) -> None:
        self.root = Path(root)
        self.opts = opts
        self.bad = bad
        self.classes: list[str] = []
        # split -> counts worth recording (images left out, objects dropped, ...): the
        # builder writes them into the store's provenance and prints them.
        self.notes: dict[str, dict[str, Any]] = {}

    def available_splits(self) -> list[str]:
        raise NotImplementedError

    def records(self, split: str) -> list[Record]:
        raise NotImplementedError

    def decode(self, record: Record) -> Decoded:
        raise NotImplementedError

    @property
    def dataset(self) -> str:
        return self.name


_REGISTRY: dict[str, type[Source]] = {}


def register_source(cls: type[Source]) -> type[Source]:
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in _REGISTRY:
        raise ValueError(f"source {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def source_names() -> list[str]:
    return sorted(_REGISTRY)


def get_source_class(name: str) -> type[Source]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise SatkitError(
            f"--source: unknown source {name!r} (known: {', '.join(source_names())})"
        ) from None


def make_source(name: str, root: str | Path, opts: SourceOptions, bad: BadSamples,
                given: Sequence[str] = ()) -> Source:
    """Build a source; ``given`` names the options the user set explicitly."""
    cls = get_source_class(name)
    for opt in given:
        if opt not in cls.options:
            accepted = ", ".join(f"--{o.replace('_', '-')}" for o in cls.options) or "none"
            raise SatkitError(
                f"--{opt.replace('_', '-')}: not an option of source {name!r} (it takes: {accepted})"
            )
    return cls(Path(root), opts, bad)


# --------------------------------------------------------------------------- readers


def require_dir(path: Path, what: str) -> Path:
    if not path.exists():
        raise SourceError(path, f"missing {what}")
    if not path.is_dir():
        raise SourceError(path, f"{what} is not a directory")
    try:
        next(iter(path.iterdir()), None)
    except PermissionError:
        raise SourceError(path, f"{what} is not readable (permission denied)") from None
    return path


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise SourceError(path, f"missing {what}")
    return path


class SourceImage(np.ndarray):
    """An image decoded at a reduced scale; ``full_hw`` is its (h, w) on disk.

    The builder plans geometry, checks boxes and sizes masks against ``full_hw`` (see
    ``image_hw``), so a reduced decode changes no coordinate, only how many pixels the
    final resize starts from.
    """

    full_hw: tuple[int, int] | None

    def __array_finalize__(self, obj: Any) -> None:
        self.full_hw = getattr(obj, "full_hw", None)


def image_hw(image: np.ndarray) -> tuple[int, int]:
    """The (h, w) of an image as on disk, whether or not it was decoded at reduced scale."""
    full = getattr(image, "full_hw", None)
    return (int(full[0]), int(full[1])) if full else (int(image.shape[0]), int(image.shape[1]))


# Set by the builder in each decoding process: (out_hw, fit mode). With it, JPEGs are
# decoded with libjpeg's DCT scaling to no less than twice the size the image is resized
# to (so the final area-average still reduces at least 2x): several times less work for
# a 500x375 photo going to 32x32, and pixels within a grey level or two of a full decode.
_REDUCED_DECODE: dict[str, Any] = {}


def set_reduced_decode(out_hw: tuple[int, int] | None, fit_mode: str = "stretch") -> None:
    """Enable (out_hw given) or disable (None) reduced-scale JPEG decoding in this process."""
    _REDUCED_DECODE.clear()
    if out_hw is not None:
        _REDUCED_DECODE.update(out_hw=tuple(out_hw), fit=fit_mode)


def _draft(im: Any) -> None:
    if not _REDUCED_DECODE or im.format != "JPEG":
        return
    from satdata.geometry import plan_fit

    w, h = im.size
    fit = plan_fit((h, w), _REDUCED_DECODE["out_hw"], _REDUCED_DECODE["fit"])
    rh, rw = fit.resized_hw
    if w >= 4 * rw and h >= 4 * rh:
        im.draft("RGB", (2 * rw, 2 * rh))


@contextmanager
def pil_errors(path: Path, what: str) -> Iterator[None]:
    """Turn PIL's errors while opening/decoding ``path`` into one-line SourceErrors."""
    from PIL import UnidentifiedImageError

    try:
        yield
    except FileNotFoundError:
        raise SourceError(path, f"{what} file is missing") from None
    except UnidentifiedImageError:
        raise SourceError(path, f"not a readable {what} (unknown or damaged format)") from None
    except OSError as e:
        raise SourceError(path, f"{what} is truncated or damaged ({e})") from None


def read_image(path: Path) -> np.ndarray:
    """Decode an image file to (h, w, 3) uint8 RGB, or raise SourceError naming it.

    A truncated file is an error (PIL would otherwise pad it silently with grey). Inside
    a build, a large JPEG may come back decoded at reduced scale as a ``SourceImage``;
    use ``image_hw`` for its size on disk.
    """
    from PIL import Image

    with pil_errors(path, "image"):
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                full_hw = (im.size[1], im.size[0])
                _draft(im)
                im.load()
                if im.mode != "RGB":
                    im = im.convert("RGB")
                arr = np.asarray(im, dtype=np.uint8)
    if arr.ndim != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise SourceError(path, f"image has no pixels (shape {arr.shape})")
    arr = np.ascontiguousarray(arr)
    if arr.shape[:2] != full_hw:
        arr = arr.view(SourceImage)
        arr.full_hw = full_hw
    return arr


def read_png_indices(path: Path) -> np.ndarray:
    """Read a palette (or greyscale) PNG as its raw (h, w) indices, without colour mapping."""
    from PIL import Image

    with pil_errors(path, "mask"):
        with Image.open(path) as im:
            im.load()
            if im.mode in ("P", "L", "1", "I", "I;16"):
                arr = np.asarray(im)
            else:
                arr = np.asarray(im.convert("L"))
    return np.ascontiguousarray(arr)


def check_mask_size(mask: np.ndarray, image: np.ndarray, path: Path) -> None:
    h, w = image_hw(image)
    if mask.shape[:2] != (h, w):
        raise SourceError(path, f"mask is {mask.shape[1]}x{mask.shape[0]} but its image is {w}x{h}")


def check_box(box: Sequence[float], hw: tuple[int, int], path: Path | str, what: str = "box") -> None:
    """A box [x1, y1, x2, y2] in continuous pixel coordinates must have area inside the image."""
    x1, y1, x2, y2 = (float(v) for v in box)
    h, w = hw
    if not (x2 > x1 and y2 > y1):
        raise SourceError(path, f"{what} ({x1:g}, {y1:g}, {x2:g}, {y2:g}) has zero or negative area")
    if x1 < 0 or y1 < 0 or x2 > w or y2 > h:
        raise SourceError(
            path, f"{what} ({x1:g}, {y1:g}, {x2:g}, {y2:g}) lies outside the {w}x{h} image"
        )

