"""satdata pack and satdata fetch: deterministic packed stores; verified, resumable downloads.

Downloads go through a real HTTP server (tests/httpserver.py) and a real S3 server
(tests/s3server.py); the stores are copies of the session's digits store.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from satdata.cli import main
from satdata.errors import SatkitError
from satdata.share import fetch, fetch_partial, fetch_partial_zip, pack
from satdata.store import open_store
from tests.httpserver import serve

IMG1 = "train/images/c/1/0/0/0"  # the second chunk of train/images (samples [1024, 1442))


def run(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(main, list(args))
    return res.exit_code, res.output


def error_line(out: str) -> str:
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), out
    return lines[0]


def flip(path: Path, offset: int = 10) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def same_store(a: Path | str, b: Path | str) -> None:
    sa, sb = open_store(str(a)), open_store(str(b))
    assert sa.info.digests == sb.info.digests
    assert np.array_equal(sa.load("train", "images"), sb.load("train", "images"))


@pytest.fixture
def store(digits_store: Path, tmp_path: Path) -> Path:
    """A private copy of the digits store, under srv/ (what the HTTP tests serve)."""
    dst = tmp_path / "srv" / "digits.zarr"
    shutil.copytree(digits_store, dst)
    return dst


@pytest.fixture
def packed(digits_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("packed") / "digits.zip"
    pack(digits_store, out, progress=False)
    return out


# --------------------------------------------------------------------------- pack


def test_pack_is_deterministic_and_holds_only_the_store(digits_store: Path, store: Path, tmp_path: Path) -> None:
    a, b, c = tmp_path / "a.zip", tmp_path / "b.zip", tmp_path / "c.zip"
    code, out = run("pack", str(digits_store), "--out", str(a), "-q")
    assert code == 0 and "wrote" in out, out
    pack(digits_store, b, progress=False)
    # a copy elsewhere, with leftovers a store directory may hold: none of them goes in
    (store / ".digits.zarr.lock").write_text("1")
    (store / "train" / "saliency" / "ink.0123abcd").mkdir()
    (store / "train" / "saliency" / "ink.0123abcd" / "zarr.json").write_text("{}")
    (store / ".zarr.json.tmp-99").write_text("{}")
    (store / "notes.txt").write_text("x")
    os.utime(store / "zarr.json", (1, 1))
    pack(store, c, progress=False)
    assert a.read_bytes() == b.read_bytes() == c.read_bytes()

    with zipfile.ZipFile(a) as zf:
        infos = zf.infolist()
    names = [i.filename for i in infos]
    assert names[-1] == "zarr.json" and names[:-1] == sorted(names[:-1])
    assert sorted(names) == sorted(files(digits_store))  # exactly the store's files
    assert {(i.compress_type, i.date_time, i.external_attr >> 16) for i in infos} == \
        {(zipfile.ZIP_STORED, (1980, 1, 1, 0, 0, 0), 0o100644)}
    same_store(digits_store, a)


def test_packed_store_reads_verifies_and_locates_a_flipped_byte(packed: Path, tmp_path: Path) -> None:
    code, out = run("verify", str(packed))
    assert code == 0 and "OK" in out, out
    code, out = run("info", str(packed))
    assert code == 0 and "digits" in out, out

    bad = tmp_path / "bad.zip"
    shutil.copy(packed, bad)
    with zipfile.ZipFile(bad) as zf:
        zi = zf.getinfo(IMG1)
    # the entry's data follows its 30-byte local header, name and extra field
    flip(bad, zi.header_offset + 30 + len(zi.filename.encode()) + len(zi.extra) + 100)
    code, out = run("verify", str(bad))
    assert code == 1 and "train/images samples [1024, 1442)" in out, out


def test_pack_refuses_a_damaged_store_and_leaves_nothing(store: Path, tmp_path: Path) -> None:
    flip(store / IMG1)
    out = tmp_path / "out" / "x.zip"
    code, text = run("pack", str(store), str(out), "-q")
    line = error_line(text)
    assert code == 1 and "train/images chunk 1 (samples [1024, 1442))" in line and "digest" in line, line
    assert not (tmp_path / "out").exists()  # no zip, no partial file, not even the directory

    shutil.rmtree(store / "train" / "labels" / "c")
    flip(store / IMG1)  # undo
    code, text = run("pack", str(store), str(out), "-q")
    assert code == 1 and "train/labels chunk 0" in error_line(text) and "missing" in text, text
    assert not (tmp_path / "out").exists()


def test_pack_output_rules(digits_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "x.zip"
    out.write_bytes(b"old")
    code, text = run("pack", str(digits_store), str(out), "-q")
    assert code == 1 and "already exists" in error_line(text)
    assert out.read_bytes() == b"old"
    # --overwrite replaces only a packed store or an empty file: a mistyped --out costs nothing
    code, text = run("pack", str(digits_store), str(out), "-q", "--overwrite")
    assert code == 1 and f"{out}: exists and is not a packed satkit store (not a zip file)" in error_line(text), text
    assert out.read_bytes() == b"old"
    out.write_bytes(b"")
    code, text = run("pack", str(digits_store), str(out), "-q", "--overwrite")
    assert code == 0, text
    same_store(digits_store, out)
    os.utime(out, (1, 1))
    code, text = run("pack", str(digits_store), str(out), "-q", "--overwrite")  # a packed store: replaced
    assert code == 0, text
    same_store(digits_store, out)
    assert out.stat().st_mtime > 1
    for bad, what in [("s3://bucket/x.zip", "not to a URL"), (str(tmp_path / "x.tar"), "must end in .zip"),
                      (str(digits_store / "x.zip"), "inside the store")]:
        code, text = run("pack", str(digits_store), bad, "-q")
        assert code == 1 and what in error_line(text), text
    assert sorted(os.listdir(tmp_path)) == ["x.zip"]


def test_sattrain_runs_on_a_packed_store(packed: Path, tmp_path: Path) -> None:
    from sattrain.cli import main as sattrain_main

    res = CliRunner().invoke(sattrain_main, [
        "run", str(packed), "--method", "sat", "--epochs", "1", "--batch-size", "64", "--train-samples", "128",
        "--eval-samples", "64", "--eval-steps", "1", "--summary-samples", "0", "--device", "cpu", "-q",
        "--out", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "run" / "best.pt").is_file()


# --------------------------------------------------------------------------- fetch over HTTP


def test_fetch_store_directory_and_zip_over_http(store: Path, packed: Path, tmp_path: Path) -> None:
    shutil.copy(packed, store.parent / "digits.zip")
    with serve(store.parent) as http:
        code, text = run("fetch", f"{http.url}/digits.zarr", "--out", str(tmp_path / "d.zarr"), "-q")
        assert code == 0 and "verified" in text, text
        gets = {r.path for r in http.requests}
        # every file one GET, bounded by a Range (a server cannot send more than the file may hold)
        assert all(r.method == "GET" and r.status == 206 and (r.range or "").startswith("bytes=0-")
                   for r in http.requests), http.requests
        assert gets == {f"/digits.zarr/{k}" for k in files(store)}  # no listing, nothing extra
        http.clear_requests()

        fetch(f"{http.url}/digits.zip", tmp_path / "z.zarr", progress=False, zip_piece=1 << 18)
        fetch(f"{http.url}/digits.zip", tmp_path / "z.zip", progress=False)
        assert all(r.path == "/digits.zip" for r in http.requests)

        remote = open_store(f"{http.url}/digits.zip")  # read in place, through remote.open_group's zip branch
        assert np.array_equal(remote.load("train", "saliency", "ink"), open_store(store).load("train", "saliency", "ink"))
    assert files(tmp_path / "d.zarr") == files(store) == files(tmp_path / "z.zarr")
    assert (tmp_path / "z.zip").read_bytes() == packed.read_bytes()
    same_store(store, tmp_path / "d.zarr")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.zarr", "srv", "z.zarr", "z.zip"]  # no partials


def test_interrupted_fetch_resumes_with_only_what_is_missing(store: Path, packed: Path, tmp_path: Path) -> None:
    out = tmp_path / "d.zarr"
    url_of = {}
    with serve(store.parent) as http:
        url = f"{http.url}/digits.zarr"
        http.interrupt_once(IMG1, 1000)
        with pytest.raises(SatkitError, match=f"{url}/{IMG1}: unreachable"):
            fetch(url, out, progress=False, retries=0)
        assert not out.exists()
        partial = fetch_partial(out)
        assert partial.is_dir() and not (partial / "zarr.json").exists()
        with pytest.raises(SatkitError):
            open_store(partial)
        kept = {k for k in files(partial) if "/c/" in k}
        assert kept and IMG1 not in kept
        http.clear_requests()

        code, text = run("fetch", url, "--out", str(out), "-q")
        assert code == 0 and "kept from an earlier run" in text, text
        again = {r.path.removeprefix("/digits.zarr/") for r in http.requests if "/c/" in r.path}
        assert IMG1 in again and not (again & kept)
        assert not partial.exists()
        same_store(store, out)

        # a .zip resumes with a Range request from the bytes already there
        shutil.copy(packed, store.parent / "digits.zip")
        zout = tmp_path / "z.zarr"
        piece = 1 << 18
        http.clear_requests()
        http.interrupt_once("/digits.zip", 1000, skip=2)
        with pytest.raises(SatkitError, match="unreachable"):
            fetch(f"{http.url}/digits.zip", zout, progress=False, retries=0, zip_piece=piece)
        assert fetch_partial_zip(zout).stat().st_size == 2 * piece and not zout.exists()
        http.clear_requests()
        res = fetch(f"{http.url}/digits.zip", zout, progress=False, zip_piece=piece)
        assert res.reused == 2 * piece
        ranges = [r.range for r in http.requests if r.method == "GET"]
        assert ranges[0] == f"bytes={2 * piece}-{3 * piece - 1}", ranges
        assert not fetch_partial_zip(zout).exists()
        same_store(store, zout)
        url_of["zip"] = f"{http.url}/digits.zip"


def test_killed_fetch_resumes(store: Path, tmp_path: Path) -> None:
    out = tmp_path / "d.zarr"
    partial = fetch_partial(out)

    def chunks() -> set[str]:
        return {k for k in files(partial) if "/c/" in k and not k.rsplit("/", 1)[-1].startswith(".")} \
            if partial.exists() else set()

    with serve(store.parent) as http:
        url = f"{http.url}/digits.zarr"
        http.delay(0.3)
        proc = subprocess.Popen([sys.executable, "-m", "satdata.cli", "fetch", url, "--out", str(out), "-q",
                                 "--jobs", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.time() + 60
            while len(chunks()) < 2 and time.time() < deadline and proc.poll() is None:
                time.sleep(0.05)
        finally:
            proc.kill()
            proc.wait()
        kept = chunks()
        assert len(kept) >= 2 and not out.exists() and not (partial / "zarr.json").exists()
        http.delay(0)
        http.clear_requests()
        res = fetch(url, out, progress=False)
        again = {r.path.removeprefix("/digits.zarr/") for r in http.requests if "/c/" in r.path}
        assert res.reused == len(kept) and not (again & kept) and again
    assert files(out) == files(store) and not partial.exists()


def test_fetch_refuses_a_corrupted_chunk_on_the_server(store: Path, packed: Path, tmp_path: Path) -> None:
    flip(store / IMG1)
    out = tmp_path / "d.zarr"
    with serve(store.parent) as http:
        code, text = run("fetch", f"{http.url}/digits.zarr", "--out", str(out), "-q")
        line = error_line(text)
        assert code == 1 and f"{http.url}/digits.zarr/{IMG1}" in line and "recorded digest" in line, line
        assert not out.exists()
        with pytest.raises(SatkitError):
            open_store(fetch_partial(out))
        assert not (fetch_partial(out) / IMG1).exists()

        # metadata that disagrees with the digests: caught by the full verification before the commit
        flip(store / IMG1)  # undo
        meta = store / "train" / "labels" / "zarr.json"
        meta.write_text(meta.read_text().replace('"int64"', '"int32"'))
        code, text = run("fetch", f"{http.url}/digits.zarr", "--out", str(out), "-q")
        line = error_line(text)
        assert code == 1 and "does not verify" in line and "train/labels" in line, line
        assert not out.exists() and not fetch_partial(out).exists()

        # a damaged .zip is refused too, and removed (a re-run downloads it afresh)
        bad = store.parent / "bad.zip"
        shutil.copy(packed, bad)
        with zipfile.ZipFile(bad) as zf:
            zi = zf.getinfo(IMG1)
        flip(bad, zi.header_offset + 30 + len(zi.filename.encode()) + 100)
        for dest in ("b.zarr", "b.zip"):
            code, text = run("fetch", f"{http.url}/bad.zip", "--out", str(tmp_path / dest), "-q")
            assert code == 1 and "bad.zip" in error_line(text), text
            assert not (tmp_path / dest).exists() and not fetch_partial_zip(tmp_path / dest).exists()


def test_fetch_errors_are_one_line_naming_the_url(store: Path, tmp_path: Path) -> None:
    out = tmp_path / "d.zarr"
    with serve(store.parent) as http:
        code, text = run("fetch", f"{http.url}/nope.zarr", "--out", str(out))
        line = error_line(text)
        assert code == 1 and f"{http.url}/nope.zarr" in line and "not found" in line, line

        shutil.move(store / "test" / "ids" / "c" / "0", tmp_path / "ids0")
        code, text = run("fetch", f"{http.url}/digits.zarr", "--out", str(out), "-q")
        line = error_line(text)
        assert code == 1 and f"{http.url}/digits.zarr/test/ids/c/0: not found" in line, line
        shutil.rmtree(fetch_partial(out))

        http.require_auth("lab", "s3cret")
        code, text = run("fetch", f"{http.url}/digits.zarr", "--out", str(out))
        line = error_line(text)
        assert code == 1 and f"{http.url}/digits.zarr" in line and "forbidden" in line, line
        host = http.url.removeprefix("http://")
        code, text = run("fetch", f"http://lab:wrong@{host}/digits.zarr", "--out", str(out))
        line = error_line(text)
        assert code == 1 and f"http://lab:***@{host}/digits.zarr" in line and "wrong" not in line, line
        assert not out.exists()
        (store / "test" / "ids" / "c" / "0").write_bytes((tmp_path / "ids0").read_bytes())
        code, text = run("fetch", f"http://lab:s3cret@{host}/digits.zarr", "--out", str(out), "-q")
        assert code == 0, text
        same_store(store, out)
        shutil.rmtree(out)

    code, text = run("fetch", f"{http.url}/digits.zarr", "--out", str(out))  # the server is gone
    assert code == 1 and "unreachable" in error_line(text), text
    assert not out.exists()


def test_fetch_output_rules(store: Path, tmp_path: Path) -> None:
    out = tmp_path / "d.zarr"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with serve(store.parent) as http:
        url = f"{http.url}/digits.zarr"
        code, text = run("fetch", url, "--out", str(out))
        assert code == 1 and "already exists" in error_line(text)
        code, text = run("fetch", url, "--out", str(out), "--overwrite")
        assert code == 1 and "not a satkit store" in error_line(text)
        assert (out / "mine.txt").read_text() == "keep"
        for bad, what in [("s3://b/x.zarr", "not to a URL"), (str(tmp_path / "x.zip"), "not a .zip")]:
            code, text = run("fetch", url, "--out", bad)
            assert code == 1 and what in error_line(text), text
        code, text = run("fetch", str(store), "--out", str(tmp_path / "e.zarr"))
        assert code == 1 and "not a URL" in error_line(text)
        shutil.rmtree(out)
        fetch(url, out, progress=False)
        fetch(url, out, progress=False, overwrite=True)  # an existing store is replaced
        same_store(store, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.zarr", "srv"]


# --------------------------------------------------------------------------- fetch from S3


def test_fetch_from_s3(s3, digits_store: Path, packed: Path, tmp_path: Path) -> None:
    s3.make_bucket("share")
    s3.upload(digits_store, "share/digits.zarr")
    s3.upload(packed, "share/digits.zip")
    opts = s3.storage_options(readonly=True)
    res = fetch("s3://share/digits.zarr", tmp_path / "d.zarr", storage_options=opts, progress=False)
    assert res.downloaded == len([k for k in files(digits_store) if "/c/" in k])
    assert files(tmp_path / "d.zarr") == files(digits_store)
    args = [f"-S{k}={v}" for k, v in opts.items()]
    code, text = run("fetch", "s3://share/digits.zip", "--out", str(tmp_path / "z.zarr"), "-q", *args)
    assert code == 0, text
    same_store(digits_store, tmp_path / "z.zarr")
    bad = [f"-Skey={opts['key']}", "-Ssecret=wrong", f"-Sendpoint_url={opts['endpoint_url']}"]
    code, text = run("fetch", "s3://share/digits.zarr", "--out", str(tmp_path / "e.zarr"), *bad)
    line = error_line(text)
    assert code == 1 and "s3://share/digits.zarr" in line and "forbidden" in line, line


def test_fetch_refuses_a_file_larger_than_it_can_hold(store: Path, tmp_path: Path) -> None:
    """A server that answers a chunk with more bytes than the array's chunk can hold (a
    hostile or broken server): refused after at most that many bytes, nothing at --out."""
    victim = next(p for p in sorted((store / "train" / "saliency" / "ink" / "c").rglob("*")) if p.is_file())
    raw = 1024 * 16 * 16  # one chunk of the 16x16 uint8 map: 1,024 samples
    victim.write_bytes(os.urandom(raw * 2 + (2 << 20)))
    with serve(store.parent) as http:
        code, text = run("fetch", f"{http.url}/digits.zarr", "--out", str(tmp_path / "d.zarr"), "-q")
    line = error_line(text)
    assert code == 1 and "more than" in line and "ink/c" in line and "hostile" in line, line
    assert not (tmp_path / "d.zarr").exists()


def test_fetch_refuses_a_zip_entry_larger_than_it_can_hold(packed: Path, tmp_path: Path) -> None:
    """A zip bomb: a chunk entry that inflates far beyond what the chunk can hold is refused
    from the entry's header, before it is inflated."""
    srv = tmp_path / "srv"
    srv.mkdir()
    with zipfile.ZipFile(packed) as src, zipfile.ZipFile(srv / "bomb.zip", "w") as dst:
        for info in src.infolist():
            if info.filename == "train/saliency/ink/c/0/0/0":
                dst.writestr(info.filename, bytes(64 << 20), compress_type=zipfile.ZIP_DEFLATED)  # 64 MiB of zeros
            else:
                dst.writestr(info, src.read(info.filename))
    assert (srv / "bomb.zip").stat().st_size < (4 << 20)
    with serve(srv) as http:
        code, text = run("fetch", f"{http.url}/bomb.zip", "--out", str(tmp_path / "d.zarr"), "-q")
    line = error_line(text)
    assert code == 1 and "more than" in line and "train/saliency/ink/c/0/0/0" in line, line
    assert not (tmp_path / "d.zarr").exists()
