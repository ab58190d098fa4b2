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

Hostile input. Every failure a dataset on disk can cause ends in a SourceError naming the
file (the CLI prints it as one line; ``--skip-bad`` skips per-sample ones), never a
hang, a crash, a memory blow-up, silently wrong data or a read outside the dataset. The
shared readers below are how: ``open_file`` opens only regular files strictly inside the
dataset root (no FIFO, device, socket or directory, never blocking; no broken link, link
loop or link out of the root), ``relative_name_problem`` checks every file name that comes
from an annotation before it becomes a path, ``read_text`` refuses text that is not UTF-8,
``open_image`` refuses an image or mask above PIL's MAX_IMAGE_PIXELS before decoding it
and any format outside IMAGE_FORMATS, ``read_image`` turns every supported mode into 8-bit
RGB by one documented rule (and refuses the others by name), and ``entry_problem`` names
what a directory listing finds that is not a file or a directory.
"""

from __future__ import annotations

import abc
import errno
import math
import os
import re
import stat
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from contextlib import contextmanager
from typing import IO, Any, ClassVar, Iterator, Sequence

import numpy as np

from satdata.errors import SatkitError, SourceError


@dataclass(frozen=True)
class SourceOptions:
    """Options a source may accept; each source lists the ones it understands."""

    label: str = "multi"  # VOC: "multi" (multi-hot over the classes) or "largest"
    drop_difficult: bool = False  # VOC: ignore objects marked difficult
    unmasked: str = "skip"  # Flowers-17: images without a mask: "skip" or "whole"
    year: str | None = None  # VOC: which VOC20xx under the root (default: the only/newest)
    classes: str | None = None  # VOC, COCO: "auto" or a class-list file (default: the dataset's own list)
    skip_unknown_classes: bool = False  # VOC, COCO: leave out objects of classes the list lacks
    annotations: tuple[str, ...] = ()  # COCO: "SPLIT=FILE" per split (instead of annotations/instances_*.json)
    images: tuple[str, ...] = ()  # COCO: "SPLIT=DIR" per split (instead of <split>20xx/)

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


class Source(abc.ABC):
    """Base class of the dataset readers: a subclass implements the three abstract methods."""

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
        _REAL_ROOTS.clear()
        _REAL_DIRS.clear()
        self.root = Path(root)
        self.opts = opts
        self.bad = bad
        self.classes: list[str] = []
        # split -> counts worth recording (images left out, objects dropped, ...): the
        # builder writes them into the store's provenance and prints them.
        self.notes: dict[str, dict[str, Any]] = {}

    @abc.abstractmethod
    def available_splits(self) -> list[str]:
        """The splits this dataset has on disk, in build order."""

    @abc.abstractmethod
    def records(self, split: str) -> list[Record]:
        """Parse the annotations of one split (main process): one Record per sample."""

    @abc.abstractmethod
    def decode(self, record: Record) -> Decoded:
        """Read one sample's image and masks (in a worker), at the source's own resolution."""

    def prepare(self, splits: Sequence[str]) -> None:
        """Called by the builder with the splits it will build, before any ``records``.

        A source checks here that each split's files exist (an error naming the missing
        file, never a smaller store) and settles its class list. Default: nothing.
        """

    @property
    def dataset(self) -> str:
        return self.name

    # How the class list was chosen, for the store's provenance (None: the source's own
    # list, as it has always been; see ClassList.provenance).
    class_provenance: dict[str, Any] | None = None


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
#
# Every file a source opens goes through ``check_file``/``open_file``: it must be a
# regular file (after following symbolic links; a FIFO, device, socket or directory is
# refused before it is opened, so a build never blocks on one) lying strictly inside the
# dataset root (a link that leads out of it is refused), and it is opened non-blocking
# and checked again on the open descriptor. Names that come from annotations are checked
# with ``relative_name_problem`` before they become paths.

# Budgets: far beyond any real dataset, small enough that a crafted file cannot make a
# build allocate without limit.
MAX_TEXT_BYTES = 256 * 1024 * 1024  # a split list, boxes file, wnids.txt, an XML annotation
MAX_NAME_CHARS = 1024  # a file name from an annotation
# PIL's decompression-bomb limit (Image.MAX_IMAGE_PIXELS, 89,478,485 pixels, about
# 9459 x 9459) bounds every image and mask, and every size an annotation declares; it is
# read from PIL at each use, so a program that raises PIL's limit raises satkit's too.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485
# What PIL may open: the formats of IMAGE_EXTENSIONS (folder-masks) and of the datasets.
# Anything else (EPS, which PIL would hand to Ghostscript, PDF, PSD, ...) is refused as an
# unknown format whatever its name says.
IMAGE_FORMATS = ("JPEG", "PNG", "BMP", "PPM", "TIFF", "WEBP", "GIF")  # JPEG includes MPO

_KINDS = (
    (stat.S_ISDIR, "directory"),
    (stat.S_ISFIFO, "FIFO (named pipe)"),
    (stat.S_ISSOCK, "socket"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
)


def file_kind(mode: int) -> str:
    """'regular file', 'directory', 'FIFO (named pipe)', ... of an st_mode."""
    if stat.S_ISREG(mode):
        return "regular file"
    for test, name in _KINDS:
        if test(mode):
            return name
    return "special file"


def max_image_pixels() -> int:
    """The most pixels an image, a mask or a declared image size may have."""
    try:
        from PIL import Image

        limit = Image.MAX_IMAGE_PIXELS
    except ImportError:  # pragma: no cover - PIL comes with satkit
        limit = None
    return int(limit) if limit else DEFAULT_MAX_IMAGE_PIXELS


def pixels_problem(w: Any, h: Any) -> str | None:
    """Why a declared image size of w x h pixels is refused, or None."""
    n = int(w) * int(h)
    limit = max_image_pixels()
    if n > limit:
        return f"declares {int(w)}x{int(h)} = {n:,} pixels, more than the limit of {limit:,} (PIL's MAX_IMAGE_PIXELS)"
    return None


def short(value: Any, limit: int = 60) -> str:
    """repr(value) cut to ``limit`` characters: crafted values can be megabytes long or deeply nested."""
    try:
        text = repr(value)
    except (RecursionError, ValueError):  # nested too deeply; an int of more than 4300 digits
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_finite_number(v: Any) -> bool:
    """A JSON/XML number that is finite: an int (not a bool) of at most 2**53, or a finite float."""
    if type(v) is int:
        return -(2 ** 53) <= v <= 2 ** 53
    return type(v) is float and math.isfinite(v)


def relative_name_problem(name: Any) -> str | None:
    """Why ``name`` (a file name read from an annotation) is not a plain relative path, or None.

    A plain relative path is a non-empty string of at most MAX_NAME_CHARS characters,
    without NUL or other control characters or backslashes, not absolute, whose
    '/'-separated parts are neither empty nor '.' nor '..'.
    """
    if not isinstance(name, str) or not name:
        return "is not a file name"
    if len(name) > MAX_NAME_CHARS:
        return f"is {len(name):,} characters long (at most {MAX_NAME_CHARS})"
    if _CONTROL.search(name):
        return "holds a NUL or control character"
    if "\\" in name:
        return "holds a backslash (use '/' between folders)"
    if name.startswith("/"):
        return "is an absolute path"
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return "has an empty, '.' or '..' part (it must stay inside the dataset folder)"
    return None


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# realpath of dataset roots and of the folders files are opened in, per process (cleared
# by each Source, so a long-lived process never trusts a folder swapped since its last build)
_REAL_ROOTS: dict[str, str] = {}
_REAL_DIRS: dict[str, str] = {}


def _real_dir(d: str) -> str:
    real = _REAL_DIRS.get(d)
    if real is None:
        real = _REAL_DIRS[d] = os.path.realpath(d or ".")
    return real


def check_inside(path: str | Path, root: str | Path, what: str, *, link: bool = True) -> None:
    """Refuse (SourceError) ``path`` unless, symbolic links followed, it lies strictly inside root.

    ``link=False`` says the last component is known not to be a link (one syscall less).
    """
    p = os.fspath(path)
    key = os.fspath(root)
    base = _REAL_ROOTS.get(key)
    if base is None:
        base = _REAL_ROOTS[key] = os.path.realpath(key or ".")
    parent, name = os.path.split(p)
    real = os.path.realpath(p) if link else os.path.join(_real_dir(parent), name)
    prefix = base if base.endswith(os.sep) else base + os.sep
    if not real.startswith(prefix):
        raise SourceError(path, f"{what} leads outside the dataset root {root} (to {real}); "
                                "links out of --root are refused: pass the real folder as --root")


def _stat_problem(e: OSError, p: str, what: str) -> str:
    if e.errno == errno.ELOOP:
        return f"{what} is a symbolic link loop"
    if isinstance(e, PermissionError):
        return f"{what} is not readable (permission denied)"
    return f"cannot read {what} ({e.strerror or e})"


def entry_problem(path: str | Path) -> tuple[str, str | None]:
    """(kind, problem) of a directory entry found while listing: kind 'file' or 'dir' and
    problem None, or kind 'bad' and the problem (special file, broken link, link loop)."""
    p = os.fspath(path)
    try:
        st = os.stat(p)
    except OSError as e:
        if isinstance(e, FileNotFoundError) and os.path.islink(p):
            return "bad", f"is a broken symbolic link (to {short(os.readlink(p))})"
        if e.errno == errno.ELOOP:
            return "bad", "is a symbolic link loop"
        return "bad", f"cannot be read ({e.strerror or e})"
    if stat.S_ISREG(st.st_mode):
        return "file", None
    if stat.S_ISDIR(st.st_mode):
        return "dir", None
    return "bad", f"is a {file_kind(st.st_mode)}, not a regular file"


def check_file(path: str | Path, what: str, root: str | Path | None = None, missing: str | None = None) -> int:
    """Refuse (SourceError naming path) anything but a regular file inside root; return its size.

    Symbolic links are followed (a broken link, a loop or a link out of root is refused);
    a FIFO, socket, device or directory is refused before anything opens it. ``missing``
    is the problem reported for a path that does not exist (default "missing <what>").
    """
    p = os.fspath(path)
    if "\x00" in p:
        raise SourceError(short(p, 200), f"{what} path holds a NUL character")
    try:
        st = os.lstat(p)
    except (FileNotFoundError, NotADirectoryError):
        raise SourceError(path, missing or f"missing {what}") from None
    except OSError as e:
        raise SourceError(path, _stat_problem(e, p, what)) from None
    link = stat.S_ISLNK(st.st_mode)
    if link:
        try:
            st = os.stat(p)
        except FileNotFoundError:
            raise SourceError(path, f"{what} is a broken symbolic link (to {short(os.readlink(p))})") from None
        except OSError as e:
            raise SourceError(path, _stat_problem(e, p, what)) from None
    if not stat.S_ISREG(st.st_mode):
        raise SourceError(path, f"{what} is a {file_kind(st.st_mode)}, not a regular file")
    if root is not None:
        check_inside(p, root, what, link=link)
    return int(st.st_size)


def open_file(path: str | Path, what: str, root: str | Path | None = None, missing: str | None = None,
              max_bytes: int | None = None) -> IO[bytes]:
    """``check_file``, then open for reading; the caller closes the returned binary file.

    The file is opened non-blocking and checked again on the open descriptor, so even a
    regular file swapped for a FIFO between the check and the open cannot block a build.
    ``max_bytes`` refuses a larger file before reading any of it.
    """
    check_file(path, what, root, missing)
    p = os.fspath(path)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)
    try:
        fd = os.open(p, flags)
    except FileNotFoundError:
        raise SourceError(path, missing or f"missing {what}") from None
    except OSError as e:
        raise SourceError(path, _stat_problem(e, p, what)) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SourceError(path, f"{what} is a {file_kind(st.st_mode)}, not a regular file")
        if max_bytes is not None and st.st_size > max_bytes:
            raise SourceError(path, f"{what} is {st.st_size:,} bytes, more than the limit of {max_bytes:,}")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bytes(path: str | Path, what: str, root: str | Path | None = None, missing: str | None = None,
               max_bytes: int = MAX_TEXT_BYTES) -> bytes:
    """The content of a regular file inside root, at most max_bytes (``open_file``)."""
    with open_file(path, what, root, missing, max_bytes) as f:
        try:
            data = f.read(max_bytes + 1)
        except OSError as e:
            raise SourceError(path, f"cannot read {what} ({e.strerror or e})") from None
    if len(data) > max_bytes:  # grew while we read
        raise SourceError(path, f"{what} is more than the limit of {max_bytes:,} bytes")
    return data


def decode_text(data: bytes, path: str | Path, what: str) -> str:
    """UTF-8 text (a leading byte-order mark is allowed), or SourceError naming the first bad byte."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise SourceError(path, f"{what} is not UTF-8 text (byte 0x{data[e.start]:02x} at position {e.start})") from None


def read_text(path: str | Path, what: str, root: str | Path | None = None, missing: str | None = None,
              max_bytes: int = MAX_TEXT_BYTES) -> str:
    """A text annotation file (``read_bytes`` + ``decode_text``)."""
    return decode_text(read_bytes(path, what, root, missing, max_bytes), path, what)


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


def require_file(path: Path, what: str, root: str | Path | None = None) -> Path:
    """``path`` if it is a regular file (inside root when given), else SourceError naming it."""
    check_file(path, what, root, missing=f"missing {what}")
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
    if not _REDUCED_DECODE or im.format not in ("JPEG", "MPO"):
        return
    from satdata.geometry import plan_fit

    w, h = im.size
    fit = plan_fit((h, w), _REDUCED_DECODE["out_hw"], _REDUCED_DECODE["fit"])
    rh, rw = fit.resized_hw
    if w >= 4 * rw and h >= 4 * rh:
        im.draft("RGB", (2 * rw, 2 * rh))


@contextmanager
def pil_errors(path: Path, what: str) -> Iterator[None]:
    """Turn PIL's errors while opening/decoding ``path`` into one-line SourceErrors.

    PIL's decoders raise many types on crafted files (OSError, SyntaxError, ValueError,
    struct.error, ...): each becomes "not a readable <what>" or "<what> is truncated or
    damaged", naming the file. A SourceError raised inside passes through.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            # satkit's own limit (open_image) is checked before decoding; PIL's warning
            # would otherwise be printed once per process.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    except SatkitError:
        raise
    except FileNotFoundError:
        raise SourceError(path, f"{what} file is missing") from None
    except UnidentifiedImageError:
        raise SourceError(path, f"not a readable {what} (unknown or damaged format)") from None
    except Image.DecompressionBombError as e:
        raise SourceError(path, f"{what} declares more pixels than the limit of {max_image_pixels():,} (PIL's "
                                f"MAX_IMAGE_PIXELS); refused before decoding ({e})") from None
    except MemoryError:
        raise SourceError(path, f"{what} is too large to decode (out of memory)") from None
    except OSError as e:
        raise SourceError(path, f"{what} is truncated or damaged ({e})") from None
    except Exception as e:  # noqa: BLE001 - PIL's decoders raise anything on crafted input
        raise SourceError(path, f"not a readable {what} (damaged: {type(e).__name__}: {short(str(e), 200)})") from None


@contextmanager
def open_image(path: Path, what: str, root: str | Path | None = None) -> Iterator[Any]:
    """A PIL image of the regular file at path, its size checked against the pixel budget
    before any pixel is decoded. Use inside ``pil_errors``."""
    from PIL import Image

    with open_file(path, what, root, missing=f"{what} file is missing") as f:
        with Image.open(f, formats=IMAGE_FORMATS) as im:
            w, h = im.size
            if w < 1 or h < 1:
                raise SourceError(path, f"{what} has no pixels ({w}x{h})")
            too_big = pixels_problem(w, h)
            if too_big:
                raise SourceError(path, f"{what} {too_big}; refused before decoding")
            yield im


# Image modes (PIL's names) and how read_image turns each into 8-bit RGB.
RGB_MODES = ("RGB", "RGBX", "YCbCr", "L", "1", "P", "CMYK")  # PIL's own conversion to RGB
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")  # composited on black
GREY16_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # 16-bit grey, scaled to 8 bits
IMAGE_MODES = RGB_MODES + ALPHA_MODES + GREY16_MODES


def _grey16(im: Any, path: Path, what: str) -> np.ndarray:
    a = np.asarray(im)
    if im.mode == "I" and a.size and (int(a.min()) < 0 or int(a.max()) > 65535):
        raise SourceError(path, f"{what} is 32-bit integer greyscale with values {int(a.min())}..{int(a.max())}; "
                                "only 0..65535 (16-bit) is read")
    # round(v * 255 / 65535): 65535 -> 255, 32768 -> 128, 257 -> 1; never clipped.
    return ((a.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def pil_to_rgb(im: Any, path: Path, what: str = "image") -> np.ndarray:
    """(h, w, 3) uint8 RGB of a decoded PIL image, by the rule of ``read_image``."""
    mode = im.mode
    if mode in GREY16_MODES:
        g = _grey16(im, path, what)
        return np.repeat(g[:, :, None], 3, axis=2)
    if mode in ALPHA_MODES or (mode in ("P", "L", "RGB") and "transparency" in im.info):
        rgba = np.asarray(im.convert("RGBA"), dtype=np.uint16)
        a = rgba[:, :, 3:4]
        return ((rgba[:, :, :3] * a + 127) // 255).astype(np.uint8)  # composited on black
    if mode == "RGB":
        return np.asarray(im, dtype=np.uint8)
    if mode in RGB_MODES:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)
    raise SourceError(path, f"{what} has mode {mode!r}, which satkit does not read "
                            f"(it reads {', '.join(IMAGE_MODES)})")


def read_image(path: Path, root: str | Path | None = None) -> np.ndarray:
    """Decode an image file to (h, w, 3) uint8 RGB, or raise SourceError naming it.

    Only a regular file (inside ``root`` when given) of a known format (IMAGE_FORMATS) is
    opened, and only when its size is within PIL's MAX_IMAGE_PIXELS. Modes:

    * RGB as is; greyscale (L, 1), palette (P), YCbCr and CMYK through PIL's conversion
      (CMYK without a colour profile);
    * 16-bit greyscale (I;16 and its byte orders, and I with values 0..65535, as older
      PIL reads 16-bit PNGs) is scaled to 8 bits, ``round(v * 255 / 65535)``, not clipped;
    * alpha (RGBA, LA, PA, premultiplied RGBa/La, and P, L or RGB with a transparency
      entry) is composited on black: each colour is multiplied by alpha / 255, so a fully
      transparent pixel is black whatever colour it hides (black is also what
      ``--fit pad`` fills with);
    * any other mode (F, I;16S, LAB, HSV, ...) is refused, naming it.

    A truncated file is an error (PIL would otherwise pad it silently with grey). Inside
    a build, a large JPEG may come back decoded at reduced scale as a ``SourceImage``;
    use ``image_hw`` for its size on disk.
    """
    with pil_errors(path, "image"):
        with open_image(path, "image", root) as im:
            full_hw = (im.size[1], im.size[0])
            _draft(im)
            im.load()
            arr = pil_to_rgb(im, path)
    if arr.ndim != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise SourceError(path, f"image has no pixels (shape {arr.shape})")
    arr = np.ascontiguousarray(arr)
    if arr.shape[:2] != full_hw:
        arr = arr.view(SourceImage)
        arr.full_hw = full_hw
    return arr


INDEX_MODES = ("P", "L", "1", "I", "I;16", "I;16L", "I;16B", "I;16N")


def read_png_indices(path: Path, root: str | Path | None = None) -> np.ndarray:
    """Read a palette (or greyscale) PNG as its raw (h, w) indices, without colour mapping.

    16-bit and 32-bit greyscale masks come back with their own dtype and values: a caller
    that counts values checks their range first (``np.bincount`` of a crafted 2**31 would
    allocate gigabytes).
    """
    with pil_errors(path, "mask"):
        with open_image(path, "mask", root) as im:
            im.load()
            if im.mode in INDEX_MODES:
                arr = np.asarray(im)
            else:
                arr = np.asarray(im.convert("L"))
    return np.ascontiguousarray(arr)


def check_mask_size(mask: np.ndarray, image: np.ndarray, path: Path) -> None:
    h, w = image_hw(image)
    if mask.shape[:2] != (h, w):
        raise SourceError(path, f"mask is {mask.shape[1]}x{mask.shape[0]} but its image is {w}x{h}")


def check_box(box: Sequence[float], hw: tuple[int, int], path: Path | str, what: str = "box") -> None:
    """A box [x1, y1, x2, y2] in continuous pixel coordinates must be finite and have area inside the image."""
    x1, y1, x2, y2 = (float(v) for v in box)
    h, w = hw
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise SourceError(path, f"{what} ({x1:g}, {y1:g}, {x2:g}, {y2:g}) has a coordinate that is not a finite number")
    if not (x2 > x1 and y2 > y1):
        raise SourceError(path, f"{what} ({x1:g}, {y1:g}, {x2:g}, {y2:g}) has zero or negative area")
    if x1 < 0 or y1 < 0 or x2 > w or y2 > h:
        raise SourceError(
            path, f"{what} ({x1:g}, {y1:g}, {x2:g}, {y2:g}) lies outside the {w}x{h} image"
        )
