"""Readers and writers together (docs/store-format.md): a training run keeps reading the
version of the store it opened, or stops with one line naming the change; `satdata gc`
removes superseded map versions only when no reader holds the store; a resume compares
the arrays the run uses, not the whole store.

The races are made deterministic with a hook between the blocks of a streamed split
(``StreamingSplit._read_block`` wrapped: the change happens just before the second block
is read, while the first one trains).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from satdata.addmap import NewMap, add_map
from satdata.errors import SatkitError
from satdata.store import open_store
from sattrain.data import StreamingSplit

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture()
def store(digits_store: Path, tmp_path: Path) -> Path:
    out = tmp_path / "digits.zarr"
    shutil.copytree(digits_store, out)
    return out


def const_map(store: Path, name: str, value: int, *, overwrite: bool = False) -> None:
    """Add (or replace) a binary map of one value everywhere."""
    info = open_store(store).info
    h, w = info.image_size
    add_map(store, NewMap(name, "binary", "mask"), lambda s: iter([np.full((info.splits[s], h, w), value, np.uint8)]),
            overwrite=overwrite)


def train_cli(store: Path, out: Path, *extra: str, epochs: int = 2, budget: str = "64k") -> Any:
    """`sattrain run` in this process (so the hooks apply); 64k streams the digits split in
    blocks of one chunk (two blocks per epoch)."""
    from sattrain.cli import main

    args = ["run", str(store), "--out", str(out), "--model", "small-cnn", "--method", "sat", "--epochs", str(epochs),
            "--batch-size", "32", "--train-samples", "160", "--eval-samples", "16", "--steps", "1",
            "--eval-steps", "1", "--summary-samples", "0", "--device", "cpu", "--memory-budget", budget, "-q", *extra]
    return CliRunner().invoke(main, args)


def hook_streaming(monkeypatch: pytest.MonkeyPatch, change: Callable[[], None]) -> list[Any]:
    """Run ``change`` just before the second block is read; returns the list that collects
    every batch the streamed split hands to training."""
    real_read, real_batches = StreamingSplit._read_block, StreamingSplit.batches
    reads: list[int] = []
    seen: list[Any] = []

    def read_block(self: StreamingSplit, block: list[int], map_name: str | None) -> Any:
        reads.append(1)
        if len(reads) == 2:
            change()
        return real_read(self, block, map_name)

    def batches(self: StreamingSplit, *a: Any, **k: Any) -> Any:
        for raw in real_batches(self, *a, **k):
            seen.append(raw)
            yield raw

    monkeypatch.setattr(StreamingSplit, "_read_block", read_block)
    monkeypatch.setattr(StreamingSplit, "batches", batches)
    return seen


# --------------------------------------------------------------------------- the races


def test_a_streaming_run_keeps_its_map_when_the_map_is_replaced(store: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """`satdata saliency --overwrite` (add_map) replaces the map a streaming run trains from:
    the run keeps the version it opened (the old arrays are kept), never zeros or the new one."""
    const_map(store, "m", 1)
    old_array = open_store(store).info.maps["m"].array
    seen = hook_streaming(monkeypatch, lambda: const_map(store, "m", 0, overwrite=True))
    res = train_cli(store, tmp_path / "run", "--map", "m")
    assert res.exit_code == 0, res.output
    now = open_store(store).info.maps["m"].array
    assert now != old_array  # the map was replaced during the run
    assert len(seen) > 4 and all(bool((raw.maps == 1).all()) for raw in seen), \
        "the run trained on a map other than the one it opened"
    assert (store / "train" / "saliency" / old_array / "zarr.json").is_file()  # kept for readers until gc


def test_a_streaming_run_stops_when_the_store_is_rebuilt(store: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """`satdata build --overwrite` swaps in a store with other images while a run streams:
    the run stops with one line naming the array, having trained only on the old images."""
    import h5py

    from satdata.export import export_h5

    old = open_store(store).load("train", "images")
    old_rows = {hashlib.sha256(r.tobytes()).digest() for r in old}
    h5 = tmp_path / "inverted.h5"
    export_h5(open_store(store), h5, progress=False)
    with h5py.File(h5, "r+") as f:
        for split in ("train", "test"):
            f[f"{split}/images"][...] = 255 - f[f"{split}/images"][...]
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def rebuild() -> None:
        proc = subprocess.run([sys.executable, "-m", "satdata.cli", "build", "--source", "h5", "--root", str(h5),
                               "--out", str(store), "--size", "16", "--overwrite", "-q"],
                              capture_output=True, text=True, env=env, timeout=120)
        assert proc.returncode == 0, proc.stderr

    seen = hook_streaming(monkeypatch, rebuild)
    res = train_cli(store, tmp_path / "run")
    assert not (open_store(store).load("train", "images") == old).all()  # the store was replaced
    new_rows = sum(hashlib.sha256(row.tobytes()).digest() not in old_rows for raw in seen for row in raw.images.numpy())
    assert seen and new_rows == 0, f"trained on {new_rows} images of the new store"
    assert res.exit_code == 1, res.output
    line = res.output.strip().splitlines()[-1]
    assert "train/images changed after this process opened the store" in line and str(store) in line, line
    assert "Traceback" not in res.output


def test_a_chunk_deleted_under_a_streaming_split_is_not_read_as_zeros(store: Path) -> None:
    """zarr reads a missing chunk of a compressed array as its fill value: the split stops instead."""
    from sattrain.data import open_train_split, select_indices

    st = open_store(store)
    split = open_train_split(st, "train", ["ink"], select_indices(st.info.splits["train"], None, 0),
                             torch.device("cpu"), 64 * 1024, progress=False)
    assert isinstance(split, StreamingSplit)
    ink = st.info.maps["ink"].array_name
    (store / "train" / "saliency" / ink / "c" / "1" / "0" / "0").unlink()
    with pytest.raises(SatkitError, match=r"array train/saliency/ink chunk 1 \(samples \[1024, 1442\)\) is missing"):
        list(split.batches(64, torch.Generator().manual_seed(0), "ink"))


def test_pins_compare_content_not_files(store: Path, tmp_path: Path) -> None:
    """A store swapped for an identical copy is no change; one with other images is."""
    from satdata.store import StoreChangedError

    st = open_store(store)
    paths = [st.array_key("train", "images"), st.array_key("train", "saliency", "ink")]
    st.check_unchanged(paths)
    twin = tmp_path / "twin.zarr"
    shutil.copytree(store, twin)
    aside = tmp_path / "aside.zarr"
    store.rename(aside)
    twin.rename(store)
    st.check_unchanged(paths)  # same content
    st.load("train", "images")
    shutil.rmtree(store)
    shutil.copytree(aside, store)
    const_map(store, "ink", 0, overwrite=True)  # the map is replaced: the pinned version is kept
    st.check_unchanged(paths)
    shutil.rmtree(store / "train" / "saliency" / "ink")  # ... until it goes
    with pytest.raises(StoreChangedError, match=r"train/saliency/ink is gone since this process opened the store"):
        st.check_unchanged(paths)
    (store / "zarr.json").unlink()
    with pytest.raises(StoreChangedError, match="zarr.json cannot be read any more"):
        st.check_unchanged(paths)


# --------------------------------------------------------------------------- satdata gc


def test_gc_removes_superseded_arrays_only_when_no_reader_holds_the_store(store: Path) -> None:
    from satdata.cli import main
    from satdata.store import StoreChangedError

    r = CliRunner()
    res = r.invoke(main, ["gc", str(store)])
    assert res.exit_code == 0 and "nothing to remove" in res.output, res.output
    reader = open_store(store)  # opened before the change: reads the old version of ink
    assert reader.hold_reader_lock()
    old_ink = reader.load("train", "saliency", "ink")
    const_map(store, "ink", 0, overwrite=True)
    stray = store / "test" / "saliency" / "m.deadbeef"  # what an interrupted change leaves
    stray.mkdir()
    (stray / "zarr.json").write_text("{}")
    superseded = [store / s / "saliency" / "ink" for s in ("train", "test")]
    assert all(p.is_dir() for p in superseded)
    assert (reader.load("train", "saliency", "ink") == old_ink).all()  # the reader keeps its version

    res = r.invoke(main, ["gc", str(store), "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "would remove train/saliency/ink (" in res.output and "would remove test/saliency/m.deadbeef" in res.output
    assert "would remove 3 entries, freeing" in res.output and all(p.is_dir() for p in superseded)

    res = r.invoke(main, ["gc", str(store)])
    assert res.exit_code == 1 and f"process {os.getpid()}" in res.output and "is reading the store" in res.output
    assert len(res.output.strip().splitlines()) == 1 and all(p.is_dir() for p in superseded)
    res = r.invoke(main, ["gc", str(store), "--wait", "0.2"])
    assert res.exit_code == 1 and "after waiting 0.2 s" in res.output

    reader.release_reader_lock()
    res = r.invoke(main, ["gc", str(store)])
    assert res.exit_code == 0, res.output
    assert "removed train/saliency/ink (" in res.output and "removed 3 entries, freed" in res.output
    assert not any(p.exists() for p in superseded) and not stray.exists()
    fresh = open_store(store)
    assert (fresh.load("train", "saliency", "ink") == 0).all()
    res = r.invoke(main, ["verify", str(store)])
    assert res.exit_code == 0, res.output
    with pytest.raises(StoreChangedError, match="train/saliency/ink is gone"):  # the old reader would stop
        reader.check_unchanged([reader.array_key("train", "saliency", "ink")])
    res = r.invoke(main, ["gc", str(store) + ".zip"])
    assert res.exit_code == 1 and "local store directories only" in res.output


def test_gc_removes_zarr_json_before_the_chunks(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import satdata.gc as gc

    const_map(store, "ink", 0, overwrite=True)
    order: list[str] = []
    real_unlink, real_rmtree = Path.unlink, shutil.rmtree
    monkeypatch.setattr(Path, "unlink", lambda self, *a, **k: (order.append(f"unlink {self.name}"),
                                                              real_unlink(self, *a, **k))[1])
    monkeypatch.setattr(gc.shutil, "rmtree", lambda p, *a, **k: (order.append("rmtree"), real_rmtree(p, *a, **k))[1])
    gc.collect(store)
    assert order[:2] == ["unlink zarr.json", "rmtree"] and len(order) == 4, order


# --------------------------------------------------------------------------- resume


def test_resume_checks_the_arrays_the_run_uses(store: Path, tmp_path: Path) -> None:
    from sattrain.checkpoint import load_checkpoint, save_checkpoint

    run = tmp_path / "run"
    res = train_cli(store, run, "--map", "ink", epochs=1, budget="1g")
    assert res.exit_code == 0, res.output
    arrays = load_checkpoint(run)["extra"]["arrays"]
    assert sorted(arrays) == ["test/images", "test/labels", "train/images", "train/labels", "train/saliency/ink"]

    const_map(store, "added", 1)  # a map added to the shared store: the run is not stranded
    const_map(store, "box", 0, overwrite=True)  # nor by another map replaced
    res = train_cli(store, run, "--map", "ink", "--resume", epochs=2, budget="1g")
    assert res.exit_code == 0, res.output
    assert load_checkpoint(run)["epoch"] == 2

    const_map(store, "ink", 0, overwrite=True)  # the map it trains from: refused, naming it
    res = train_cli(store, run, "--map", "ink", "--resume", epochs=3, budget="1g")
    assert res.exit_code == 1, res.output
    assert "store whose contents differ from the run's in an array it trains or evaluates from: " \
           "train/saliency/ink has sha256" in res.output, res.output
    assert load_checkpoint(run)["epoch"] == 2

    # a checkpoint from before per-array digests: the whole store's digest, as before
    ckpt = load_checkpoint(run)
    del ckpt["extra"]["arrays"]
    save_checkpoint(run / "checkpoint.pt", {k: v for k, v in ckpt.items() if k not in ("format", "version")})
    res = train_cli(store, run, "--map", "ink", "--resume", epochs=3, budget="1g")
    assert res.exit_code == 1 and "predates per-array digests" in res.output, res.output
