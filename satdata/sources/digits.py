"""scikit-learn's bundled handwritten digits: real data that needs no download.

1,797 greyscale 8x8 images of the digits 0-9 (values 0..16), from the UCI "Optical
Recognition of Handwritten Digits" set, shipped inside scikit-learn. Each image becomes
white ink on black, upsampled to the store size by the builder; two maps come with it:

* ``ink``: the object mask, pixels with ink (value >= 4 of 16 before upsampling, then
  thresholded with the image's geometry),
* ``box``: the bounding box of the ink, drawn like any dataset's boxes.

Splits are fixed and balanced: every fifth sample of each class (in scikit-learn's
order) is ``test``, the rest ``train``. ``--root`` is not used.

Digits are not mirror-symmetric (a flipped 2, 3, 4, 5, 6, 7 or 9 is not that digit), so
the store records ``hflip: false`` and training does not flip them by default.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from satdata.sources._base import (
    BadSamples,
    Decoded,
    MapSpec,
    Record,
    Source,
    SourceOptions,
    register_source,
)

INK_THRESHOLD = 4  # of 16


def _load() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return np.asarray(d.images, dtype=np.float64), np.asarray(d.target, dtype=np.int64)


@register_source
class Digits(Source):
    name = "digits"
    summary = "scikit-learn's bundled handwritten digits (offline); maps: ink mask, ink box"
    options = ()
    label_kind = "single"
    maps = {
        "ink": MapSpec(kind="mask", encoding="binary"),
        "box": MapSpec(kind="boxes", encoding="binary", from_boxes=True),
    }
    needs_root = False
    hflip = False  # a mirrored digit is not the same digit

    def __init__(self, root: Path, opts: SourceOptions, bad: BadSamples) -> None:
        super().__init__(root, opts, bad)
        self.classes = [str(i) for i in range(10)]
        self._images, self._targets = _load()

    def available_splits(self) -> list[str]:
        return ["train", "test"]

    def records(self, split: str) -> list[Record]:
        out = []
        seen = np.zeros(10, dtype=np.int64)
        for i, y in enumerate(self._targets):
            k = seen[y]
            seen[y] += 1
            is_test = k % 5 == 4
            if (split == "test") == is_test:
                out.append(Record(id=f"digits/{i:04d}", label=int(y), data=(self._images[i], int(y))))
        return out

    def decode(self, record: Record) -> Decoded:
        img16, y = record.data
        grey = np.clip(np.rint(img16 * (255.0 / 16.0)), 0, 255).astype(np.uint8)
        image = np.repeat(grey[:, :, None], 3, axis=2)
        ink = (img16 >= INK_THRESHOLD).astype(np.uint8)
        rows, cols = np.nonzero(ink)
        boxes = np.array([[y, cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]], dtype=np.float64)
        return Decoded(image=image, masks={"ink": ink}, boxes=boxes)
