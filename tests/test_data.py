"""Training data: reading splits, placement, streaming with prefetch, augmentation, maps."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from satdata.errors import SatkitError, StoreError
from satdata.store import MapInfo, Store, ArrayWriter, array_path, open_store, read_info
from sattrain import data as D
from sattrain.data import (
    EvalSplit,
    InMemorySplit,
    RawBatch,
    StreamingSplit,
    choose_maps,
    crop_flip,
    derive_seed,
    load_split,
    map_codec,
    num_batches,
    open_train_split,
    plan_placement,
    prepare_batch,
    select_indices,
)

CPU = torch.device("cpu")


def indexed_store(path: Path, n: int = 150, chunk: int = 16, size: int = 6) -> Path:
    """A store whose samples carry their own index: image pixel (0, 0) = (i % 256, i // 256, 7),
    label i % 5, and map 'idx' = 1 on row 0 iff i is odd (so a map can be checked against its image).
    Small chunks, so a tiny split spans many chunks."""
    w = ArrayWriter(path, dataset="indexed", classes=[f"c{k}" for k in range(5)], image_size=(size, size),
                    label_kind="single", maps={"idx": MapInfo(name="idx", encoding="binary", kind="mask")})
    w.chunk = chunk  # small chunks: a tiny split still spans many (the format allows any chunk size)
    for split, count in (("train", n), ("test", 40)):
        w.create_split(split, count)
        i = np.arange(count)
        images = np.zeros((count, size, size, 3), np.uint8)
        images[:, :, :, 2] = 200
        images[:, 0, 0, 0] = i % 256
        images[:, 0, 0, 1] = i // 256
        images[:, 0, 0, 2] = 7
        maps = np.zeros((count, size, size), np.uint8)
        maps[i % 2 == 1, 0, :] = 1
        for a in range(0, count, chunk):
            b = min(count, a + chunk)
            w.write(split, a, images[a:b], (i[a:b] % 5).astype(np.int64), [f"s{k}" for k in range(a, b)],
                    {"idx": maps[a:b]})
        w.close_split(split, count)
    w.finish({"source": "test"})
    return path


def sample_ids(images: torch.Tensor) -> list[int]:
    return (images[:, 0, 0, 0].long() + 256 * images[:, 0, 0, 1].long()).tolist()


@pytest.fixture(scope="module")
def istore(tmp_path_factory: pytest.TempPathFactory) -> Store:
    return open_store(indexed_store(tmp_path_factory.mktemp("idx") / "idx.zarr"))


# --------------------------------------------------------------------------- reading


def test_load_split_reads_exactly_the_chosen_rows(digits_store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    st = open_store(digits_store)
    # slabs of one chunk, so the read spans several slabs and skips some
    monkeypatch.setattr(D, "SLAB_BYTES", 1)
    idx = select_indices(st.info.splits["train"], 100, seed=3)
    assert len(idx) == 100 and np.all(np.diff(idx) > 0)
    host = load_split(st, "train", ["ink", "box"], idx, progress=False)
    assert np.array_equal(host.images, st.load("train", "images")[idx])
    assert np.array_equal(host.labels, st.load("train", "labels")[idx])
    assert np.array_equal(host.maps["box"], st.load("train", "saliency", "box")[idx])
    assert np.array_equal(select_indices(10, None, 0), np.arange(10))
    assert np.array_equal(select_indices(10, 50, 0), np.arange(10))


def test_in_memory_epoch_sees_every_sample_once(istore: Store) -> None:
    idx = select_indices(150, 101, seed=1)
    split = open_train_split(istore, "train", ["idx"], idx, CPU, 1 << 30, progress=False)
    assert isinstance(split, InMemorySplit) and split.placement == "device"
    seen: list[int] = []
    sizes = []
    for raw in split.batches(32, torch.Generator().manual_seed(0), "idx"):
        ids = sample_ids(raw.images)
        seen += ids
        sizes.append(len(ids))
        assert raw.labels.tolist() == [i % 5 for i in ids]
        assert raw.maps is not None and (raw.maps[:, 0, 0] == torch.tensor([i % 2 for i in ids], dtype=torch.uint8)).all()
    assert sorted(seen) == idx.tolist()
    assert sizes == [32, 32, 32, 5] and len(sizes) == num_batches(101, 32)
    again = [sample_ids(r.images) for r in split.batches(32, torch.Generator().manual_seed(0), "idx")]
    assert sum(again, []) == seen  # seeded: the same order
    # a lone last sample is dropped (batch norm needs two)
    split2 = open_train_split(istore, "train", [], select_indices(150, 33, 0), CPU, 1 << 30, progress=False)
    assert [len(r.images) for r in split2.batches(32, torch.Generator().manual_seed(0), None)] == [32]
    assert num_batches(33, 32) == 1


def test_streaming_with_a_tiny_budget(istore: Store) -> None:
    idx = select_indices(150, 120, seed=2)
    per_sample = D.sample_bytes(istore, "train", ["idx"])
    budget = 2 * 20 * per_sample  # blocks of 20 samples: chunks of 16 -> one or two chunks per block
    assert plan_placement(len(idx) * per_sample, CPU, budget) == "stream"
    split = open_train_split(istore, "train", ["idx"], idx, CPU, budget, progress=False)
    assert isinstance(split, StreamingSplit) and split.placement == "stream"
    blocks = split.plan(torch.Generator().manual_seed(5))
    assert len(blocks) > 3 and sorted(sum(blocks, [])) == list(range(len(split.chunks)))

    def epoch(seed: int) -> list[list[int]]:
        out = []
        for raw in split.batches(32, torch.Generator().manual_seed(seed), "idx"):
            ids = sample_ids(raw.images)
            assert raw.labels.tolist() == [i % 5 for i in ids]
            assert raw.maps is not None
            assert raw.maps[:, 0, 0].tolist() == [i % 2 for i in ids]  # maps travel with their images
            out.append(ids)
        return out

    batches = epoch(7)
    assert sorted(sum(batches, [])) == idx.tolist()  # every selected sample exactly once
    assert [len(b) for b in batches] == [32, 32, 32, 24]  # partial blocks carry over into full batches
    assert epoch(7) == batches  # seeded
    assert epoch(8) != batches
    # the order is shuffled across blocks, not the store's order
    assert sum(batches, []) != sorted(sum(batches, []))
    # the prefetch thread ends with the epoch, and when the consumer stops early
    it = split.batches(32, torch.Generator().manual_seed(1), None)
    first = next(it)
    assert first.maps is None
    it.close()
    assert not any(t.name.startswith("sattrain-prefetch") and t.is_alive() for t in threading.enumerate())


def test_streaming_read_error_is_reported(istore: Store, tmp_path: Path) -> None:
    path = tmp_path / "broken.zarr"
    shutil.copytree(istore.path, path)
    st = open_store(path)
    split = open_train_split(st, "train", [], select_indices(150, None, 0), CPU, 2000, progress=False)
    for chunk_file in (path / "train" / "images" / "c").rglob("*"):
        if chunk_file.is_file():
            chunk_file.write_bytes(b"garbage")
    with pytest.raises(SatkitError, match="reading split train failed"):
        list(split.batches(32, torch.Generator().manual_seed(0), None))


def test_placement_rules() -> None:
    assert plan_placement(10, CPU, 100) == "device"
    assert plan_placement(101, CPU, 100) == "stream"


def test_eval_split_in_order(istore: Store) -> None:
    idx = select_indices(40, 25, seed=4)
    ev = EvalSplit(load_split(istore, "test", (), idx, progress=False), CPU)
    xs = list(ev.batches(10, multilabel=False))
    assert [len(y) for _, y in xs] == [10, 10, 5]
    x = torch.cat([a for a, _ in xs])
    assert x.shape == (25, 3, 6, 6) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    got = (x[:, 0, 0, 0] * 255).round().long() + 256 * (x[:, 1, 0, 0] * 255).round().long()
    assert got.tolist() == idx.tolist()


# --------------------------------------------------------------------------- maps


def test_choose_maps(digits_store: Path, istore: Store, tmp_path: Path) -> None:
    st = open_store(digits_store)
    assert choose_maps(st, (), "sat", True) == ("ink",)  # the store's first map
    assert choose_maps(st, ("box", "ink"), "sat", True) == ("box", "ink")
    assert choose_maps(st, ("box",), "standard", False) == ()
    with pytest.raises(SatkitError, match=r"has no map 'edges' \(maps in the store: ink, box\)"):
        choose_maps(st, ("edges",), "standard", False)
    with pytest.raises(SatkitError, match="named twice"):
        choose_maps(st, ("ink", "ink"), "sat", True)
    codec = map_codec(st, "box")
    assert (codec.scale, codec.offset, codec.encoding) == (2.0, -1.0, "binary")
    # a store without maps: fine for standard, a clear error for sat
    w = ArrayWriter(tmp_path / "nomaps.zarr", dataset="plain", classes=["a", "b"], image_size=(4, 4),
                    label_kind="single", maps={})
    w.create_split("train", 4)
    w.write("train", 0, np.zeros((4, 4, 4, 3), np.uint8), np.array([0, 1, 0, 1]), list("abcd"), {})
    w.close_split("train", 4)
    w.finish({})
    plain = open_store(tmp_path / "nomaps.zarr")
    assert choose_maps(plain, (), "pgd", False) == ()
    with pytest.raises(SatkitError, match=r"--method sat: needs a saliency map, and .*nomaps.zarr has none"):
        choose_maps(plain, (), "sat", True)


def test_map_of_another_size_is_refused(istore: Store, tmp_path: Path) -> None:
    path = tmp_path / "wrong.zarr"
    shutil.copytree(istore.path, path)
    g = zarr.open_group(str(path), mode="r+")
    p = array_path("train", "saliency", "idx")
    del g[p]
    g.create_array(p, shape=(150, 3, 3), dtype="uint8", chunks=(16, 3, 3), fill_value=0)
    g[p][...] = 1  # every chunk written: only the size is wrong (a missing chunk is refused on its own)
    with pytest.raises(StoreError, match=r"saliency/idx has shape \(150, 3, 3\)"):
        open_store(path)  # the store validator is the first line of defence
    unchecked = Store(str(path), g, read_info(g, str(path)))
    with pytest.raises(SatkitError, match=r"map 'idx' of split train is 3x3, its images are 6x6"):
        load_split(unchecked, "train", ["idx"], np.arange(4), progress=False)


def test_prepare_batch_gives_floats_and_S(istore: Store) -> None:
    split = open_train_split(istore, "train", ["idx"], select_indices(150, 64, 0), CPU, 1 << 30, progress=False)
    raw = next(split.batches(16, torch.Generator().manual_seed(0), "idx"))
    b = prepare_batch(raw, map_codec(istore, "idx"), multilabel=False, augment=False, generator=None)
    assert b.x.shape == (16, 3, 6, 6) and b.x.dtype == torch.float32
    assert torch.allclose(b.x[:, 2, 1:, :], torch.full((16, 5, 6), 200 / 255))
    assert b.S is not None and b.S.shape == (16, 1, 6, 6) and set(b.S.unique().tolist()) <= {-1.0, 1.0}
    odd = torch.tensor([i % 2 == 1 for i in sample_ids(raw.images)])
    assert torch.all(b.S[odd, 0, 0, :] == 1) and torch.all(b.S[~odd, 0, 0, :] == -1) and torch.all(b.S[:, 0, 1:] == -1)
    bm = prepare_batch(raw, None, multilabel=True, augment=False, generator=None)
    assert bm.y.dtype == torch.float32 and bm.S is None


# --------------------------------------------------------------------------- augmentation


def test_crop_flip_moves_image_and_map_together() -> None:
    # Each map is a function of its image's pixels (1 where red is odd): a crop or flip
    # applied to one and not the other, or with other offsets, breaks the relation.
    g = torch.Generator().manual_seed(0)
    images = torch.randint(1, 256, (64, 12, 10, 3), dtype=torch.uint8, generator=g)
    maps = (images[..., 0] % 2).to(torch.uint8)
    ai, am = crop_flip(images, maps, generator=torch.Generator().manual_seed(1))
    assert ai.shape == images.shape and am is not None and am.shape == maps.shape
    assert torch.equal(am, (ai[..., 0] % 2).to(torch.uint8))  # padding: 0 in both
    pad = (ai == 0).all(dim=-1)
    assert torch.all(am[pad] == 0)
    assert pad.any() and not torch.equal(ai, images)  # it moved things
    assert pad.all(dim=2).sum(dim=1).max() <= 4 and pad.all(dim=1).sum(dim=1).max() <= 4  # pad 4


def test_crop_flip_matches_a_reference() -> None:
    images = torch.arange(64 * 6 * 5, dtype=torch.int64).view(64, 6, 5, 1) + 1
    out, _ = crop_flip(images, None, generator=torch.Generator().manual_seed(3), padding=2)
    n_flipped = 0
    offsets = set()
    for i in range(64):
        padded = torch.nn.functional.pad(images[i, :, :, 0], (2, 2, 2, 2))
        hits = []
        for oy in range(5):
            for ox in range(5):
                win = padded[oy : oy + 6, ox : ox + 5]
                for flipped, cand in ((False, win), (True, win.flip(1))):
                    if torch.equal(out[i, :, :, 0], cand):
                        hits.append((oy, ox, flipped))
        assert len(hits) == 1  # exactly one crop window, flipped or not, explains the output
        n_flipped += hits[0][2]
        offsets.add(hits[0][:2])
    assert 16 < n_flipped < 48  # flips are fair coins (64 samples: far from 0 and 64)
    assert len(offsets) > 10  # offsets vary per sample
    # single- and multi-channel maps take the same crop
    m1 = torch.ones(64, 6, 5, dtype=torch.uint8)
    m3 = torch.ones(64, 6, 5, 3, dtype=torch.int8)
    _, a = crop_flip(images, m1, generator=torch.Generator().manual_seed(3), padding=2)
    _, b = crop_flip(images, m3, generator=torch.Generator().manual_seed(3), padding=2)
    assert a is not None and b is not None and torch.equal(a.to(torch.int8), b[..., 0])
    assert torch.equal(a.bool(), out[..., 0] > 0)


def _explain(out: torch.Tensor, images: torch.Tensor, padding: int) -> list[tuple[int, int, bool]]:
    """Per sample, the one (oy, ox, flipped) crop of the zero-padded image that gives ``out``."""
    h, w = images.shape[1:3]
    found = []
    for i in range(images.shape[0]):
        padded = torch.nn.functional.pad(images[i, :, :, 0], (padding,) * 4)
        hits = [(oy, ox, flipped)
                for oy in range(2 * padding + 1) for ox in range(2 * padding + 1)
                for flipped, cand in ((False, padded[oy : oy + h, ox : ox + w]),
                                      (True, padded[oy : oy + h, ox : ox + w].flip(1)))
                if torch.equal(out[i, :, :, 0], cand)]
        assert len(hits) == 1
        found.append(hits[0])
    return found


def test_crop_without_flip_never_mirrors() -> None:
    """flip=False (--augment crop, for digits): random crops, and not one mirrored sample."""
    images = torch.arange(64 * 6 * 5, dtype=torch.int64).view(64, 6, 5, 1) + 1
    out, _ = crop_flip(images, None, generator=torch.Generator().manual_seed(3), padding=2, flip=False)
    found = _explain(out, images, 2)
    assert not any(f for _, _, f in found) and len({(oy, ox) for oy, ox, _ in found}) > 10
    flipped, _ = crop_flip(images, None, generator=torch.Generator().manual_seed(3), padding=2, flip=True)
    assert sum(f for _, _, f in _explain(flipped, images, 2)) > 16  # the same call with flips does mirror


def test_prepare_batch_augment_modes() -> None:
    images = (torch.arange(32 * 6 * 5, dtype=torch.int64).view(32, 6, 5, 1) % 250 + 1).to(torch.uint8)
    raw = RawBatch(images, torch.zeros(32, dtype=torch.int64), None)

    def flips(mode: str | bool) -> int | None:
        b = prepare_batch(raw, None, multilabel=False, augment=mode, generator=torch.Generator().manual_seed(5))
        out = (b.x.permute(0, 2, 3, 1) * 255).round().to(torch.int64)
        if torch.equal(out, images.to(torch.int64)):
            return None  # untouched
        return sum(f for _, _, f in _explain(out, images.to(torch.int64), 4))

    assert flips("none") is None and flips(False) is None
    assert flips("crop") == 0
    assert flips("crop+flip") > 4 and flips(True) == flips("crop+flip")  # True: the old spelling of crop+flip
    with pytest.raises(SatkitError, match="--augment: unknown augmentation 'auto'"):
        prepare_batch(raw, None, multilabel=False, augment="auto", generator=None)  # the trainer resolves auto


def test_crop_flip_refuses_mismatched_maps() -> None:
    with pytest.raises(SatkitError, match="do not fit"):
        crop_flip(torch.zeros(2, 4, 4, 3), torch.zeros(2, 4, 5))


# --------------------------------------------------------------------------- seeds


def test_derive_seed_is_stable_and_separates_streams() -> None:
    s = derive_seed(0, 3, "shuffle")
    assert s == derive_seed(0, 3, "shuffle") and 0 <= s < 2**63
    others = {derive_seed(0, 4, "shuffle"), derive_seed(1, 3, "shuffle"), derive_seed(0, 3, "augment"), s}
    assert len(others) == 4
    # pinned: changing the derivation would change every run's numbers (and break resuming old runs)
    assert derive_seed(0, "init") == derive_seed(0, "init") and derive_seed(0, "init") == 2182976526569939397
