"""Format version 2: images and maps of large images in shards (Zarr's sharding codec).

A 224x224 store with a few dozen samples in shards of 8 (the default is 512: the layout
arithmetic is checked for ImageNet's 1.28 million without writing them), read, verified,
damaged, streamed, packed and fetched; and the stores written before (version 1) still
read the same.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from satdata import chunkio
from satdata.errors import StoreError
from satdata.store import (FORMAT_VERSION, Layout, MapInfo, ArrayWriter, chunk_key, files_per_array, iter_chunks,
                           open_store, read_rows_into, sample_layout, samples_per_shard, uses_shards, write_rows,
                           write_unit)
from satdata.verify import verify_digests

H = W = 224
SHARD = 8
SPLITS = {"train": 20, "test": 5}  # train: shards of 8, 8 and 4 samples; test: one shard of 5


def indexed(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images whose pixel (0, 0) holds the sample index, a binary map, and labels; sample 3
    is all black and its map empty (inner chunks of fill values are not stored)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, H, W, 3), dtype=np.uint8)
    images[:, 0, 0, 0], images[:, 0, 0, 1] = np.arange(n) % 256, np.arange(n) // 256
    maps = np.zeros((n, H, W), dtype=np.uint8)
    for i in range(n):
        maps[i, 10 + i:60 + 2 * i, 20:120] = 1
    if n > 3:
        images[3] = 0
        maps[3] = 0
    return images, maps, (np.arange(n) % 3).astype(np.int64)


def write_store(path: Path, shard: int | None = SHARD, order: str = "forward") -> dict[str, tuple]:
    w = ArrayWriter(path, dataset="big", classes=["a", "b", "c"], image_size=(H, W), label_kind="single",
                    maps={"mask": MapInfo(name="mask", encoding="binary", kind="mask")})
    if shard is not None:
        w.shard = shard
    data = {}
    for split, n in SPLITS.items():
        images, maps, labels = data[split] = indexed(n, seed=len(split))
        w.create_split(split, n)
        u = w.split_chunk[split]
        starts = list(range(0, n, u))
        for a in (starts if order == "forward" else starts[::-1]):  # whole write units, in any order
            b = min(n, a + u)
            w.write(split, a, images[a:b], labels[a:b], [f"{split}{i}" for i in range(a, b)], {"mask": maps[a:b]})
        w.close_split(split, n)
    w.finish({"source": "tests/test_sharding.py"})
    return data


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, tuple]]:
    path = tmp_path_factory.mktemp("sharding") / "big.zarr"
    return path, write_store(path)


def shard_file(store: Path, array: str, i: int) -> Path:
    return store / array / "c" / str(i) / "0" / "0" / ("0" if array.endswith("images") else "")


# --------------------------------------------------------------------------- layout


def test_layout_arithmetic_for_imagenet() -> None:
    """ImageNet-1k at 224x224: 2,503 files per array for the 1,281,167 training images
    (160,146 one-chunk files at version 1's 8 samples per chunk), 98 for the 50,000 val."""
    assert uses_shards((224, 224)) and not uses_shards((32, 32)) and not uses_shards((64, 64))
    assert not uses_shards((96, 96)) and uses_shards((112, 112))  # the threshold: 32 KiB of image per sample
    assert sample_layout((224, 224), 1_281_167) == Layout(chunk=1, shard=512)
    assert 64 << 20 <= samples_per_shard((224, 224)) * 224 * 224 * 3 <= 128 << 20  # 77 MB per shard
    assert files_per_array(1_281_167, (224, 224)) == 2_503
    assert files_per_array(50_000, (224, 224)) == 98
    assert files_per_array(300, (224, 224)) == 1 and sample_layout((224, 224), 300) == Layout(1, 300)
    # small images keep version 1's layout exactly: one chunk per file
    assert sample_layout((32, 32), 50_000) == Layout(chunk=512) and files_per_array(50_000, (32, 32)) == 98
    assert sample_layout((64, 64), 100_000) == Layout(chunk=128)
    assert sample_layout((512, 512), 10**6).shard == 128  # 100 MB shards of large images


def test_a_sharded_store_is_version_2_and_reads_back(big: tuple[Path, dict]) -> None:
    path, data = big
    st = open_store(path)
    assert st.info.format_version == 2 == FORMAT_VERSION
    for split, (images, maps, labels) in data.items():
        arr = st.array(split, "images")
        assert arr.shards == (min(SHARD, len(images)), H, W, 3) and arr.chunks == (1, H, W, 3)
        assert write_unit(arr) == min(SHARD, len(images))
        rec = st.info.digests[f"{split}/images"]
        assert rec["chunk_size"] == write_unit(arr) and len(rec["chunks"]) == len(list(iter_chunks(arr)))
        assert np.array_equal(st.load(split, "images"), images)
        assert np.array_equal(st.load(split, "saliency", "mask"), maps)
        assert np.array_equal(st.load(split, "labels"), labels)
        assert np.array_equal(np.asarray(arr[4]), images[4])  # one sample through zarr: one inner chunk
    train = st.array("train", "images")
    assert list(iter_chunks(train)) == [(0, 8), (8, 16), (16, 20)]
    # files on disk: one per shard, each 8 raw images and its index (sample 3 is black: not stored)
    assert sorted(p.name for p in (path / "train" / "images" / "c").iterdir()) == ["0", "1", "2"]
    assert shard_file(path, "train/images", 0).stat().st_size == 7 * H * W * 3 + 16 * 8 + 4
    assert shard_file(path, "train/images", 2).stat().st_size == 4 * H * W * 3 + 16 * 8 + 4
    # any row range, across shard boundaries, as zarr reads it
    images = data["train"][0]
    for start, stop in ((0, 20), (3, 4), (5, 13), (7, 17), (16, 20)):
        out = np.empty((stop - start, H, W, 3), np.uint8)
        read_rows_into(train, start, stop, out)
        assert np.array_equal(out, images[start:stop]), (start, stop)
    assert np.array_equal(np.asarray(train[5:13]), images[5:13])


def test_default_layout_shards_of_512(tmp_path: Path) -> None:
    """Without an override a 224x224 split smaller than 512 samples is one shard of its size."""
    write_store(tmp_path / "d.zarr", shard=None)
    st = open_store(tmp_path / "d.zarr")
    assert st.info.format_version == 2
    assert st.array("train", "images").shards == (20, H, W, 3) and write_unit(st.array("test", "images")) == 5
    assert verify_digests(st).ok


def test_whole_units_in_any_order_write_the_same_bytes(big: tuple[Path, dict], tmp_path: Path) -> None:
    """Determinism: a build that writes its shards in another order (as the processes of a
    distributed build do) makes byte-identical files, hence identical digests."""
    path, _ = big
    write_store(tmp_path / "r.zarr", order="reverse")
    files = lambda root: {p.relative_to(root).as_posix(): p.read_bytes()  # noqa: E731
                          for p in sorted(root.rglob("*")) if p.is_file() and "/c/" in p.as_posix()}
    assert files(path) == files(tmp_path / "r.zarr")
    a, b = open_store(path).info, open_store(tmp_path / "r.zarr").info
    assert a.digests == b.digests


@pytest.mark.parametrize("codec,inner,dtype", [
    (None, 1, "uint8"), (None, 3, "uint8"), ("blosc", 1, "uint8"), ("zstd", 2, "int8"), ("blosc", 512, "uint8"),
])
def test_satkit_encodes_shards_byte_for_byte_as_zarr(tmp_path: Path, codec: str | None, inner: int,
                                                     dtype: str) -> None:
    """write_rows' encoder (whole shards, for speed) writes exactly zarr's bytes: ragged last
    shard, inner chunks and shards of fill values only (not stored), any inner chunk size."""
    from zarr.codecs import BloscCodec, ZstdCodec

    comp = {None: None, "blosc": BloscCodec(cname="lz4", clevel=5, shuffle="noshuffle", typesize=1),
            "zstd": ZstdCodec(level=3)}[codec]
    n, shard = 1100, 512 if inner == 512 else 60 * inner
    rng = np.random.default_rng(inner)
    values = rng.integers(0, 3, size=(n, 6, 5)).astype(dtype)
    values[4:9] = 0
    values[shard:2 * shard] = 0  # a whole shard of fill values: no file
    g = zarr.open_group(str(tmp_path / "e.zarr"), mode="w")
    arrs = [g.create_array(name, shape=values.shape, dtype=dtype, chunks=(inner, 6, 5), shards=(shard, 6, 5),
                           compressors=comp, fill_value=0) for name in ("zarr", "satkit")]
    for a in range(0, n, shard):
        arrs[0][a:a + shard] = values[a:a + shard]
    write_rows(arrs[1], 0, values)
    for i in range(len(list(iter_chunks(arrs[0])))):
        mine, theirs = tmp_path / "e.zarr" / chunk_key(arrs[1], i), tmp_path / "e.zarr" / chunk_key(arrs[0], i)
        assert mine.exists() == theirs.exists(), i
        assert not mine.exists() or mine.read_bytes() == theirs.read_bytes(), i
    assert np.array_equal(np.asarray(arrs[1][:]), values)


# --------------------------------------------------------------------------- damage


def test_verify_locates_a_damaged_shard(big: tuple[Path, dict], tmp_path: Path) -> None:
    path, _ = big
    store = tmp_path / "s.zarr"
    shutil.copytree(path, store)
    f = shard_file(store, "train/images", 1)
    original = f.read_bytes()
    data = bytearray(original)
    data[H * W * 3 * 2 + 17] ^= 0xFF  # a pixel of sample 10
    f.write_bytes(bytes(data))
    rep = verify_digests(open_store(store))
    assert [(p.array, p.start, p.stop) for p in rep.problems] == [("train/images", 8, 16)], rep.problems
    assert "shard 1 file digest mismatch" in str(rep.problems[0])
    # the index: its crc32c fails, and verify and a load both name the shard
    data = bytearray(original)
    data[-10] ^= 0xFF
    f.write_bytes(bytes(data))
    rep = verify_digests(open_store(store))
    assert any(p.start == 8 and "shard 1 cannot be read" in p.what and "crc32c" in p.what for p in rep.problems)
    with pytest.raises(StoreError, match=r"array train/images shard 1 \(samples \[8, 16\)\): its shard index fails "
                                         r"its crc32c check; the store is damaged"):
        open_store(store).load("train", "images")
    # truncated: found when the array is opened, by its size
    f.write_bytes(original[:-100])
    with pytest.raises(StoreError, match=r"train/images shard 1 \(samples \[8, 16\)\) has .* bytes, which no shard"):
        open_store(store).array("train", "images")
    # a map's shard missing: never zeros
    f.write_bytes(original)
    shard_file(store, "train/saliency/mask", 2).unlink()
    with pytest.raises(StoreError, match=r"train/saliency/mask shard 2 \(samples \[16, 20\)\) is missing"):
        open_store(store).load("train", "saliency", "mask")
    rep = verify_digests(open_store(store))
    assert [(p.array, p.start, p.stop, "shard 2 file is missing" in p.what) for p in rep.problems] == [
        ("train/saliency/mask", 16, 20, True)]


def test_a_shard_deleted_under_a_reader_stops_it(big: tuple[Path, dict], tmp_path: Path) -> None:
    from satdata.store import StoreChangedError

    path, _ = big
    store = tmp_path / "s.zarr"
    shutil.copytree(path, store)
    st = open_store(store)
    arr = st.array("train", "images")
    shard_file(store, "train/images", 2).unlink()
    with pytest.raises(StoreChangedError, match=r"array train/images shard 2 \(samples \[16, 20\)\) is missing: "
                                                r"deleted after"):
        st.check_unchanged(["train/images"], chunks=[(arr, [0, 1, 2])])


# --------------------------------------------------------------------------- streaming and sharing


def test_streaming_reads_whole_shards(big: tuple[Path, dict]) -> None:
    """StreamingSplit's unit is the file: blocks of whole shards, every sample once per epoch."""
    import torch

    from sattrain.data import StreamingSplit

    path, data = big
    images, maps, labels = data["train"]
    st = open_store(path)
    per_sample = H * W * 3 + H * W + 8
    split = StreamingSplit(st, "train", ("mask",), np.arange(20), torch.device("cpu"), 5 * per_sample * 8)
    assert [c[:2] for c in split.chunks] == [(0, 8), (8, 16), (16, 20)]
    seen = []
    for batch in split.batches(4, torch.Generator().manual_seed(0), "mask"):
        idx = (batch.images[:, 0, 0, 0].long() + 256 * batch.images[:, 0, 0, 1].long()).numpy()
        idx[(batch.images.reshape(len(idx), -1) == 0).all(axis=1).numpy()] = 3  # the black sample
        assert np.array_equal(batch.images.numpy(), images[idx])
        assert np.array_equal(batch.maps.numpy(), maps[idx]) and np.array_equal(batch.labels.numpy(), labels[idx])
        seen += idx.tolist()
    assert sorted(seen) == list(range(20))


def test_pack_and_fetch_a_sharded_store(big: tuple[Path, dict], tmp_path: Path) -> None:
    """A packed sharded store holds one entry per shard, verifies and reads in place; fetched
    over HTTP it is one bounded GET per shard, and the copy is the same store."""
    from satdata.share import fetch, pack
    from tests.httpserver import serve

    path, data = big
    zipped = tmp_path / "srv" / "big.zip"
    pack(path, zipped, progress=False)
    pack(path, tmp_path / "again.zip", progress=False)
    assert zipped.read_bytes() == (tmp_path / "again.zip").read_bytes()
    import zipfile

    names = zipfile.ZipFile(zipped).namelist()
    assert [n for n in names if n.startswith("train/images/c/")] == [f"train/images/c/{i}/0/0/0" for i in range(3)]
    zs = open_store(zipped)
    assert verify_digests(zs).ok
    assert np.array_equal(zs.load("train", "images"), data["train"][0])  # sharded in a zip: chunkio, per shard
    shutil.copytree(path, tmp_path / "srv" / "big.zarr")
    with serve(tmp_path / "srv") as http:
        fetch(f"{http.url}/big.zarr", tmp_path / "got.zarr", progress=False)
        shard_gets = [r for r in http.requests if "/images/c/" in r.path]
        assert len(shard_gets) == 4 and all(r.range and r.range.startswith("bytes=0-") for r in shard_gets)
        remote = open_store(f"{http.url}/big.zarr")
        http.clear_requests()
        assert np.array_equal(remote.load("train", "saliency", "mask"), data["train"][1])
        reads = [r for r in http.requests if "/mask/c/" in r.path and r.range]  # (besides the presence checks)
        assert len(reads) == 3 and all(r.range.startswith("bytes=0-") for r in reads)  # one bounded GET per shard
    got = open_store(tmp_path / "got.zarr")
    assert got.info.digests == open_store(path).info.digests and verify_digests(got).ok


def test_gc_removes_a_replaced_sharded_map(big: tuple[Path, dict], tmp_path: Path) -> None:
    from satdata.addmap import NewMap, add_map
    from satdata.gc import collect

    path, data = big
    store = tmp_path / "s.zarr"
    shutil.copytree(path, store)

    def produce(split: str):
        yield 1 - data[split][1]  # the complement, one block per split

    add_map(store, NewMap(name="mask", encoding="binary", kind="mask"), produce, overwrite=True)
    st = open_store(store)
    arr = st.array("train", "saliency", "mask")
    assert arr.shards == (SHARD, H, W) and st.info.digests[arr.path]["chunk_size"] == SHARD
    assert np.array_equal(st.load("train", "saliency", "mask"), 1 - data["train"][1]) and verify_digests(st).ok
    removed = [p for p, _ in collect(store).removed]
    assert removed == ["train/saliency/mask", "test/saliency/mask"]
    assert verify_digests(open_store(store)).ok


# --------------------------------------------------------------------------- version 1 stores


def test_version_1_stores_still_read(digits_store: Path, tmp_path: Path) -> None:
    """A store as satkit wrote it before shards (format version 1, maps in zstd level 3, one
    chunk per file) opens, loads (the zstd maps decoded by satkit) and verifies as before."""
    from zarr.codecs import ZstdCodec

    import satdata.store as store_mod

    st = open_store(digits_store)
    assert st.info.format_version == 1 and st.array("train", "images").shards is None
    w = ArrayWriter(tmp_path / "v1.zarr", dataset="v1", classes=["a", "b"], image_size=(8, 8),
                    label_kind="single", maps={"m": MapInfo(name="m", encoding="unit", kind="cam")})
    w.chunk = 16
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (50, 8, 8, 3), dtype=np.uint8)
    maps = rng.integers(0, 256, (50, 8, 8), dtype=np.uint8)
    old = store_mod.map_compressors
    store_mod.map_compressors = lambda: ZstdCodec(level=3)  # what version 1 stores hold
    try:
        w.create_split("train", 50)
    finally:
        store_mod.map_compressors = old
    for a in range(0, 50, 16):
        w.write("train", a, images[a:a + 16], np.zeros(len(images[a:a + 16]), np.int64),
                [str(i) for i in range(a, min(50, a + 16))], {"m": maps[a:a + 16]})
    w.close_split("train", 50)
    w.finish({})
    meta = json.loads((tmp_path / "v1.zarr" / "train" / "saliency" / "m" / "zarr.json").read_text())
    assert [c["name"] for c in meta["codecs"]] == ["bytes", "zstd"]
    v1 = open_store(tmp_path / "v1.zarr")
    assert v1.info.format_version == 1 and chunkio.file_format(v1.array("train", "saliency", "m").metadata).codec == "zstd"
    assert np.array_equal(v1.load("train", "saliency", "m"), maps) and np.array_equal(v1.load("train", "images"), images)
    assert verify_digests(v1).ok
