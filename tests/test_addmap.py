"""Adding a map to a finished store: atomic commit, overwrite, cleanup, and SIGKILL at several moments."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from satdata.addmap import NewMap, add_map, check_can_add, cleanup_strays, local_store_dir, store_lock
from satdata.errors import SatkitError, StoreError
from satdata.gc import collect
from satdata.store import open_store
from satdata.verify import verify_digests


def snapshot(root: Path) -> dict[str, str]:
    """Every file under root -> sha256 of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture()
def store(digits_store: Path, tmp_path: Path) -> Path:
    out = tmp_path / "digits.zarr"
    shutil.copytree(digits_store, out)
    return out


def unit_blocks(n: int, seed: int, block: int = 100):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(n, 16, 16), dtype=np.uint8)
    return data, lambda: (data[a:a + block] for a in range(0, n, block))


def test_add_map_commits_under_a_fresh_array_and_verifies(store: Path) -> None:
    info = open_store(store).info
    values = {s: unit_blocks(n, i)[0] for i, (s, n) in enumerate(info.splits.items())}

    def produce(split: str):
        d = values[split]
        return (d[a:a + 77] for a in range(0, len(d), 77))  # blocks that straddle chunks

    new = add_map(store, NewMap("noise", "unit", "test", provenance={"why": "test"}), produce)
    st = open_store(store)
    mi = st.info.maps["noise"]
    assert mi.array.startswith("noise.") and mi.array != "noise"
    assert mi.provenance["why"] == "test" and mi.provenance["splits_computed"] == ["train", "test"]
    for s in info.splits:
        assert (st.load(s, "saliency", "noise") == values[s]).all()
        assert f"{s}/saliency/{mi.array}" in st.info.digests
        # chunked like the images, so a split loads in a few whole-chunk reads
        assert st.array(s, "saliency", "noise").chunks[0] == st.array(s, "images").chunks[0]
    assert verify_digests(st).ok
    assert new.maps["noise"] == mi
    # the store's other content is untouched
    assert {k: v for k, v in st.info.digests.items() if "noise" not in k} == info.digests


def test_existing_name_needs_overwrite_then_old_arrays_go(store: Path) -> None:
    info = open_store(store).info
    with pytest.raises(SatkitError, match="already has a map 'ink'.*--overwrite"):
        add_map(store, NewMap("ink", "binary", "mask"), lambda s: iter(()))
    before = snapshot(store)
    flipped = {s: 1 - open_store(store).load(s, "saliency", "ink") for s in info.splits}
    add_map(store, NewMap("ink", "binary", "mask"), lambda s: iter([flipped[s]]), overwrite=True)
    st = open_store(store)
    assert st.info.maps["ink"].array != ""
    for s in info.splits:
        assert (store / s / "saliency" / "ink").is_dir()  # kept for readers that opened it, until gc
        assert (st.load(s, "saliency", "ink") == flipped[s]).all()
        assert f"{s}/saliency/ink" not in st.info.digests
    assert verify_digests(st).ok
    assert [r for r, _ in collect(store).removed] == ["train/saliency/ink", "test/saliency/ink"]
    assert not any((store / s / "saliency" / "ink").exists() for s in info.splits)  # the replaced arrays are gone
    # nothing outside the replaced map changed
    after = snapshot(store)
    assert {k: v for k, v in after.items() if "/ink" not in k and k != "zarr.json"} == {
        k: v for k, v in before.items() if "/ink" not in k and k != "zarr.json"}


def test_a_failure_leaves_the_store_exactly_as_it_was(store: Path) -> None:
    before = snapshot(store)

    def produce(split: str):
        yield np.zeros((300, 16, 16), np.uint8)
        yield np.zeros((300, 16, 16), np.uint8)
        raise RuntimeError("teacher crashed")

    with pytest.raises(RuntimeError, match="teacher crashed"):
        add_map(store, NewMap("m", "unit", "test"), produce)
    assert snapshot(store) == before

    with pytest.raises(SatkitError, match="does not fit"):  # wrong dtype for the encoding
        add_map(store, NewMap("m", "signed", "test"), lambda s: iter([np.zeros((5, 16, 16), np.uint8)]))
    with pytest.raises(SatkitError, match="maps were produced for a split of"):  # too few samples
        add_map(store, NewMap("m", "unit", "test"), lambda s: iter([np.zeros((5, 16, 16), np.uint8)]))
    with pytest.raises(SatkitError, match="more than the split"):
        add_map(store, NewMap("m", "unit", "test"), lambda s: iter([np.zeros((5000, 16, 16), np.uint8)]))
    assert snapshot(store) == before
    assert verify_digests(open_store(store)).ok


def test_three_channel_signed_map(store: Path) -> None:
    info = open_store(store).info
    rng = np.random.default_rng(1)
    vals = {s: rng.integers(-127, 128, size=(n, 16, 16, 3), dtype=np.int8) for s, n in info.splits.items()}
    add_map(store, NewMap("gbp", "signed", "gbp", channels=3), lambda s: iter([vals[s]]))
    st = open_store(store)
    for s in info.splits:
        assert st.load(s, "saliency", "gbp").shape == (info.splits[s], 16, 16, 3)
        assert (st.load(s, "saliency", "gbp") == vals[s]).all()
    assert verify_digests(st).ok


def test_subset_of_splits_keeps_the_others(store: Path) -> None:
    with pytest.raises(SatkitError, match="must cover every split.*no map 'new'"):
        check_can_add(store, "new", splits=["train"])
    with pytest.raises(SatkitError, match="--splits: .*has no split 'val'"):
        check_can_add(store, "ink", splits=["val"], overwrite=True)
    with pytest.raises(SatkitError, match="cannot be kept for a test map"):
        add_map(store, NewMap("ink", "unit", "test"), lambda s: iter(()), splits=["train"], overwrite=True)
    old_test = open_store(store).load("test", "saliency", "ink")
    n = open_store(store).info.splits["train"]
    add_map(store, NewMap("ink", "binary", "mask"), lambda s: iter([np.ones((n, 16, 16), np.uint8)]),
            splits=["train"], overwrite=True)
    st = open_store(store)
    assert (st.load("train", "saliency", "ink") == 1).all()
    assert (st.load("test", "saliency", "ink") == old_test).all()
    prov = st.info.maps["ink"].provenance
    assert prov["splits_computed"] == ["train"] and prov["splits_kept"] == ["test"]
    assert verify_digests(st).ok


def test_only_local_directories_and_valid_names(store: Path, tmp_path: Path) -> None:
    with pytest.raises(SatkitError, match="local store directory"):
        local_store_dir(tmp_path / "x.zip")
    with pytest.raises(SatkitError, match="local store directory"):
        local_store_dir("s3://bucket/x.zarr")
    with pytest.raises(StoreError, match="no such store"):
        local_store_dir(tmp_path / "nothing.zarr")
    (tmp_path / "file").write_text("x")
    with pytest.raises(SatkitError, match="this is a file"):
        local_store_dir(tmp_path / "file")
    for bad in ("", "a b", "x.y", "../z", "a" * 65):
        with pytest.raises(SatkitError, match="--name"):
            add_map(store, NewMap(bad, "unit", "t"), lambda s: iter(()))


def test_a_concurrent_change_is_refused(store: Path) -> None:
    with store_lock(store):
        with pytest.raises(SatkitError, match="another satdata command"):
            add_map(store, NewMap("m", "unit", "t"), lambda s: iter(()))
    # released: works now
    info = open_store(store).info
    add_map(store, NewMap("m", "unit", "t"), lambda s: iter([np.zeros((info.splits[s], 16, 16), np.uint8)]))


def test_cleanup_removes_only_unreferenced_leftovers(store: Path) -> None:
    st = open_store(store)
    stray = store / "train" / "saliency" / "m.deadbeef"
    stray.mkdir()
    (stray / "zarr.json").write_text("{}")
    (store / ".zarr.json.tmp-123").write_text("{}")
    removed = cleanup_strays(store, st.info)
    assert removed == ["train/saliency/m.deadbeef", ".zarr.json.tmp-123"]
    assert (store / "train" / "saliency" / "ink").is_dir() and (store / "test" / "saliency" / "box").is_dir()
    assert verify_digests(open_store(store)).ok


# --------------------------------------------------------------------------- SIGKILL

KILL_SCRIPT = textwrap.dedent('''
    import os, signal, sys
    import numpy as np
    import zarr
    import satdata.addmap as am
    from satdata.store import open_store

    store, moment = sys.argv[1], sys.argv[2]
    info = open_store(store).info

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if moment == "write":  # mid-way through the second split's chunks
        calls = [0]
        real_set = zarr.Array.__setitem__
        def setitem(self, key, value):
            calls[0] += 1
            if calls[0] == 3:
                die()
            return real_set(self, key, value)
        zarr.Array.__setitem__ = setitem
    elif moment == "digest":  # arrays written, digesting
        real_digest = am.digest_array
        n = [0]
        def digest(arr):
            n[0] += 1
            if n[0] == 2:
                die()
            return real_digest(arr)
        am.digest_array = digest
    elif moment == "commit":  # the new zarr.json is written aside, not yet renamed
        real_replace = os.replace
        def replace(src, dst):
            if ".zarr.json.tmp" in str(src):
                die()
            return real_replace(src, dst)
        os.replace = replace
    elif moment == "after-commit":  # committed, the replaced arrays not yet removed
        real_write_info = am.write_info
        def write_info(path, new_info):
            real_write_info(path, new_info)
            die()
        am.write_info = write_info

    name = "ink" if moment == "after-commit" else "newmap"
    def produce(split):
        n = info.splits[split]
        for a in range(0, n, 256):
            yield np.ones((min(n, a + 256) - a, 16, 16), np.uint8)
    am.add_map(store, am.NewMap(name, "binary", "mask"), produce, overwrite=True)
    print("finished without being killed")
''')


@pytest.mark.parametrize("moment", ["write", "digest", "commit", "after-commit"])
def test_sigkill_at_any_moment_leaves_a_valid_store(store: Path, tmp_path: Path, moment: str) -> None:
    from satdata.cli import main

    before = snapshot(store)
    info_before = open_store(store).info
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, str(script), str(store), moment], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr

    st = open_store(store)
    assert verify_digests(st).ok
    res = CliRunner().invoke(main, ["verify", str(store)])
    assert res.exit_code == 0 and "OK" in res.output, res.output
    after = snapshot(store)
    extra = sorted(set(after) - set(before))
    if moment == "after-commit":
        # fully switched over to the new map; the old arrays are now unreferenced leftovers
        assert st.info.maps["ink"].array.startswith("ink.")
        assert all((st.load(s, "saliency", "ink") == 1).all() for s in st.info.splits)
        assert (store / "train" / "saliency" / "ink").is_dir()
    else:
        # exactly as it was: same attributes, every original file byte for byte, and at
        # most unreferenced leftovers that nothing reads
        assert st.info == info_before
        assert {k: after[k] for k in before} == before
        assert all("/saliency/newmap." in k or k.startswith(".zarr.json.tmp-") for k in extra), extra
        if moment == "commit":
            assert any(k.startswith(".zarr.json.tmp-") for k in extra)

    # the next change works on it; `satdata gc` removes the leftovers and leaves nothing
    # unreferenced behind
    logs: list[str] = []
    n = st.info.splits
    add_map(store, NewMap("later", "unit", "t"), lambda s: iter([np.zeros((n[s], 16, 16), np.uint8)]),
            log=logs.append)
    removed = [r for r, _ in collect(store).removed]
    final = open_store(store)
    referenced = {m.array_name for m in final.info.maps.values()}
    for s in final.info.splits:
        assert {p.name for p in (store / s / "saliency").iterdir() if p.is_dir()} == referenced
    assert not list(store.glob(".zarr.json.tmp-*"))
    assert verify_digests(final).ok
    if moment == "commit":  # the next change removes a killed commit's tmp file itself
        assert any("interrupted change" in m for m in logs)
    if any("/saliency/" in k for k in extra) or moment == "after-commit":
        assert removed


def test_an_interrupt_right_after_the_commit_keeps_the_new_map(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import satdata.addmap as am

    real = am.write_info

    def commit_then_interrupt(path: Path, info: object) -> None:
        real(path, info)
        raise KeyboardInterrupt  # e.g. SIGTERM delivered just after the rename

    monkeypatch.setattr(am, "write_info", commit_then_interrupt)
    n = open_store(store).info.splits
    with pytest.raises(KeyboardInterrupt):
        add_map(store, NewMap("m", "unit", "t"), lambda s: iter([np.full((n[s], 16, 16), 7, np.uint8)]))
    st = open_store(store)
    assert (st.load("test", "saliency", "m") == 7).all()
    assert verify_digests(st).ok
