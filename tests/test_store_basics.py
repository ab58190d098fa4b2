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
    assert st.info.format_version == 1  # small images: unsharded, readable by every version-1 reader
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
    from satdata.chunkio import file_format
    from satdata.store import read_rows_into

    st = open_store(digits_store)
    images = st.array("train", "images")
    assert file_format(images.metadata).codec == "plain"  # images are stored plain: read straight into out
    ink = st.array("train", "saliency", "ink")
    assert file_format(ink.metadata).codec == "blosc"  # maps: decoded by satkit, not zarr
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


def _set_attr(store: Path, **changes: object) -> None:
    """Change (value) or remove (None) keys of a store's 'satkit' attribute in place."""
    meta = json.loads((store / "zarr.json").read_text())
    for k, v in changes.items():
        if v is None:
            meta["attributes"]["satkit"].pop(k, None)
        else:
            meta["attributes"]["satkit"][k] = v
    (store / "zarr.json").write_text(json.dumps(meta))


def test_hflip_says_whether_a_mirror_keeps_the_class(digits_store: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from satdata.cli import main
    from satdata.store import MapInfo, ArrayWriter

    st = open_store(digits_store)
    assert st.info.hflip is False  # digits declare it: a mirrored 2 is not a 2
    assert json.loads((digits_store / "zarr.json").read_text())["attributes"]["satkit"]["hflip"] is False
    res = CliRunner().invoke(main, ["info", str(digits_store)])
    assert res.exit_code == 0 and "hflip       no (a horizontal flip can change the class" in res.output
    res = CliRunner().invoke(main, ["info", str(digits_store), "--json"])
    assert json.loads(res.output)["hflip"] is False

    # other writers default to True; a store written before the key existed reads as True
    w = ArrayWriter(tmp_path / "w.zarr", dataset="x", classes=["a", "b"], image_size=(2, 2), label_kind="single",
                    maps={"m": MapInfo("m", "binary", "mask")})
    w.create_split("train", 2)
    w.write("train", 0, np.zeros((2, 2, 2, 3), np.uint8), np.array([0, 1]), ["p", "q"],
            {"m": np.zeros((2, 2, 2), np.uint8)})
    w.close_split("train", 2)
    assert w.finish({}).hflip is True and open_store(tmp_path / "w.zarr").info.hflip is True
    old = tmp_path / "old.zarr"
    shutil.copytree(digits_store, old)
    _set_attr(old, hflip=None)
    assert open_store(old).info.hflip is True
    res = CliRunner().invoke(main, ["info", str(old)])
    assert "hflip       yes" in res.output
    for bad in ("no", 0, 1, [True]):
        _set_attr(old, hflip=bad)
        with pytest.raises(StoreError) as e:
            open_store(old)
        msg = str(e.value)
        assert str(old) in msg and f"hflip={bad!r}" in msg and "\n" not in msg
    with pytest.raises(ValueError, match="hflip must be a bool"):
        ArrayWriter(tmp_path / "v.zarr", dataset="x", classes=["a"], image_size=(2, 2), label_kind="single",
                    maps={}, hflip="yes")  # type: ignore[arg-type]


def test_map_targets_are_declared_validated_and_optional(digits_store: Path, tmp_path: Path) -> None:
    from satdata.addmap import NewMap, add_map
    from satdata.store import TARGETS_GROUP, array_path
    from satdata.verify import verify_digests

    copy = tmp_path / "c.zarr"
    shutil.copytree(digits_store, copy)
    st = open_store(copy)
    labels = {s: st.load(s, "labels") for s in st.info.splits}

    def produce(split: str):  # noqa: ANN202
        ink = st.load(split, "saliency", "ink")
        for a in range(0, len(ink), 300):  # blocks that do not line up with chunks
            yield ink[a:a + 300], (labels[split][a:a + 300] + 1) % 10

    info = add_map(copy, NewMap("t", "binary", "mask", targets=True), produce)
    mi = info.maps["t"]
    assert mi.targets and array_path("train", TARGETS_GROUP, mi.array_name) == f"train/map_targets/{mi.array_name}"
    st = open_store(copy)
    for s in st.info.splits:
        assert np.array_equal(st.map_targets(s, "t"), (labels[s] + 1) % 10)
        assert st.map_targets(s, "t").dtype == np.int64
    assert st.map_targets("train", "ink") is None
    with pytest.raises(StoreError, match="map 'ink' records no target classes"):
        st.array("train", "map_targets", "ink")
    with pytest.raises(StoreError, match="no saliency map 'nope'"):
        st.map_targets("train", "nope")
    assert verify_digests(st).ok

    # a map without targets does not get any: maps added the old way stay as they were
    plain = add_map(copy, NewMap("p", "binary", "mask"), lambda s: iter([st.load(s, "saliency", "ink")]))
    assert not plain.maps["p"].targets and not (copy / "train" / "map_targets" / "p").exists()
    # a producer that forgets the targets of a map that has them is refused, nothing written
    with pytest.raises(Exception, match="needs \\(values, targets\\) blocks"):
        add_map(copy, NewMap("q", "binary", "mask", targets=True), lambda s: iter([st.load(s, "saliency", "ink")]))
    assert "q" not in open_store(copy).info.maps
    assert not any(p.name.startswith("q.") for p in (copy / "train" / "map_targets").iterdir())

    # replacing part of a map that had no targets: the kept split's targets are unknown (-1)
    def train_only(split: str):  # noqa: ANN202
        assert split == "train"
        yield st.load(split, "saliency", "ink"), labels[split]

    add_map(copy, NewMap("p", "binary", "mask", targets=True), train_only, splits=["train"], overwrite=True)
    st2 = open_store(copy)
    assert np.array_equal(st2.map_targets("train", "p"), labels["train"])
    assert (st2.map_targets("test", "p") == -1).all() and verify_digests(st2).ok

    # the format promises the targets array: missing or misshapen, the store is refused
    shutil.rmtree(copy / "test" / "map_targets" / mi.array_name)
    with pytest.raises(StoreError, match=f"lacks array test/map_targets/{mi.array_name}"):
        open_store(copy)
    meta = json.loads((copy / "zarr.json").read_text())
    meta["attributes"]["satkit"]["maps"]["t"]["targets"] = "yes"
    (copy / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="map 't' has targets='yes'"):
        open_store(copy)


def test_hflip_comes_from_the_source_and_survives_h5_export(digits_store: Path, tmp_path: Path) -> None:
    import h5py

    from satdata.build import BuildConfig, build
    from satdata.errors import SourceError
    from satdata.export import export_h5
    from satdata.sources import get_source_class, source_names

    assert get_source_class("digits").hflip is False
    assert all(get_source_class(n).hflip is True for n in source_names() if n not in ("digits", "h5"))
    h5 = export_h5(open_store(digits_store), tmp_path / "d.h5", progress=False)
    # copies made now: the h5 source keeps the files it reads open in this process
    absent, bad = shutil.copy(h5, tmp_path / "absent.h5"), shutil.copy(h5, tmp_path / "bad.h5")
    with h5py.File(h5, "r") as f:
        assert bool(f.attrs["hflip"]) is False
    with h5py.File(absent, "r+") as f:
        del f.attrs["hflip"]
    with h5py.File(bad, "r+") as f:
        f.attrs["hflip"] = "no"
    back = build(BuildConfig(source="h5", root=str(h5), out=str(tmp_path / "back.zarr"), size=(16, 16),
                             progress=False))
    assert back.info.hflip is False and open_store(tmp_path / "back.zarr").info.hflip is False
    assert build(BuildConfig(source="h5", root=str(absent), out=str(tmp_path / "b2.zarr"), size=(16, 16),
                             progress=False)).info.hflip is True
    with pytest.raises(SourceError, match="attribute 'hflip' must be a boolean"):
        build(BuildConfig(source="h5", root=str(bad), out=str(tmp_path / "b3.zarr"), size=(16, 16), progress=False))
