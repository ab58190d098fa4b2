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
