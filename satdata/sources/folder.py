"""Your own data: an ImageFolder tree of images beside a tree of object masks.

Two layouts (``--root`` is the directory shown)::

    root/images/<class>/<name>.jpg         one split, built as "train"
    root/masks/<class>/<name>.png

    root/train/images/<class>/<name>.jpg   one pair of trees per split present:
    root/train/masks/<class>/<name>.png    train, val and/or test
    root/val/images/...  root/val/masks/...

Classes are the sorted class directory names (torchvision's ImageFolder order), taken over
every split so that a label means the same class in each. Images are the files whose
extension ImageFolder accepts (``IMAGE_EXTENSIONS``, any case); other files are ignored.
An image's mask is ``masks/<class>/<stem>.png``, same class, same stem.

Mask rule (map ``mask``, binary): any non-zero value is object. The PNG's raw values are
read without colour mapping (a palette PNG's indices, a greyscale PNG's levels), so
index 255 ("void" in VOC-style masks) counts as object too; an RGB(A) mask is object where
any colour channel is non-zero (alpha is ignored).

Bad samples (``--skip-bad`` skips them): an image with no mask (named by the image), two
images with the same stem in one class (one mask cannot serve both), a mask whose size
differs from its image's (named by the mask), and any entry of a class directory (or of
``images/``) that is neither a regular file nor a directory: a FIFO, socket or device, a
broken symbolic link or a link loop (named, with what it is; never silently dropped, and
never opened, so a FIFO cannot make a build wait). Subdirectories of a class directory
and hidden entries (names starting with '.') are not read.

Every image and mask is opened only if it is a regular file inside ``--root``: a link
that leads out of the root is a bad sample naming it. Images are read as
satdata.sources._base.read_image says (16-bit greyscale scaled, alpha composited on black).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from satdata.errors import SourceError
from satdata.sources._base import (
    BadSamples,
    Decoded,
    MapSpec,
    Record,
    Source,
    SourceOptions,
    check_mask_size,
    entry_problem,
    open_image,
    pil_errors,
    read_image,
    register_source,
    require_dir,
)
from satdata.store import SPLITS

# torchvision.datasets.folder.IMG_EXTENSIONS
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def read_object_mask(path: Path, root: str | Path | None = None) -> np.ndarray:
    """(h, w) 0/1 uint8 from a mask PNG: 1 wherever the stored value is non-zero."""
    with pil_errors(path, "mask"):
        with open_image(path, "mask", root) as im:
            im.load()
            if im.mode in ("P", "L", "1", "I", "I;16", "I;16B", "F", "LA", "PA"):
                arr = np.asarray(im)
                if arr.ndim == 3:  # LA / PA: the value band, not the alpha
                    arr = arr[:, :, 0]
            else:
                arr = np.asarray(im.convert("RGB")).max(axis=2)
    return (arr != 0).astype(np.uint8)


def _visible_dirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


@register_source
class FolderMasks(Source):
    name = "folder-masks"
    summary = "ImageFolder tree images/<class>/x.jpg beside masks/<class>/x.png; map: the mask"
    options = ()
    label_kind = "single"
    maps = {"mask": MapSpec(kind="mask", encoding="binary")}
    needs_root = True

    def __init__(self, root: Path, opts: SourceOptions, bad: BadSamples) -> None:
        super().__init__(root, opts, bad)
        if not self.root.is_dir():
            raise SourceError(self.root, "no such directory" if not self.root.exists() else "not a directory")
        self.layout = self._find_layout()
        names: set[str] = set()
        for images, _ in self.layout.values():
            names.update(p.name for p in _visible_dirs(images))
        if not names:
            where = next(iter(self.layout.values()))[0]
            raise SourceError(where, "holds no class directories (expected images/<class>/<name>.jpg)")
        self.classes = sorted(names)
        self._index = {c: i for i, c in enumerate(self.classes)}

    def _find_layout(self) -> dict[str, tuple[Path, Path]]:
        """split -> (images dir, masks dir), for whichever of the two layouts root has."""
        per_split = [s for s in SPLITS if (self.root / s / "images").is_dir()]
        flat = (self.root / "images").is_dir()
        if per_split and flat:
            raise SourceError(self.root, f"has both images/ and {per_split[0]}/images/: "
                                         "use one layout (a single split, or one directory per split)")
        if not per_split and not flat:
            raise SourceError(self.root, "not a folder dataset (no images/ and no train|val|test/images/)")
        layout: dict[str, tuple[Path, Path]] = {}
        for s, base in ([("train", self.root)] if flat else [(s, self.root / s) for s in per_split]):
            images = require_dir(base / "images", "images directory")
            masks = require_dir(base / "masks", f"masks directory beside {images}")
            layout[s] = (images, masks)
        return layout

    def available_splits(self) -> list[str]:
        return list(self.layout)

    def records(self, split: str) -> list[Record]:
        if split not in self.layout:
            raise SourceError(self.root, f"has no split {split!r} (it has: {', '.join(self.layout)})")
        images_dir, masks_dir = self.layout[split]
        out: list[Record] = []
        for entry in sorted(images_dir.iterdir()):  # what is not a class directory
            if not entry.name.startswith("."):
                kind, problem = entry_problem(entry)
                if problem:
                    self.bad(entry, problem)
        for cls_dir in _visible_dirs(images_dir):
            label = self._index[cls_dir.name]
            mask_dir = masks_dir / cls_dir.name
            masks = {p.stem: p for p in mask_dir.iterdir() if p.suffix.lower() == ".png"} if mask_dir.is_dir() else {}
            seen: dict[str, Path] = {}
            for img in sorted(cls_dir.iterdir()):
                if img.name.startswith("."):
                    continue
                kind, problem = entry_problem(img)
                if problem:  # a FIFO, device, socket, broken link or link loop: named, never opened
                    self.bad(img, problem)
                    continue
                if kind != "file" or img.suffix.lower() not in IMAGE_EXTENSIONS:
                    continue
                if img.stem in seen:
                    self.bad(img, f"shares the stem {img.stem!r} with {seen[img.stem].name}: "
                                  "one mask cannot serve both")
                    continue
                seen[img.stem] = img
                mask = masks.get(img.stem)
                if mask is None:
                    self.bad(img, f"has no mask (expected {mask_dir / (img.stem + '.png')})")
                    continue
                out.append(Record(id=img.relative_to(self.root).as_posix(), label=label,
                                  data=(str(img), str(mask))))
        return out

    def decode(self, record: Record) -> Decoded:
        img_path, mask_path = record.data
        image = read_image(Path(img_path), self.root)
        mask = read_object_mask(Path(mask_path), self.root)
        check_mask_size(mask, image, Path(mask_path))
        return Decoded(image=image, masks={"mask": mask})
