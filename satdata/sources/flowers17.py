"""Oxford 17 Category Flower Dataset (Nilsback & Zisserman, 2006) with its trimaps as masks.

Layout read (``--root`` is the directory holding ``jpg/``, or its parent when that is
called ``17flowers``)::

    jpg/image_0001.jpg .. image_1360.jpg   17 classes x 80 images, in class order
    trimaps/image_XXXX.png                 segmentation ground truth for 848 of them
    datasplits.mat                         optional: trn1/val1/tst1 (1-based image numbers)

Labels: image number n (1-based) belongs to class (n - 1) // 80, in the dataset's order
``CLASSES`` (Daffodil ... Pansy, as the dataset page and the many loaders built on it list
them).

Mask rule (map ``mask``, binary): a trimap pixel is object exactly when its colour is
dark red ``(128, 0, 0)`` (index 1 of the PASCAL VOC palette), the trimaps' foreground;
every other value, the black background and any boundary/unknown band alike, is
background. Why: that is the colour the published loaders take as the flower (a
segmentation loader's ``(r, g, b) == (128, 0, 0)`` test, and a trimap-to-box converter
thresholding grey 30..55, which is where (128, 0, 0) falls), and keeping only the surely
annotated flower makes the SAT map conservative: the perturbation is steered toward
"object" only where the annotator was sure, and an uncertain rim a pixel or two wide
vanishes at 32x32 anyway. PNGs are read through their palette (or as RGB), so the rule
does not depend on how the PNG stores the colour. A trimap with no foreground pixel is
reported as bad (it would mean a different encoding, not an empty flower).

Images without a trimap: ``--unmasked skip`` (default) leaves them out; ``--unmasked
whole`` keeps them with a map that marks the whole image as object.

Splits: ``datasplits.mat`` when present, read with scipy: ``trn1``/``val1``/``tst1`` (the
first of the dataset's three partitions) become ``train``/``val``/``test``. Without it the
split is the same shape, fixed and balanced: the k-th image of each class (k = 0..79) goes
to train when k % 4 is 0 or 1, to val when it is 2, to test when it is 3 (40/20/20 a
class, like each official partition).

Hostile input. File names are made from image numbers, never read from a file; every
image, trimap and ``datasplits.mat`` is opened only if it is a regular file inside
``--root`` (a FIFO, a directory, a link loop or a link out of the root is an error naming
it). A ``datasplits.mat`` that exists in any form is read (one that is not a regular file
is an error, never a silent fall-back to the default split), only its trn1/val1/tst1,
and only up to ``MAX_MAT_BYTES``.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import numpy as np

from satdata.errors import SatkitError, SourceError
from satdata.sources._base import (
    BadSamples,
    Decoded,
    MapSpec,
    Record,
    Source,
    SourceOptions,
    check_mask_size,
    image_hw,
    open_file,
    open_image,
    pil_errors,
    read_image,
    register_source,
    require_dir,
    short,
)

CLASSES = [
    "Daffodil", "Snowdrop", "LilyValley", "Bluebell", "Crocus", "Iris", "Tigerlily", "Tulip",
    "Fritillary", "Sunflower", "Daisy", "ColtsFoot", "Dandelion", "Cowslip", "Buttercup",
    "Windflower", "Pansy",
]
PER_CLASS = 80
N_IMAGES = PER_CLASS * len(CLASSES)  # 1360
FOREGROUND_RGB = (128, 0, 0)
MAT_KEYS = {"train": "trn1", "val": "val1", "test": "tst1"}
UNMASKED_MODES = ("skip", "whole")
_TRIMAP = re.compile(r"^image_(\d{4})\.png$")
# The real datasplits.mat is 33 KB. A compressed MATLAB variable may expand about 1000x,
# so this also bounds what reading one can allocate; declared shapes are checked first.
MAX_MAT_BYTES = 1024 * 1024


def image_name(n: int) -> str:
    """File name of 1-based image number n: ``image_0001.jpg``."""
    return f"image_{n:04d}.jpg"


def label_of(n: int) -> int:
    """Class index of 1-based image number n."""
    return (n - 1) // PER_CLASS


def default_split(n: int) -> str:
    """The documented split without datasplits.mat: by position within the class."""
    k = (n - 1) % PER_CLASS
    return ("train", "train", "val", "test")[k % 4]


def read_datasplits(path: Path, root: str | Path | None = None) -> dict[str, list[int]]:
    """trn1/val1/tst1 of datasplits.mat as sorted 1-based image numbers, checked."""
    try:
        from scipy.io import loadmat, whosmat
    except ImportError:  # pragma: no cover - scipy comes with scikit-learn
        raise SourceError(path, "reading datasplits.mat needs scipy (pip install scipy)") from None
    try:
        with open_file(path, "datasplits.mat", root, max_bytes=MAX_MAT_BYTES) as f:
            for name, shape, _ in whosmat(f):
                if name in MAT_KEYS.values() and math.prod(shape) > N_IMAGES:
                    raise SourceError(path, f"{name} declares shape {short(shape)}: more numbers than the "
                                            f"{N_IMAGES} images")
            f.seek(0)
            mat = loadmat(f, variable_names=list(MAT_KEYS.values()))
    except SourceError:
        raise
    except Exception as e:  # scipy raises ValueError/TypeError/OSError for damaged files
        raise SourceError(path, f"not a readable MATLAB file ({type(e).__name__}: {str(e)[:200]})") from None
    out: dict[str, list[int]] = {}
    owner: dict[int, str] = {}
    for split, key in MAT_KEYS.items():
        if key not in mat:
            raise SourceError(path, f"has no {key!r} (expected trn1, val1, tst1)")
        try:
            arr = np.asarray(mat[key], dtype=np.float64).ravel()
        except (TypeError, ValueError):
            raise SourceError(path, f"{key} is not a numeric array") from None
        if arr.size == 0:
            raise SourceError(path, f"{key} is empty")
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise SourceError(path, f"{key} holds non-integer image numbers")
        nums = arr.astype(np.int64)
        if nums.min() < 1 or nums.max() > N_IMAGES:
            raise SourceError(path, f"{key} holds image number {int(nums.min() if nums.min() < 1 else nums.max())}, "
                                    f"outside 1..{N_IMAGES}")
        for n in nums.tolist():
            if n in owner:
                raise SourceError(path, f"image {n} is in both {owner[n]} and {key}")
            owner[n] = key
        out[split] = sorted(nums.tolist())
    return out


def trimap_mask(path: Path, root: str | Path | None = None) -> np.ndarray:
    """(h, w) 0/1 uint8: 1 where the trimap is the foreground colour (128, 0, 0)."""
    with pil_errors(path, "trimap"):
        with open_image(path, "trimap", root) as im:
            im.load()
            rgb = np.asarray(im.convert("RGB"))
    r, g, b = FOREGROUND_RGB
    mask = (rgb[:, :, 0] == r) & (rgb[:, :, 1] == g) & (rgb[:, :, 2] == b)
    return mask.astype(np.uint8)


@register_source
class Flowers17Masks(Source):
    name = "flowers17-masks"
    summary = "Oxford 17 Category Flowers: jpg/ + trimaps/ (+ datasplits.mat); map: flower mask"
    options = ("unmasked",)
    label_kind = "single"
    maps = {"mask": MapSpec(kind="mask", encoding="binary")}
    needs_root = True

    def __init__(self, root: Path, opts: SourceOptions, bad: BadSamples) -> None:
        super().__init__(root, opts, bad)
        if opts.unmasked not in UNMASKED_MODES:
            raise SatkitError(f"--unmasked: must be one of {', '.join(UNMASKED_MODES)}, got {opts.unmasked!r}")
        self.base = self._find_base(self.root)
        self.classes = list(CLASSES)
        jpg = require_dir(self.base / "jpg", "jpg/ directory (the images)")
        self._jpgs = {p.name for p in jpg.iterdir()}
        self._trimaps = self._list_trimaps(require_dir(self.base / "trimaps", "trimaps/ directory (the masks)"))
        mat = self.base / "datasplits.mat"
        if os.path.lexists(mat):  # in any form: one that is not a regular file is an error
            self._splits = read_datasplits(mat, self.root)
        else:
            self._splits = {s: [n for n in range(1, N_IMAGES + 1) if default_split(n) == s]
                            for s in MAT_KEYS}

    @staticmethod
    def _find_base(root: Path) -> Path:
        for cand in (root, root / "17flowers"):
            if (cand / "jpg").is_dir():
                return cand
        if not root.exists():
            raise SourceError(root, "no such directory")
        raise SourceError(root, "not an Oxford 17 Flowers directory (no jpg/ here or in 17flowers/)")

    def _list_trimaps(self, tri_dir: Path) -> dict[int, Path]:
        found: dict[int, Path] = {}
        for p in sorted(tri_dir.iterdir()):
            m = _TRIMAP.match(p.name)
            if not m:
                continue  # imlist.mat and anything else that is not a trimap
            n = int(m.group(1))
            if not 1 <= n <= N_IMAGES:
                self.bad(p, f"trimap of image number {n}, outside 1..{N_IMAGES}")
                continue
            found[n] = p
        if not found:
            raise SourceError(tri_dir, "holds no trimaps (image_XXXX.png)")
        return found

    def available_splits(self) -> list[str]:
        return ["train", "val", "test"]

    def records(self, split: str) -> list[Record]:
        if split not in self._splits:
            raise SourceError(self.base, f"Flowers-17 has no split {split!r} (it has: train, val, test)")
        whole = self.opts.unmasked == "whole"
        out: list[Record] = []
        for n in self._splits[split]:
            trimap = self._trimaps.get(n)
            if trimap is None and not whole:
                continue
            name = image_name(n)
            img = self.base / "jpg" / name
            if name not in self._jpgs:
                what = f"has trimap {trimap.name} but" if trimap is not None else f"is in split {split!r} but"
                self.bad(img, f"image {n} {what} its file is missing")
                continue
            out.append(Record(id=f"jpg/{name}", label=label_of(n),
                              data=(str(img), str(trimap) if trimap is not None else None)))
        return out

    def decode(self, record: Record) -> Decoded:
        img_path, trimap_path = record.data
        image = read_image(Path(img_path), self.root)
        if trimap_path is None:
            mask = np.ones(image_hw(image), dtype=np.uint8)
        else:
            mask = trimap_mask(Path(trimap_path), self.root)
            check_mask_size(mask, image, Path(trimap_path))
            if not mask.any():
                raise SourceError(trimap_path, f"trimap has no foreground pixel (colour {FOREGROUND_RGB})")
        return Decoded(image=image, masks={"mask": mask})
