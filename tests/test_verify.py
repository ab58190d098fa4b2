"""verify: one flipped byte in any chunk file is found and located to its array and samples."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from satdata.build import BuildConfig, build
from satdata.cli import main
from satdata.store import open_store
from satdata.verify import verify_digests


@pytest.fixture(scope="module")
def small_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Digits at 8x8: every array kind (images, labels, ids, boxes, two maps), 15 chunk files."""
    out = tmp_path_factory.mktemp("verify") / "d8.zarr"
    build(BuildConfig(source="digits", root="", out=str(out), size=(8, 8), progress=False))
    return out


def chunk_files(store_dir: Path) -> list[tuple[Path, str, int]]:
    """Every chunk file of a store: (file, array path, chunk index along the samples)."""
    out = []
    for f in sorted(store_dir.rglob("*")):
        if not f.is_file():
            continue
        parts = f.relative_to(store_dir).parts
        if "c" not in parts:
            continue
        i = parts.index("c")
        out.append((f, "/".join(parts[:i]), int(parts[i + 1])))
    return out


def sample_range(store_dir: Path, array: str, index: int) -> tuple[int, int]:
    arr = open_store(store_dir).group[array]
    step = arr.chunks[0]
    return index * step, min(arr.shape[0], (index + 1) * step)


def data_byte(store_dir: Path, array: str, index: int, path: Path) -> int:
    """A byte of the chunk file that holds sample data.

    Zarr writes edge chunks at the full chunk shape: in an uncompressed edge chunk the
    bytes past the array's last sample are padding that no read returns, so the byte to
    flip is taken from the middle of the samples (the middle of the file when compressed).
    """
    arr = open_store(store_dir).group[array]
    codecs = [c["name"] for c in json.loads((store_dir / array / "zarr.json").read_text())["codecs"]]
    if codecs != ["bytes"]:
        return path.stat().st_size // 2
    a, b = sample_range(store_dir, array, index)
    per_sample = int(np.prod(arr.chunks[1:], dtype=np.int64)) * arr.dtype.itemsize
    return (b - a) * per_sample // 2


def flip_byte(path: Path, offset: int | None = None) -> bytes:
    original = path.read_bytes()
    data = bytearray(original)
    data[len(data) // 2 if offset is None else offset] ^= 0xFF
    path.write_bytes(bytes(data))
    return original


def test_every_chunk_file_is_found(small_store: Path, tmp_path: Path) -> None:
    store = tmp_path / "s.zarr"
    shutil.copytree(small_store, store)
    files = chunk_files(store)
    arrays = {a for _, a, _ in files}
    # the walk found every array kind, and more than one chunk of the big ones
    assert {"train/images", "train/labels", "train/ids", "train/boxes",
            "train/saliency/ink", "train/saliency/box", "test/images"} <= arrays
    assert sum(a == "train/images" for _, a, _ in files) == 2
    runner = CliRunner()
    missed = []
    for f, array, index in files:
        a, b = sample_range(store, array, index)
        where = f"{array} samples [{a}, {b})"
        original = flip_byte(f, data_byte(store, array, index, f))
        try:
            rep = verify_digests(open_store(store))
            located = [p for p in rep.problems if p.array == array and (p.start, p.stop) == (a, b)]
            res = runner.invoke(main, ["verify", str(store)])
            if rep.ok or not located or len(rep.problems) != 1:
                missed.append(f"library: {f.relative_to(store)}: {[str(p) for p in rep.problems]}")
            if res.exit_code == 0 or where not in res.output:
                missed.append(f"cli: {f.relative_to(store)}: exit {res.exit_code}: {res.output!r}")
        finally:
            f.write_bytes(original)
        assert verify_digests(open_store(store)).ok, f"restoring {f} did not make the store verify"
    assert not missed, "\n".join(missed)
    res = runner.invoke(main, ["verify", str(store)])
    assert res.exit_code == 0 and "OK" in res.output


def test_missing_and_truncated_chunks_are_located(small_store: Path, tmp_path: Path) -> None:
    store = tmp_path / "s.zarr"
    shutil.copytree(small_store, store)
    # a deleted chunk reads back as fill values: a digest mismatch on its samples
    ink1 = store / "train" / "saliency" / "ink" / "c" / "1" / "0" / "0"
    ink1.unlink()
    # an emptied compressed chunk cannot be decoded at all
    labels0 = store / "test" / "labels" / "c" / "0"
    labels0.write_bytes(b"")
    rep = verify_digests(open_store(store))
    found = {(p.array, p.start, p.stop) for p in rep.problems}
    assert ("train/saliency/ink", 1024, 1442) in found
    assert ("test/labels", 0, 355) in found
    assert any("cannot be read" in p.what for p in rep.problems if p.array == "test/labels")


def test_verify_json_and_real_entry_point(small_store: Path, tmp_path: Path) -> None:
    store = tmp_path / "s.zarr"
    shutil.copytree(small_store, store)
    f = store / "test" / "images" / "c" / "0" / "0" / "0" / "0"
    flip_byte(f, data_byte(store, "test/images", 0, f))
    res = CliRunner().invoke(main, ["verify", str(store), "--json"])
    assert res.exit_code == 1
    report = json.loads(res.output[: res.output.rindex("}") + 1])
    assert report["ok"] is False
    (prob,) = report["problems"]
    assert (prob["array"], prob["start"], prob["stop"]) == ("test/images", 0, 355)
    # the installed command: non-zero exit, the damaged array and samples on stderr
    proc = subprocess.run([sys.executable, "-m", "satdata.cli", "verify", str(store)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "test/images samples [0, 355)" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("Error: ")


def test_intact_store_verifies(small_store: Path) -> None:
    rep = verify_digests(open_store(small_store))
    assert rep.ok and len(rep.checked) == 12
