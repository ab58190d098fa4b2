"""satdata/chunkio.py over a real S3 server: the same values as zarr, one request per chunk,
a bounded number in flight; streaming, loading and verify over S3 give what they give locally."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from satdata import chunkio
from satdata.store import iter_chunks, open_store
from satdata.verify import verify_digests
from sattrain.data import StreamingSplit, load_split, make_generator
from tests.s3server import DelayProxy, SeaweedS3

pytestmark = pytest.mark.usefixtures("one_thread")


def upload(s3: SeaweedS3, local: Path) -> str:
    bucket = f"c-{uuid.uuid4().hex[:8]}"
    s3.make_bucket(bucket)
    s3.upload(local, f"{bucket}/{local.name}")
    return f"s3://{bucket}/{local.name}"


@pytest.fixture(scope="module")
def remote_digits(s3: SeaweedS3, digits_store: Path) -> str:
    return upload(s3, digits_store)


def test_read_chunks_equals_zarr(s3: SeaweedS3, digits_store: Path, remote_digits: str) -> None:
    """Every chunk of every array (images, maps, labels, ids, boxes; edge chunks trimmed) as zarr reads it."""
    local = open_store(digits_store)
    remote = open_store(remote_digits, storage_options=s3.storage_options(readonly=True))
    for path in sorted(local.info.digests):
        la, ra = local.group[path], remote.group[path]
        chunks = list(iter_chunks(la))
        got = chunkio.read_chunks([(ra, i) for i in range(len(chunks))], concurrency=3)
        for (a, b), values in zip(chunks, got):
            want = np.asarray(la[a:b])
            assert values.shape == want.shape and values.tolist() == want.tolist(), (path, a, b)


def test_one_request_per_chunk_bounded_in_flight(s3: SeaweedS3, tmp_path: Path) -> None:
    import zarr

    local = tmp_path / "a.zarr"
    arr = zarr.create_array(str(local), shape=(24, 5), chunks=(2, 5), dtype="int32", compressors=None)
    arr[:] = np.arange(120, dtype=np.int32).reshape(24, 5)
    url = upload(s3, local)
    with DelayProxy(s3.endpoint, 0.05) as proxy:
        ra = zarr.open_array(url, mode="r", storage_options={**s3.storage_options(), "endpoint_url": proxy.endpoint})
        before = proxy.requests
        got = chunkio.read_chunks([(ra, i) for i in range(12)], concurrency=4)
        assert proxy.requests - before == 12  # one GET per chunk: no HEAD first
        assert 2 <= proxy.max_in_flight <= 4
        assert np.array_equal(np.concatenate(got), np.arange(120).reshape(24, 5))
        seen = [i for _, i, _, _ in chunkio.iter_chunk_files(((ra, i) for i in range(12)), concurrency=3)]
        assert seen == list(range(12)) and proxy.max_in_flight <= 4


def test_streaming_and_loading_over_s3_match_local(s3: SeaweedS3, digits_store: Path, remote_digits: str) -> None:
    local = open_store(digits_store)
    remote = open_store(remote_digits, storage_options=s3.storage_options(readonly=True))
    n = local.info.splits["train"]
    idx = np.sort(np.random.default_rng(0).choice(n, size=n - 100, replace=False))  # a subset: partial chunks
    maps = ("ink",)
    # a budget of about 2 chunks per block: several blocks, each read concurrently
    splits = [StreamingSplit(st, "train", maps, idx, torch.device("cpu"), 2 * 1024 * 1100) for st in (local, remote)]
    assert splits[0].block_samples < len(idx)
    for epoch in range(2):
        got = [list(sp.batches(64, make_generator("cpu", epoch), "ink")) for sp in splits]
        assert len(got[0]) == len(got[1]) > 2
        for a, b in zip(*got):
            assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) and torch.equal(a.maps, b.maps)
    hl = load_split(local, "train", maps, np.arange(n), progress=False)
    hr = load_split(remote, "train", maps, np.arange(n), progress=False)
    assert np.array_equal(hl.images, hr.images) and np.array_equal(hl.labels, hr.labels)
    assert np.array_equal(hl.maps["ink"], hr.maps["ink"])
    assert np.array_equal(local.load("test", "saliency", "box"), remote.load("test", "saliency", "box"))


def test_verify_over_s3_reports_as_locally(s3: SeaweedS3, digits_store: Path, remote_digits: str, tmp_path: Path) -> None:
    remote = open_store(remote_digits, storage_options=s3.storage_options(readonly=True))
    rep = verify_digests(remote)
    assert rep.ok and rep.checked == verify_digests(open_store(digits_store)).checked
    damaged = tmp_path / "d.zarr"
    shutil.copytree(digits_store, damaged)
    f = damaged / "train" / "images" / "c" / "1" / "0" / "0" / "0"
    data = bytearray(f.read_bytes())
    data[1000] ^= 0xFF
    f.write_bytes(bytes(data))
    (damaged / "test" / "labels" / "c" / "0").write_bytes(b"")
    want = verify_digests(open_store(damaged))
    url = upload(s3, damaged)
    got = verify_digests(open_store(url, storage_options=s3.storage_options(readonly=True)), concurrency=2)
    assert [str(p) for p in got.problems] == [str(p) for p in want.problems]
    assert {(p.array, p.start) for p in got.problems} == {("train/images", 1024), ("test/labels", 0)}
