"""Crafted, damaged and concurrent input to the sharing commands: verify, pack, fetch, remote open.

Each test is a way found to make satkit lie (report success on data that is not what it
claims), hang, hold unbounded memory or end in something other than one line naming the
file or URL. Servers are tests/httpserver.py's (its FloodServer is the hostile one).
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from satdata.cli import main
from tests.httpserver import FloodServer


def run(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(main, list(args))
    return res.exit_code, res.output


# A server that ignores Range and floods chosen files (tests/httpserver.py)
hostile = FloodServer


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



# --------------------------------------------------------------------------- servers that send more


FLOOD = 256 << 20  # what the hostile server sends for one file


def test_fetch_reads_no_more_than_a_file_can_hold_from_a_server_that_ignores_range(store: Path) -> None:
    """fetch asks for at most what a chunk can hold (a Range request) and checks the length;
    fsspec read the whole answer first, so a server ignoring Range held the whole flood in
    memory (1.5 GB per chunk file: 5.9 GB of memory for two) before the refusal."""
    key = "train/saliency/ink/c/0/0/0"
    with hostile(store.parent, {key: FLOOD}) as srv:
        code, text = run("fetch", f"{srv.url}/digits.zarr", "--out", str(store.parent.parent / "got.zarr"), "-q")
    assert code == 1 and "more than" in text and key in text, text
    assert sum(srv.sent.values()) < FLOOD // 4, srv.sent  # the client hung up early
    assert not (store.parent.parent / "got.zarr").exists()


def test_opening_a_url_reads_no_more_than_metadata_can_hold(store: Path) -> None:
    """The root zarr.json read to open a store at a URL: bounded the same way."""
    from satdata.remote import METADATA_LIMIT

    with hostile(store.parent, {"digits.zarr/zarr.json": 2 * FLOOD}) as srv:
        code, text = run("info", f"{srv.url}/digits.zarr")
    assert code == 1 and "larger than" in text and f"{srv.url}/digits.zarr" in text, text
    assert sum(srv.sent.values()) < METADATA_LIMIT + FLOOD // 4, srv.sent


@pytest.mark.parametrize("kept", [0.0, 0.5])
def test_a_zip_from_a_server_that_ignores_range_is_streamed_and_resumed_afresh(store: Path, tmp_path: Path,
                                                                             kept: float) -> None:
    """A server without Range requests sends the whole .zip: it is written as it arrives
    (the whole file was held in memory), and a download an earlier run left half done
    starts over (it used to end in 'remove ... and run again')."""
    from satdata.share import fetch, fetch_partial_zip, pack
    from satdata.store import open_store, store_digest

    www = tmp_path / "www"
    www.mkdir()
    pack(store, www / "lab.zip", progress=False)
    out = tmp_path / "got.zarr"
    data = (www / "lab.zip").read_bytes()
    if kept:
        fetch_partial_zip(out).write_bytes(data[: int(len(data) * kept)])
    with hostile(www) as srv:
        res = fetch(f"{srv.url}/lab.zip", out, progress=False, zip_piece=1 << 16)
    assert res.bytes == len(data) and res.reused == 0
    assert store_digest(open_store(str(out)).info) == store_digest(open_store(str(store)).info)


# --------------------------------------------------------------------------- pack


@pytest.mark.parametrize("kind", ["fifo", "directory", "huge"])
def test_pack_refuses_a_chunk_that_is_not_a_small_regular_file(store: Path, tmp_path: Path, kind: str) -> None:
    """A FIFO where a chunk file belongs blocked pack forever (it opened and read it), a
    directory ended in 'is a directory (EISDIR)' naming no store, and a sparse 300 MB file was
    read whole into memory before its digest was compared; now each is one line naming the
    store and the file, before it is read, and no zip is left."""
    import os
    import subprocess
    import sys

    victim = store / "train" / "ids" / "c" / "0"
    victim.unlink()
    if kind == "fifo":
        os.mkfifo(victim)
    elif kind == "directory":
        victim.mkdir()
    else:
        with open(victim, "wb") as f:
            f.truncate(300 << 20)  # sparse: more than a chunk of ids can hold
    out = tmp_path / "out" / "d.zip"
    proc = subprocess.run([sys.executable, "-m", "satdata", "pack", str(store), "--out", str(out), "-q"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith(f"Error: {store}: train/ids/c/0 ") and "damaged" in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_pack_stopped_by_sigterm_leaves_no_partial_zip(store: Path, tmp_path: Path) -> None:
    """SIGTERM (a job scheduler, `timeout`) ended pack without its cleanup: the hidden
    .OUT.zip.partial-PID stayed behind for good; now it is removed, as on Ctrl-C."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "out" / "d.zip"
    out.parent.mkdir()
    slow = ("import sys, time, satdata.share as s; d = s._digest; "
            "s._digest = lambda b: (time.sleep(0.2), d(b))[1]; "
            "from satdata.cli import main; main(sys.argv[1:])")
    proc = subprocess.Popen([sys.executable, "-c", slow, "pack", str(store), "--out", str(out), "-q"],
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while not list(out.parent.glob(".d.zip.partial-*")) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert list(out.parent.glob(".d.zip.partial-*")), "pack never started writing"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode != 0 and "interrupted" in err, err
    assert not list(out.parent.iterdir())


# --------------------------------------------------------------------------- crafted metadata


NESTED = b"[" * 100_000 + b"]" * 100_000  # valid JSON, deeper than Python's parser goes


def test_a_manifest_nested_too_deeply_is_named(store: Path, tmp_path: Path) -> None:
    """It ended in 'data nested too deeply to read (RecursionError)', naming no file."""
    manifest = tmp_path / "deep.json"
    manifest.write_bytes(NESTED)
    code, text = run("verify", str(store), "--manifest", str(manifest))
    assert code == 1 and f"{manifest}: not a manifest" in text and "nested too deeply" in text, text


def test_a_served_root_zarr_json_nested_too_deeply_is_named(store: Path) -> None:
    """fetch of a store whose root zarr.json is nested too deeply: it named no URL."""
    (store / "zarr.json").write_bytes(NESTED)
    from tests.httpserver import serve

    with serve(store.parent) as http:
        code, text = run("fetch", f"{http.url}/digits.zarr", "--out", str(store.parent / "got.zarr"), "-q")
    assert code == 1 and f"{http.url}/digits.zarr: not a satkit store" in text and "nested too deeply" in text, text


@pytest.mark.parametrize("root", [NESTED, b"[1, 2]", b"\xff\xfe not json", b'{"zarr_format": 3, "node_type": "array"}'])
def test_a_zip_with_a_crafted_root_zarr_json_is_one_line_naming_it(tmp_path: Path, root: bytes) -> None:
    """`satdata verify crafted.zip` ended in 'data nested too deeply to read', 'unexpected
    TypeError: pop expected at most 1 argument', 'text is not valid utf-16-le', or 'stored data
    cannot be decoded', none naming the zip (satdata/store.py opened a .zip catching only
    zip errors; a directory store's metadata was already caught)."""
    import zipfile

    z = tmp_path / "crafted.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("zarr.json", root)
    code, text = run("verify", str(z))
    assert code == 1 and text.startswith(f"Error: {z}: not a satkit store") and "unexpected" not in text, text


# --------------------------------------------------------------------------- fetch: resuming a directory


@pytest.mark.parametrize("where", ["zarr.json", ".zarr.json.tmp-1-ab", "train/zarr.json", "train/images/c/0/0/0/0"])
def test_a_directory_where_a_file_belongs_in_the_partial_download_is_cleared(store: Path, tmp_path: Path,
                                                                             where: str) -> None:
    """A directory in the hidden partial download where the store has a file (a damaged
    disk, a copy gone wrong) stopped every later fetch with 'is a directory (EISDIR)': the
    resume tidied files and links only. Now it is removed like any other leftover."""
    from satdata.share import fetch_partial
    from tests.httpserver import serve

    out = tmp_path / "got.zarr"
    (fetch_partial(out) / where / "inside").mkdir(parents=True)
    with serve(store.parent) as http:
        code, text = run("fetch", f"{http.url}/digits.zarr", "--out", str(out), "-q")
    assert code == 0, text
    assert not fetch_partial(out).exists()
    assert (out / where).is_file() if not where.startswith(".") else not (out / where).exists()


def test_verify_reports_a_fifo_where_a_chunk_file_belongs(store: Path) -> None:
    """verify opened a FIFO planted at a chunk's path and blocked forever (zarr's local store
    reads the file); now it is reported as that chunk's problem, never opened."""
    import os
    import subprocess
    import sys

    victim = store / "train" / "ids" / "c" / "0"
    victim.unlink()
    os.mkfifo(victim)
    proc = subprocess.run([sys.executable, "-m", "satdata", "verify", str(store)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "train/ids samples [0, 1442): chunk 0 cannot be read" in proc.stderr and "is a FIFO" in proc.stderr, proc.stderr


@pytest.mark.parametrize("how", ["verify", "fetch-keep-zip"])
def test_a_zip_bomb_entry_is_refused_before_it_is_inflated(store: Path, tmp_path: Path, how: str) -> None:
    """A packed store whose chunk entry inflates far beyond what the chunk can hold: verify
    (and fetch --out NAME.zip, which verifies the kept zip) inflated it whole (2.5 MB of zip
    held 1.3 GB); now the entry's declared size is compared with the chunk's before."""
    import zipfile

    from satdata.share import pack
    from tests.httpserver import serve

    key = "train/saliency/ink/c/0/0/0"
    good = tmp_path / "good.zip"
    pack(store, good, progress=False)
    www = tmp_path / "www"
    www.mkdir()
    bomb = www / "bomb.zip"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bomb, "w") as dst:
        for info in src.infolist():
            if info.filename == key:
                dst.writestr(key, bytes(64 << 20), compress_type=zipfile.ZIP_DEFLATED)
            else:
                dst.writestr(info, src.read(info.filename))
    if how == "verify":
        code, text = run("verify", str(bomb))
    else:
        with serve(www) as http:
            code, text = run("fetch", f"{http.url}/bomb.zip", "--out", str(tmp_path / "got.zip"), "-q")
        assert not (tmp_path / "got.zip").exists()
    assert code == 1 and f"{key} inflates to {64 << 20:,} bytes" in text, text


@pytest.mark.parametrize("where", ["local", "url"])
def test_a_zip_whose_metadata_inflates_beyond_any_store_is_refused(store: Path, tmp_path: Path, where: str) -> None:
    """An array's zarr.json padded with blanks (valid JSON) and deflated: zarr read it whole
    and verify said OK (2.3 MB of zip held 1 GB for 300 MB of blanks), from a local .zip or
    one on a server; now a zarr.json entry larger than any store's metadata is refused when
    the zip is opened."""
    import zipfile

    from satdata.remote import METADATA_LIMIT
    from satdata.share import pack

    good = tmp_path / "good.zip"
    pack(store, good, progress=False)
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bomb, "w") as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename == "train/images/zarr.json":
                dst.writestr(info.filename, data + b" " * (METADATA_LIMIT + 1), compress_type=zipfile.ZIP_DEFLATED)
            else:
                dst.writestr(info, data)
    if where == "local":
        code, text = run("verify", str(bomb))
        shown = str(bomb)
    else:
        from tests.httpserver import serve

        with serve(tmp_path) as http:
            shown = f"{http.url}/bomb.zip"
            code, text = run("verify", shown)
    assert code == 1 and f"{shown}: train/images/zarr.json inflates to" in text, text


def test_a_huge_file_in_the_partial_download_is_not_read_whole(store: Path, tmp_path: Path) -> None:
    """Resuming, fetch read every file of the partial download whole to check its digest: a
    sparse 800 MB file at a chunk's key (a damaged disk) was read into memory; now a file
    larger than its chunk can hold is removed unread, and fetched again."""
    import subprocess
    import sys

    from satdata.share import fetch_partial
    from tests.httpserver import serve

    out = tmp_path / "got.zarr"
    victim = fetch_partial(out) / "train" / "images" / "c" / "0" / "0" / "0" / "0"
    victim.parent.mkdir(parents=True)
    with open(victim, "wb") as f:
        f.truncate(800 << 20)
    # the peak memory of the fetch alone (a child's high-water mark starts at its parent's):
    # reset it (Linux: 5 > /proc/self/clear_refs), then read VmHWM
    peak = ("import re, sys; from pathlib import Path; from satdata.share import fetch; "
            "Path('/proc/self/clear_refs').write_text('5'); fetch(sys.argv[1], sys.argv[2], progress=False); "
            "print(re.search(r'VmHWM:\\s*(\\d+)', Path('/proc/self/status').read_text()).group(1))")
    with serve(store.parent) as http:
        proc = subprocess.run([sys.executable, "-c", peak, f"{http.url}/digits.zarr", str(out)], capture_output=True,
                              text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.split()[-1]) < 500 * 1024, proc.stdout  # KiB
    assert (out / "train" / "images" / "c" / "0" / "0" / "0" / "0").stat().st_size < (1 << 20)


def test_pack_removes_the_partial_zip_of_a_killed_pack(store: Path, tmp_path: Path) -> None:
    """A pack killed with SIGKILL leaves .OUT.zip.partial-PID (no cleanup can run); it stayed
    for good. The next pack into the same OUT removes it (its process is gone); a partial
    zip of a live process, and one that is a link, are left alone."""
    import os
    import subprocess
    import sys

    from satdata.share import pack

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "d.zip"
    stale = tmp_path / f".d.zip.partial-{dead.pid}"
    stale.write_bytes(b"PK half a zip")
    live = tmp_path / f".d.zip.partial-{os.getppid()}"
    live.write_bytes(b"PK someone else's")
    link = tmp_path / f".d.zip.partial-{dead.pid + 100000}"
    link.symlink_to(live)
    pack(store, out, progress=False)
    assert not stale.exists() and live.exists() and link.is_symlink()


def test_opening_a_url_reads_no_more_of_an_array_zarr_json_than_metadata_can_hold(store: Path) -> None:
    """zarr reads an array's zarr.json whole through fsspec, which took the whole answer into
    memory: a server flooding train/images/zarr.json (1 GB) made `satdata info URL` hold
    2.3 GB. Now that read stops after METADATA_LIMIT + 1 bytes, with one line naming it."""
    from satdata.remote import METADATA_LIMIT

    with hostile(store.parent, {"digits.zarr/train/images/zarr.json": 2 * FLOOD}) as srv:
        code, text = run("info", f"{srv.url}/digits.zarr")
    assert code == 1 and "train/images" in text and "larger than" in text, text
    assert sum(srv.sent.values()) < METADATA_LIMIT + FLOOD // 4, srv.sent
