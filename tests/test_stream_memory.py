"""`--memory-budget` bounds a streamed split: the blocks in memory at once fit the budget
(sattrain.data.StreamingSplit, STREAM_BLOCKS_ALIVE), and the process's peak RSS grows
with the budget at most about one for one (bench/stream_memory.py, in subprocesses)."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from satdata.store import MapInfo, Store, ArrayWriter, open_store, samples_per_chunk
from sattrain import data as D
from sattrain.data import (
    STREAM_BLOCKS_ALIVE,
    STREAM_CONSTANT_BYTES,
    StreamingSplit,
    load_split,
    make_generator,
    select_indices,
)

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
FILES = 12  # stored files (chunks) per test store


def random_store(path: Path, size: int) -> Store:
    """FILES chunks, at the unsharded chunking for ``size`` (8x8: 1,024 samples a chunk;
    224x224: 8), of random images with a binary map."""
    rng = np.random.default_rng(size)
    step = samples_per_chunk((size, size))
    n = FILES * step
    w = ArrayWriter(path, dataset="memory", classes=["a", "b"], image_size=(size, size), label_kind="single",
                    maps={"m": MapInfo(name="m", encoding="binary", kind="mask")})
    w.chunk, w.shard = step, None  # chunk files, also where the writer would shard this size
    w.create_split("train", n)
    for a in range(0, n, step):
        b = min(n, a + step)
        w.write("train", a, rng.integers(0, 256, (b - a, size, size, 3), dtype=np.uint8),
                rng.integers(0, 2, b - a).astype(np.int64), [f"s{i}" for i in range(a, b)],
                {"m": rng.integers(0, 2, (b - a, size, size), dtype=np.uint8)})
    w.close_split("train", n)
    w.finish({"source": "test"})
    return open_store(path)


@pytest.fixture(scope="module", params=[8, 32, 224], ids=lambda s: f"{s}x{s}")
def sized_store(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Store, int]:
    size = request.param
    return random_store(tmp_path_factory.mktemp(f"mem{size}") / "s.zarr", size), size


def file_bytes(split: StreamingSplit) -> int:
    """Bytes one whole chunk file's samples take in a block (images and the map)."""
    return max(split.block_nbytes([c], "m") for c in range(len(split.chunks)))


# --------------------------------------------------------------------------- block sizing


def test_blocks_are_at_most_their_share_of_the_budget(sized_store: tuple[Store, int]) -> None:
    """Every block of every epoch's plan is at most 1/STREAM_BLOCKS_ALIVE of the budget (or
    one file, where a file is more than that), for budgets of 1 to 7.5 files."""
    st, size = sized_store
    n = st.info.splits["train"]
    probe = StreamingSplit(st, "train", ["m"], np.arange(n), CPU, 1 << 40)
    one = file_bytes(probe)
    assert one == samples_per_chunk((size, size)) * size * size * 4  # 3 bytes of image, 1 of map, a pixel
    for idx in (np.arange(n), select_indices(n, int(n * 0.7), seed=1)):
        for files in (1, 2, 3.5, 7.5):
            budget = int(files * one)
            split = StreamingSplit(st, "train", ["m"], idx, CPU, budget)
            for epoch in range(3):
                blocks = split.plan(make_generator("cpu", epoch))
                assert sorted(sum(blocks, [])) == list(range(len(split.chunks)))
                sizes = [split.block_nbytes(b, "m") for b in blocks]
                assert max(sizes) <= max(budget // STREAM_BLOCKS_ALIVE, one), (size, files)
                if files >= 3.5:  # and filled: short of their share by less than a file (and the labels)
                    assert max(sizes) >= 0.9 * (budget // STREAM_BLOCKS_ALIVE) - one
                assert sum(sizes) == len(idx) * one // samples_per_chunk((size, size))


# --------------------------------------------------------------------------- blocks alive


def test_blocks_alive_at_once_fit_the_budget(sized_store: tuple[Store, int], monkeypatch: pytest.MonkeyPatch) -> None:
    """Counted by the lifetimes of the arrays ``_read_block`` returns: at most
    STREAM_BLOCKS_ALIVE blocks, and at most the budget's bytes, exist at once, even with a
    consumer slower than the reader, and all are released by the epoch's end. (Before,
    three: the one training, the one in the queue and the one the reader held, besides
    the permuted copies of the one training, which this count does not see.)"""
    st, size = sized_store
    n = st.info.splits["train"]
    real_read = StreamingSplit._read_block
    lock = threading.Lock()
    count = {"blocks": 0, "bytes": 0, "max_blocks": 0, "max_bytes": 0, "reads": 0}

    def released(nbytes: int) -> None:
        with lock:
            count["blocks"] -= 1
            count["bytes"] -= nbytes

    def read_block(self: StreamingSplit, block: list[int], map_name: str | None) -> Any:
        images, positions, maps = real_read(self, block, map_name)
        nbytes = images.numel() * images.element_size() + (maps.numel() * maps.element_size() if maps is not None else 0)
        assert nbytes == self.block_nbytes(block, map_name)
        with lock:
            count["blocks"] += 1
            count["bytes"] += nbytes
            count["reads"] += 1
            count["max_blocks"] = max(count["max_blocks"], count["blocks"])
            count["max_bytes"] = max(count["max_bytes"], count["bytes"])
        # the images and the map go together: the images' last reference ends the block
        assert maps is None or maps.shape[0] == images.shape[0]
        weakref.finalize(images, released, nbytes)
        return images, positions, maps

    monkeypatch.setattr(StreamingSplit, "_read_block", read_block)
    one = samples_per_chunk((size, size)) * size * size * 4
    for idx in (np.arange(n), select_indices(n, int(n * 0.7), seed=2)):
        for files in (2, 4.5):
            budget = int(files * one)
            split = StreamingSplit(st, "train", ["m"], idx, CPU, budget)
            blocks = split.plan(make_generator("cpu", 0))
            assert len(blocks) >= 3
            for k in count:
                count[k] = 0
            seen = 0
            for i, raw in enumerate(split.batches(max(2, len(idx) // 40), make_generator("cpu", 0), "m")):
                if i == 0:  # a slow consumer: the reader gets as far ahead as it may
                    deadline = time.monotonic() + 60
                    while count["reads"] < 2 and time.monotonic() < deadline:
                        time.sleep(0.01)
                    time.sleep(0.1)  # it would read a third block now, were it allowed to
                seen += len(raw.labels)
                del raw
            gc.collect()
            assert seen >= len(idx) - 1
            assert count["reads"] == len(blocks)
            assert count["max_blocks"] == STREAM_BLOCKS_ALIVE, count  # read ahead, and no further
            assert budget // 2 < count["max_bytes"] <= budget, (size, files, count)
            assert count["blocks"] == 0 and count["bytes"] == 0, "a block outlived the epoch"


def test_partly_read_files_come_in_pieces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file of which a block needs only some samples (a shard of 224x224 images is 77 MB)
    is read a piece of whole inner chunks at a time, pieces without a selected row not at
    all; a whole file goes straight into the block. The rows are exactly the selected ones."""
    import zarr

    data = np.random.default_rng(0).integers(0, 256, (256, 16, 16, 3), dtype=np.uint8)
    root = zarr.open_group(str(tmp_path / "a.zarr"), mode="w")  # an array in a group, as in a store
    arr = root.create_array("images", shape=data.shape, dtype="uint8", chunks=(1, 16, 16, 3),
                            shards=(128, 16, 16, 3), compressors=None, fill_value=0)
    arr[:] = data
    row = 16 * 16 * 3
    monkeypatch.setattr(D, "STREAM_PIECE_BYTES", 20 * row)  # pieces of 20 samples
    real_read = D.read_rows_into
    spans: list[tuple[int, int]] = []

    def read_rows_into(a: Any, start: int, stop: int, out: np.ndarray, *args: Any, **kw: Any) -> None:
        spans.append((start, stop))
        real_read(a, start, stop, out, *args, **kw)

    monkeypatch.setattr(D, "read_rows_into", read_rows_into)
    rng = np.random.default_rng(1)
    sel = np.sort(rng.choice(np.arange(128, 256), size=30, replace=False))
    sel = sel[(sel < 168) | (sel >= 188)]  # the third piece, [168, 188), has nothing selected: not read
    dst = np.empty((len(sel), 16, 16, 3), np.uint8)
    D._read_selected(arr, 128, 256, sel, dst)
    assert np.array_equal(dst, data[sel])
    assert spans and all(b - a <= 20 for a, b in spans)
    assert all(b <= 168 or a >= 188 for a, b in spans)
    assert sum(b - a for a, b in spans) < 128
    spans.clear()
    whole = np.empty((128, 16, 16, 3), np.uint8)
    D._read_selected(arr, 0, 128, np.arange(128), whole)
    assert np.array_equal(whole, data[:128]) and spans == [(0, 128)]


def test_streamed_rows_are_the_selected_ones(sized_store: tuple[Store, int]) -> None:
    """With partly selected files, each sample streamed is one selected, with its map and
    label, and each once (a lone last sample is dropped: batch norm needs two)."""
    import hashlib
    from collections import Counter

    st, size = sized_store
    n = st.info.splits["train"]
    idx = select_indices(n, int(n * 0.6), seed=3)
    one = samples_per_chunk((size, size)) * size * size * 4
    host = load_split(st, "train", ["m"], idx, progress=False)

    def digest(image: np.ndarray, m: np.ndarray, label: int) -> bytes:
        return hashlib.sha1(image.tobytes() + m.tobytes() + bytes([label])).digest()

    want = Counter(digest(host.images[i], host.maps["m"][i], int(host.labels[i])) for i in range(len(idx)))
    got: Counter[bytes] = Counter()
    for raw in StreamingSplit(st, "train", ["m"], idx, CPU, 3 * one).batches(16, make_generator("cpu", 4), "m"):
        for im, m, y in zip(raw.images.numpy(), raw.maps.numpy(), raw.labels.tolist()):
            got[digest(im, m, y)] += 1
    assert not got - want  # nothing but selected samples, none twice
    assert sum(got.values()) >= len(idx) - 1


# --------------------------------------------------------------------------- peak RSS


def test_peak_rss_grows_with_the_budget_at_most_one_for_one(tmp_path: Path) -> None:
    """bench/stream_memory.py on a small 224x224 store: an epoch (streamed batches through
    prepare_batch) at a 96M budget peaks less than 1.3x the 64 MB difference above one at
    32M (before: 2.3x), and within budget + the batches' own work + STREAM_CONSTANT_BYTES.
    Each budget runs in a fresh process; memory, not time, is measured."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak RSS")
    out = tmp_path / "mem.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "stream_memory.py"), "--budgets", "32M,96M",
                        "--size", "224", "--unit", "8", "--split-factor", "1.5", "--batch-size", "16",
                        "--model", "small-cnn", "--data", str(tmp_path / "data"), "--json", str(out)],
                       capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    lo, hi = res["budgets"]
    assert lo["budget"] == 32 * 1024**2 and hi["budget"] == 96 * 1024**2
    assert all(b["hwm_reset"] and b["blocks"] >= 3 for b in (lo, hi))  # a true peak, and really streamed
    assert lo["samples"] == hi["samples"] >= res["samples"] - 1
    growth = (hi["peak_over_baseline"] - lo["peak_over_baseline"]) / (hi["budget"] - lo["budget"])
    assert growth == pytest.approx(res["fit"]["slope"], abs=2e-3)  # two budgets: the fit is the growth
    # the blocks are resident (half the budget at the least), and no more than the budget
    assert 0.25 < growth < 1.3, res
    for b in (lo, hi):
        assert 0 < b["batch_work"] and b["peak_over_baseline"] <= b["budget"] + b["batch_work"] + STREAM_CONSTANT_BYTES, b
    assert res["fit"]["slope_stderr"] == 0  # two points: the line fits them exactly
    assert res["goals"]["slope"]["goal_met"] == (res["fit"]["slope"] <= 1.0)
    assert res["goal_met"] == all(g["goal_met"] for g in res["goals"].values())


def test_the_constant_is_stated_where_users_read_it() -> None:
    """`sattrain run --help` (--memory-budget) and docs/store-format.md state the constant
    that the subprocess test above holds the process to."""
    from click.testing import CliRunner

    from sattrain.cli import main

    mib = f"{STREAM_CONSTANT_BYTES // 1024**2} MiB"
    res = CliRunner().invoke(main, ["run", "--help"])
    assert res.exit_code == 0 and mib in " ".join(res.output.split())
    doc = " ".join((ROOT / "docs" / "store-format.md").read_text().split())
    assert f"**{mib}** (`STREAM_CONSTANT_BYTES`" in doc
