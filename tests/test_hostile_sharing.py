"""Crafted, damaged and concurrent input to the sharing commands: verify, pack, fetch, remote open.

Each test is a way found to make satkit lie (report success on data that is not what it
claims), hang, hold unbounded memory or end in something other than one line naming the
file or URL. Servers are tests/httpserver.py, or a small hostile one below.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from satdata.cli import main


def run(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(main, list(args))
    return res.exit_code, res.output


@pytest.fixture
def store(digits_store: Path, tmp_path: Path) -> Path:
    """A private copy of the digits store."""
    dst = tmp_path / "srv" / "digits.zarr"
    shutil.copytree(digits_store, dst)
    return dst


# --------------------------------------------------------------------------- verify


def test_verify_is_not_ok_when_an_array_has_no_recorded_digest(store: Path) -> None:
    """An array whose digest record was removed from the attributes (and whose data was then
    changed) used to be skipped: `satdata verify` said OK for 11 of the 12 arrays."""
    import zarr

    from satdata.store import open_store, write_info

    info = open_store(str(store)).info
    images = zarr.open_group(str(store), mode="r+")["train/images"]
    images[0:5] = 0  # the damage nothing records
    write_info(store, replace(info, digests={k: v for k, v in info.digests.items() if k != "train/images"}))
    code, text = run("verify", str(store))
    assert code == 1, text
    assert "train/images: records no digest" in text and "OK" not in text, text


# --------------------------------------------------------------------------- fetch: resuming a .zip


def another_version(store: Path, dst: Path) -> Path:
    """A copy of ``store`` whose first images are inverted, digests recomputed: the lab's next
    version of the store, whose packed .zip has exactly the old one's size (images are raw)."""
    import zarr

    from satdata.store import digest_array, open_store, write_info

    shutil.copytree(store, dst)
    info = open_store(str(dst)).info
    images = zarr.open_group(str(dst), mode="r+")["train/images"]
    images[0:8] = 255 - images[0:8]
    write_info(dst, replace(info, digests={**info.digests, "train/images": digest_array(images)}))
    return dst


@pytest.fixture
def two_versions(store: Path, tmp_path: Path) -> tuple[Path, Path]:
    """(old.zip, new.zip): two versions of a store, packed, of the same size."""
    from satdata.share import pack

    old, new = tmp_path / "old.zip", tmp_path / "new.zip"
    pack(store, old, progress=False)
    pack(another_version(store, tmp_path / "v2.zarr"), new, progress=False)
    assert old.stat().st_size == new.stat().st_size and old.read_bytes() != new.read_bytes()
    return old, new


@pytest.mark.parametrize("kept", [1.0, 0.75])
@pytest.mark.parametrize("name", ["got.zarr", "got.zip"])
def test_a_resumed_zip_download_is_checked_against_the_current_file(two_versions: tuple[Path, Path], tmp_path: Path,
                                                                    name: str, kept: float) -> None:
    """A download of the old version left by an interrupted fetch (killed while unpacking:
    all of it; killed while downloading: part of it), then the lab publishes the new
    version at the same URL. Fetch used to trust the bytes it had: with all of them it
    verified the old zip against itself and reported success with the old store; with part
    of them, the zip mixed two versions and fetch blamed the server ('the server's copy is
    damaged'). Now it gets the new version."""
    from satdata.share import fetch, fetch_partial_zip
    from satdata.store import open_store, store_digest

    old, new = two_versions
    srv = tmp_path / "www"
    srv.mkdir()
    shutil.copy(new, srv / "lab.zip")
    out = tmp_path / name
    data = old.read_bytes()
    fetch_partial_zip(out).write_bytes(data[: int(len(data) * kept)])
    from tests.httpserver import serve

    with serve(srv) as http:
        res = fetch(f"{http.url}/lab.zip", out, progress=False)
    assert store_digest(open_store(str(out)).info) == store_digest(open_store(str(new)).info)
    assert res.bytes == len(data)  # downloaded afresh
    assert not fetch_partial_zip(out).exists()
