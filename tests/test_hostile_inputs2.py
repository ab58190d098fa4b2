"""Hostile input, second round: a FIFO inside a local store, ``--overwrite`` onto a file that
is not satkit's, and S3 servers that send more than was asked for.

Cases where a bug would hang (a FIFO opened for reading) run the real command in its own
process with a timeout, so that a regression fails instead of blocking the suite.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from tests.httpserver import FloodServer


@pytest.fixture
def store(digits_store: Path, tmp_path: Path) -> Path:
    """A private copy of the digits store (16x16)."""
    dst = tmp_path / "digits.zarr"
    shutil.copytree(digits_store, dst)
    return dst


def command(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``python -m *args`` in its own process: a read that blocks fails the test by its timeout."""
    return subprocess.run([sys.executable, "-m", *map(str, args)], capture_output=True, text=True, timeout=timeout)


def one_line_error(proc: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """The command failed with exit code 1 and one line (no traceback) holding every fragment."""
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def plant_fifo(store: Path, key: str) -> None:
    victim = store / key
    victim.unlink()
    os.mkfifo(victim)


# --------------------------------------------------------------------------- 1. a FIFO in a local store


def test_info_refuses_a_fifo_where_an_arrays_zarr_json_belongs(store: Path) -> None:
    """zarr's local store opened a FIFO at train/images/zarr.json and blocked forever in
    `satdata info` (open_store reads every array's metadata); now one line names the file."""
    plant_fifo(store, "train/images/zarr.json")
    one_line_error(command("satdata", "info", store), f"{store}: train/images/zarr.json is not a regular file (a FIFO)")


def test_export_refuses_a_fifo_and_writes_nothing(store: Path, tmp_path: Path) -> None:
    """`satdata export` of a store with a FIFO at train/labels/zarr.json blocked forever; now
    it stops with one line naming the file, and no .h5 (nor a partial one) is left."""
    plant_fifo(store, "train/labels/zarr.json")
    out = tmp_path / "out"
    out.mkdir()
    one_line_error(command("satdata", "export", store, "--out", out / "d.h5", "-q"),
                   f"{store}: train/labels/zarr.json is not a regular file (a FIFO)")
    assert list(out.iterdir()) == []


def test_reading_a_chunk_that_is_a_fifo_is_refused_on_every_local_path(store: Path) -> None:
    """A FIFO at a chunk's path: Store.load said 'has 0 bytes' (its size), while zarr's own
    read of the array (store.group[...]) and satkit's reader of local files
    (chunkio.read_local_rows_into) opened it and blocked forever. Now each names the file
    and says what it is, in its own process so that a regression times out."""
    key = "train/images/c/0/0/0/0"
    plant_fifo(store, key)
    expect = f"{key} is not a regular file (a FIFO)"
    prelude = ("import sys, numpy as np\n"
               "from satdata.errors import StoreError\n"
               "from satdata.store import open_store, _file_format\n"
               "from satdata import chunkio\n"
               f"s = open_store({str(store)!r})\n"
               "try:\n"
               "    {}\n"
               "except StoreError as e:\n"
               "    print(e)\n"
               "    sys.exit(3)\n")
    reads = {
        "load": "s.load('train', 'images')",
        "zarr": "s.group['train/images'][0:10]",
        "rows": (f"chunkio.read_local_rows_into(_file_format(s.group['train/images']), {str(store / key)!r}, 0, 10, "
                 "np.empty((10, 16, 16, 3), np.uint8))"),
    }
    for name, read in reads.items():
        proc = subprocess.run([sys.executable, "-c", prelude.replace("{}", read)], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 3, (name, proc.stdout, proc.stderr)
        assert expect in proc.stdout and str(store) in proc.stdout, (name, proc.stdout)


def test_a_directory_at_a_chunk_path_is_not_read_as_fill_values(store: Path) -> None:
    """zarr's local store reads a directory at a chunk's key as 'no chunk' (zeros); a read
    through zarr of such a store now refuses it, naming the file."""
    from satdata.errors import StoreError
    from satdata.store import open_store

    victim = store / "train" / "labels" / "c" / "0"
    victim.unlink()
    victim.mkdir()
    s = open_store(store)
    with pytest.raises(StoreError, match=r"train/labels/c/0 is not a regular file \(a directory\)"):
        s.group["train/labels"][0:5]


def test_sattrain_run_refuses_a_fifo_in_its_store(store: Path, tmp_path: Path) -> None:
    """`sattrain run` on a store with a FIFO at an array's zarr.json blocked forever; now one
    line names the file, and the run directory holds nothing."""
    plant_fifo(store, "train/labels/zarr.json")
    out = tmp_path / "run"
    proc = command("sattrain", "run", store, "--out", out, "--epochs", "1", "--batch-size", "8", "--eval-samples", "8",
                   "--eval-steps", "1", "--steps", "1", "--summary-samples", "0", "--device", "cpu", "--threads", "1",
                   "-q", timeout=300)
    one_line_error(proc, f"{store}: train/labels/zarr.json is not a regular file (a FIFO)")
    assert not out.exists() or list(out.iterdir()) == []


def test_verify_and_pack_still_name_a_fifo_chunk(store: Path, tmp_path: Path) -> None:
    """verify and pack use the same check (satdata.store.special_kind / open_regular)."""
    plant_fifo(store, "train/ids/c/0")
    proc = command("satdata", "verify", store)
    assert proc.returncode == 1 and "train/ids/c/0 is a FIFO, not a file" in proc.stderr, proc.stderr
    one_line_error(command("satdata", "pack", store, "--out", tmp_path / "d.zip", "-q"),
                   f"{store}: train/ids/c/0 is not a regular file (a FIFO)")
    assert not (tmp_path / "d.zip").exists()


# --------------------------------------------------------------------------- 2. --overwrite onto someone else's file


def _foreign_zip(p: Path, root_json: bytes | None) -> None:
    """A zip that is not satkit's: a thesis, or a Zarr group without satkit's attributes."""
    import zipfile

    with zipfile.ZipFile(p, "w") as zf:
        zf.writestr("thesis.tex", "\\documentclass{article} precious")
        if root_json is not None:
            zf.writestr("zarr.json", root_json)


FOREIGN = {
    "a text file": (lambda p: p.write_text("precious thesis"), "not a zip file"),
    "a zip of other files": (lambda p: _foreign_zip(p, None), "a zip without a store's zarr.json"),
    "a Zarr group's zip": (lambda p: _foreign_zip(p, b'{"zarr_format": 3, "node_type": "group", "attributes": {}}'),
                           "its zarr.json has no satkit attributes"),
    "a zip whose zarr.json is not JSON": (lambda p: _foreign_zip(p, b"\xff{"), "its zarr.json has no satkit attributes"),
    "a truncated zip": (lambda p: (_foreign_zip(p, None), p.write_bytes(p.read_bytes()[:40])), "not a zip file"),
}


def _refused_untouched(out: Path, proc: subprocess.CompletedProcess[str], why: str, before: bytes) -> None:
    one_line_error(proc, f"{out}: exists and is not a packed satkit store ({why})", "--overwrite replaces only")
    assert out.read_bytes() == before
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name], "the refused command left files beside OUT"


@pytest.mark.parametrize("case", sorted(FOREIGN))
def test_pack_overwrite_refuses_a_file_that_is_not_a_packed_store(digits_store: Path, tmp_path: Path,
                                                                  case: str) -> None:
    """`satdata pack STORE --out thesis.zip --overwrite` replaced any file there: a typo cost an
    unrelated file. Now --overwrite replaces only a packed satkit store (or an empty file);
    anything else is refused in one line naming it and why, and left as it was."""
    make, why = FOREIGN[case]
    out = tmp_path / "out" / "thesis.zip"
    out.parent.mkdir()
    make(out)
    before = out.read_bytes()
    _refused_untouched(out, command("satdata", "pack", digits_store, "--out", out, "--overwrite", "-q"), why, before)


def test_pack_overwrite_still_replaces_a_packed_store_or_an_empty_file(digits_store: Path, tmp_path: Path) -> None:
    """What --overwrite is for: an empty file, or an older pack (a packed satkit store)."""
    from satdata.errors import SatkitError
    from satdata.share import pack
    from satdata.store import open_store

    out = tmp_path / "d.zip"
    out.touch()
    empty = out.stat().st_ino
    pack(digits_store, out, overwrite=True, progress=False)
    packed = out.stat().st_ino
    assert packed != empty and open_store(out).info.digests == open_store(digits_store).info.digests
    with pytest.raises(SatkitError, match="already exists"):
        pack(digits_store, out, progress=False)
    pack(digits_store, out, overwrite=True, progress=False)
    assert out.stat().st_ino != packed  # replaced (by a rename), not refused
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.zip"]


def test_fetch_keep_zip_overwrite_refuses_a_file_that_is_not_a_packed_store(digits_store: Path,
                                                                             tmp_path: Path) -> None:
    """`satdata fetch URL.zip --out NAME.zip --overwrite` replaced any file at NAME.zip once
    the download verified; now only a packed store or an empty file, as for pack."""
    from satdata.share import pack
    from tests.httpserver import serve

    srv = tmp_path / "srv"
    srv.mkdir()
    pack(digits_store, srv / "digits.zip", progress=False)
    out = tmp_path / "out" / "mine.zip"
    out.parent.mkdir()
    _foreign_zip(out, None)
    before = out.read_bytes()
    with serve(srv) as http:
        url = f"{http.url}/digits.zip"
        _refused_untouched(out, command("satdata", "fetch", url, "--out", out, "--overwrite", "-q"),
                           "a zip without a store's zarr.json", before)
        out.write_bytes(b"")
        proc = command("satdata", "fetch", url, "--out", out, "--overwrite", "-q")
        assert proc.returncode == 0, proc.stderr
        assert out.read_bytes() == (srv / "digits.zip").read_bytes()
        proc = command("satdata", "fetch", url, "--out", out, "--overwrite", "-q")  # a packed store: replaced
        assert proc.returncode == 0, proc.stderr


# --------------------------------------------------------------------------- 3. S3 servers that send too much


class FakeS3(FloodServer):
    """A minimal S3-compatible server on 127.0.0.1 serving one directory as bucket ``lab``,
    path-style, any credentials, and hostile (tests/httpserver.py's FloodServer): it ignores
    Range (answers every GET with the whole object, ``200``), refuses listings (403: satkit
    falls back to one HEAD per key), and answers a key ending in a ``flood`` suffix with that
    many zero bytes (a declared Content-Length). ``sent`` counts the body bytes it managed to
    send, by key."""

    headers = {"Content-Type": "application/octet-stream", "ETag": '"0"'}

    def key(self, handler: BaseHTTPRequestHandler) -> str | None:
        path, _, query = handler.path.partition("?")
        if query or not path.startswith("/lab/"):
            return None  # listings, bucket calls
        return path[len("/lab/"):]

    def refuse(self, handler: BaseHTTPRequestHandler, status: int) -> None:
        code = {403: "AccessDenied", 404: "NoSuchKey"}[status]
        body = f"<Error><Code>{code}</Code><Message>{code}</Message></Error>".encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/xml")
        handler.send_header("Content-Length", str(len(body) if handler.command == "GET" else 0))
        handler.end_headers()
        if handler.command == "GET":
            handler.wfile.write(body)

    def options(self) -> list[str]:
        return ["-S", f"endpoint_url={self.url}", "-S", "key=k", "-S", "secret=s"]


def test_s3_flooded_array_zarr_json_is_refused_after_the_metadata_limit(store: Path, tmp_path: Path) -> None:
    """zarr read an array's zarr.json from S3 whole (s3fs holds the whole answer): a server
    flooding train/images/zarr.json with 200 MB made `satdata info` take all of it. Now such a
    read stops after METADATA_LIMIT + 1 bytes with one line naming the file's URL."""
    from satdata.remote import METADATA_LIMIT

    with FakeS3(store.parent, flood={"digits.zarr/train/images/zarr.json": 200 << 20}) as s3:
        proc = command("satdata", "info", "s3://lab/digits.zarr", *s3.options(), timeout=300)
        one_line_error(proc, "s3://lab/digits.zarr/train/images/zarr.json", f"larger than {METADATA_LIMIT:,} bytes")
        assert s3.sent["digits.zarr/train/images/zarr.json"] < METADATA_LIMIT + (32 << 20), s3.sent


def test_s3_chunk_reads_take_no_more_than_the_chunk_can_hold(store: Path, tmp_path: Path) -> None:
    """A server that ignores Range and sends 300 MB for a chunk of 16x16 images (at most
    about 1.8 MB): s3fs took all of it (zarr's whole-file read in export, satkit's ranged one
    in verify) before any size check; now each read stops at what the chunk can hold and the
    command ends in one line naming the chunk."""
    key = "digits.zarr/train/images/c/0/0/0/0"
    with FakeS3(store.parent, flood={key: 300 << 20}) as s3:
        proc = command("satdata", "export", "s3://lab/digits.zarr", "--out", tmp_path / "d.h5", "-q", *s3.options(),
                       timeout=300)
        one_line_error(proc, f"s3://lab/{key}: more than 1,850,736 bytes on the server")
        assert s3.sent[key] < 32 << 20, s3.sent
        assert not (tmp_path / "d.h5").exists()
        s3.sent.clear()
        proc = command("satdata", "verify", "s3://lab/digits.zarr", *s3.options(), timeout=300)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert "train/images samples [0, 1024)" in proc.stderr and "more than 1,850,736 bytes" in proc.stderr, \
            proc.stderr
        assert s3.sent[key] < 32 << 20, s3.sent


def test_s3_store_that_ignores_range_still_opens_and_reads(store: Path) -> None:
    """Answers without Range from byte 0 hold the bytes asked for first: a store on such an
    S3 server reads correctly (only the bytes asked for are taken of each answer)."""
    import numpy as np

    from satdata.store import open_store

    with FakeS3(store.parent) as s3:
        remote = open_store("s3://lab/digits.zarr", storage_options={"endpoint_url": s3.url, "key": "k",
                                                                      "secret": "s"})
        assert np.array_equal(remote.load("train", "images"), open_store(store).load("train", "images"))
        assert np.array_equal(remote.load("test", "labels"), open_store(store).load("test", "labels"))
