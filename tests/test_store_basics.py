"""The store format: open, validate, refuse what is not a store."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from satdata.errors import StoreError
from satdata.store import FORMAT_VERSION, open_store, samples_per_chunk


def test_digits_store_opens_with_expected_contents(digits_store: Path) -> None:
    st = open_store(digits_store)
    assert st.info.format_version == FORMAT_VERSION
    assert st.info.splits == {"train": 1442, "test": 355}
    assert set(st.info.maps) == {"ink", "box"}
    x = st.load("train", "images")
    assert x.shape == (1442, 16, 16, 3) and x.dtype == np.uint8
    ink = st.load("train", "saliency", "ink")
    box = st.load("train", "saliency", "box")
    assert set(np.unique(ink)) <= {0, 1} and set(np.unique(box)) <= {0, 1}
    # every ink pixel lies inside the box drawn around the ink (up to one pixel of rounding)
    assert (ink & (1 - box)).mean() < 0.01
    y = st.load("train", "labels")
    assert sorted(np.unique(y)) == list(range(10))
    ids = st.load("test", "ids")
    assert len(set(ids.tolist())) == 355


def test_not_a_store(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no such store"):
        open_store(tmp_path / "nope.zarr")
    (tmp_path / "plain").mkdir()
    with pytest.raises(StoreError, match="no zarr.json"):
        open_store(tmp_path / "plain")
    zarr.open_group(str(tmp_path / "foreign.zarr"), mode="w").attrs["x"] = 1
    with pytest.raises(StoreError, match="not a satkit store"):
        open_store(tmp_path / "foreign.zarr")


def test_newer_version_and_missing_array(digits_store: Path, tmp_path: Path) -> None:
    copy = tmp_path / "c.zarr"
    shutil.copytree(digits_store, copy)
    meta = json.loads((copy / "zarr.json").read_text())
    meta["attributes"]["satkit"]["format_version"] = FORMAT_VERSION + 1
    (copy / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="newer"):
        open_store(copy)
    meta["attributes"]["satkit"]["format_version"] = FORMAT_VERSION
    (copy / "zarr.json").write_text(json.dumps(meta))
    shutil.rmtree(copy / "test" / "saliency" / "ink")
    with pytest.raises(StoreError, match="lacks array test/saliency/ink"):
        open_store(copy)


def test_chunking_is_by_hundreds_of_samples() -> None:
    assert samples_per_chunk((32, 32)) == 512
    assert 8 <= samples_per_chunk((224, 224)) <= 16
    assert samples_per_chunk((4, 4)) == 1024


def test_fast_reads_equal_zarr_reads(digits_store: Path, tmp_path: Path) -> None:
    """read_rows_into (direct chunk-file reads for plain arrays) returns what zarr returns,
    for any row range, across chunk boundaries, for plain and compressed arrays alike."""
    from satdata.store import _plain_chunk_dir, read_rows_into

    st = open_store(digits_store)
    images = st.array("train", "images")
    assert _plain_chunk_dir(images) is not None  # images are stored plain: the fast path runs
    ink = st.array("train", "saliency", "ink")
    assert _plain_chunk_dir(ink) is None  # zstd: zarr's path
    small = tmp_path / "small.zarr"
    g = zarr.open_group(str(small), mode="w")
    a = g.create_array("x", shape=(23, 2, 3), dtype="uint8", chunks=(5, 2, 3), compressors=None, fill_value=7)
    data = np.arange(23 * 6, dtype=np.uint8).reshape(23, 2, 3)
    a[:10] = data[:10]
    a[15:] = data[15:]  # chunk 2 (rows 10-14) is never written: no file, fill value
    expected = np.asarray(a[:])
    assert (expected[10:15] == 7).all()
    for arr, ref in ((a, expected), (images, np.asarray(images[:])), (ink, np.asarray(ink[:]))):
        n = arr.shape[0]
        for start, stop in ((0, n), (3, 4), (1, n - 1), (n // 2, n)):
            out = np.empty((stop - start,) + arr.shape[1:], dtype=arr.dtype)
            read_rows_into(arr, start, stop, out)
            assert np.array_equal(out, ref[start:stop]), (arr.path, start, stop)
    assert np.array_equal(st.load("train", "images"), np.asarray(images[:]))
