"""Reduced-scale JPEG decoding inside builds: same geometry, near-identical pixels."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from satdata.build import BuildConfig, build
from satdata.sources._base import SourceImage, image_hw, read_image, set_reduced_decode
from satdata.store import open_store


def _photo(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.random((h // 40 + 2, w // 40 + 2, 3)).astype(np.float32)
    img = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def _tree(root: Path, n: int = 6) -> None:
    for i in range(n):
        cls = f"c{i % 2}"
        (root / "images" / cls).mkdir(parents=True, exist_ok=True)
        (root / "masks" / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(_photo(384, 512, i)).save(root / "images" / cls / f"{i}.jpg", quality=92)
        m = np.zeros((384, 512), np.uint8)
        m[60 + 10 * i:300, 100:400 - 20 * i] = 1
        Image.fromarray(m, "L").save(root / "masks" / cls / f"{i}.png")


def test_read_image_reduces_only_when_asked(tmp_path: Path) -> None:
    p = tmp_path / "x.jpg"
    Image.fromarray(_photo(384, 512, 0)).save(p, quality=92)
    try:
        set_reduced_decode((32, 32), "stretch")
        img = read_image(p)
        assert isinstance(img, SourceImage) and img.shape[0] < 384
        assert img.shape[0] >= 64 and img.shape[1] >= 64  # at least 2x what the resize needs
        assert image_hw(img) == (384, 512)
        set_reduced_decode((256, 256), "stretch")  # too close to the source: full decode
        assert read_image(p).shape[:2] == (384, 512)
    finally:
        set_reduced_decode(None)
    full = read_image(p)
    assert type(full) is np.ndarray and full.shape[:2] == (384, 512) and image_hw(full) == (384, 512)


def test_reduced_decode_build_matches_full_decode(tmp_path: Path) -> None:
    _tree(tmp_path / "data")
    stores = {}
    for reduced in (True, False):
        out = tmp_path / f"s{int(reduced)}.zarr"
        build(BuildConfig(source="folder-masks", root=str(tmp_path / "data"), out=str(out),
                          size=(32, 32), fit="crop", progress=False, reduced_decode=reduced))
        stores[reduced] = open_store(out)
    a = stores[True].load("train", "images").astype(int)
    b = stores[False].load("train", "images").astype(int)
    assert np.abs(a - b).mean() < 2.0 and np.abs(a - b).max() <= 16
    # maps come from full-resolution masks with the same geometry: identical
    for name in stores[True].info.maps:
        assert np.array_equal(stores[True].load("train", "saliency", name),
                              stores[False].load("train", "saliency", name))
    assert stores[True].info.provenance["reduced_decode"] is True
