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
