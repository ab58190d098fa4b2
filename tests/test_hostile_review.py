"""Hostile input found in review: each case once made a command crash, lie or leave output behind.

Every case runs the real CLI (click's runner, in this process) and asserts what satkit
promises for a failure a user can cause: a non-zero exit, one line on stderr starting with
"Error:" that names the file or option and the problem, no traceback, and nothing written
where the command would have written. The stores are tiny (4x4 images) so the module runs
in seconds.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner, Result

from satdata.cli import main as satdata_main
from satdata.store import ArrayWriter, MapInfo
from sattrain.cli import main as sattrain_main
from tests.fixtures import minimal_run, untrained_checkpoint

CLASSES = ["a", "b", "c"]
SIZE = (4, 4)
QUICK = ["--epochs", "1", "--batch-size", "8", "--summary-samples", "0", "--device", "cpu", "--eval-steps", "1"]


def make_store(path: Path, splits: dict[str, int]) -> Path:
    """A complete tiny store of 4x4 images, map 'ink' (binary); splits of the sizes given."""
    rng = np.random.default_rng(0)
    w = ArrayWriter(path, dataset="tiny", classes=CLASSES, image_size=SIZE, label_kind="single",
                    maps={"ink": MapInfo(name="ink", encoding="binary", kind="mask")})
    for split, n in splits.items():
        w.create_split(split, n)
        if n:
            images = rng.integers(1, 255, size=(n, *SIZE, 3), dtype=np.uint8)
            labels = np.arange(n, dtype=np.int64) % len(CLASSES)
            w.write(split, 0, images, labels, [f"{split}{i}" for i in range(n)],
                    {"ink": (images[..., 0] > 127).astype(np.uint8)})
        w.close_split(split, n)
    w.finish({"source": "test_hostile_review"})
    return path


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_store(tmp_path_factory.mktemp("pristine") / "tiny.zarr", {"train": 16, "test": 8})


@pytest.fixture
def store(tmp_path: Path, pristine: Path) -> Path:
    """A copy of the pristine store that a test may damage."""
    return Path(shutil.copytree(pristine, tmp_path / "store.zarr"))


def invoke(cli: Any, args: list[Any]) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args])


def expect_error(cli: Any, args: list[Any]) -> str:
    """Run a failing command; assert one "Error:" line and no traceback; return the line."""
    res = invoke(cli, args)
    assert res.exit_code not in (0, None), res.output
    assert isinstance(res.exception, SystemExit), f"escaped: {res.exception!r}"
    assert "Traceback" not in res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), res.stderr
    assert "unexpected" not in lines[0], lines[0]
    return lines[0]


def edit_array_meta(store: Path, array: str, change: Any) -> None:
    path = store / array / "zarr.json"
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


def chunk_files(store: Path, array: str) -> list[Path]:
    return sorted(p for p in (store / array / "c").rglob("*") if p.is_file())


# --------------------------------------------------------------------------- array metadata


def _rechunk_and_lose_the_files(store: Path) -> None:
    """The images' zarr.json says chunks of 8 (the digests record one of 16) and the files are gone:
    zarr would read every sample as zeros."""
    edit_array_meta(store, "train/images", lambda m: m["chunk_grid"]["configuration"]["chunk_shape"].__setitem__(0, 8))
    for f in chunk_files(store, "train/images"):
        f.unlink()


def test_export_refuses_an_array_whose_chunks_differ_from_its_digests(store: Path, tmp_path: Path) -> None:
    _rechunk_and_lose_the_files(store)
    out = tmp_path / "out.h5"
    line = expect_error(satdata_main, ["export", store, "--out", out])
    assert f"{store}: array train/images has 2 chunks of 8 samples, but its recorded digests list 1 of 16" in line
    assert not out.exists()


def test_run_refuses_an_array_whose_chunks_differ_from_its_digests(store: Path, tmp_path: Path) -> None:
    _rechunk_and_lose_the_files(store)
    out = tmp_path / "run"
    line = expect_error(sattrain_main, ["run", store, "--out", out, *QUICK])
    assert "array train/images has 2 chunks of 8 samples" in line and "the store is damaged" in line
    assert not (out / "config.json").exists() and not (out / "checkpoint.pt").exists()


def _add_gzip(store: Path) -> None:
    """A codec added to the images' zarr.json: the raw files no longer decode."""
    edit_array_meta(store, "train/images", lambda m: m["codecs"].append({"name": "gzip", "configuration": {"level": 1}}))


@pytest.mark.parametrize("command", ["export", "run"])
def test_a_file_zarr_cannot_decode_is_named(store: Path, tmp_path: Path, command: str) -> None:
    _add_gzip(store)
    if command == "export":
        line = expect_error(satdata_main, ["export", store, "--out", tmp_path / "out.h5"])
        assert not (tmp_path / "out.h5").exists()
    else:
        line = expect_error(sattrain_main, ["run", store, "--out", tmp_path / "run", *QUICK])
    assert f"{store}: array train/images samples [0, 16) cannot be read (BadGzipFile" in line, line
    assert "the store is damaged" in line


# --------------------------------------------------------------------------- empty and one-sample splits


@pytest.fixture(scope="module")
def uneven(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Stores a converter can write (ArrayWriter takes a split of any size): an empty test
    split, an empty train split, a train split of one sample."""
    root = tmp_path_factory.mktemp("uneven")
    return {name: make_store(root / f"{name}.zarr", splits) for name, splits in {
        "test empty": {"train": 16, "test": 0},
        "train empty": {"train": 0, "test": 8},
        "train of one": {"train": 1, "test": 8},
    }.items()}


@pytest.mark.parametrize("case, fragment", [
    ("test empty", "--eval-split: {store} has no samples in split 'test' to evaluate on (splits: train 16, test 0)"),
    ("train empty", "{store}: the train split has 0 sample(s); training needs at least two"),
    ("train of one", "{store}: the train split has 1 sample(s); training needs at least two"),
])
def test_run_refuses_a_split_too_small_before_writing_anything(uneven: dict[str, Path], tmp_path: Path, case: str,
                                                               fragment: str) -> None:
    out = tmp_path / "run"
    line = expect_error(sattrain_main, ["run", uneven[case], "--out", out, *QUICK])
    assert fragment.format(store=uneven[case]) in line, line
    assert not out.exists()  # neither a config.json nor a metrics.jsonl of a run that never trained


def test_compare_scores_an_empty_split_as_no_images(uneven: dict[str, Path]) -> None:
    res = invoke(satdata_main, ["compare", uneven["test empty"], "--map", "ink", "--against", "ink", "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)["splits"]
    assert got["test"]["n_images"] == 0 and got["test"]["overall"]["n"] == 0
    assert got["train"]["n_images"] == 16


def test_preview_of_an_empty_split_is_one_line(uneven: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "p.png"
    line = expect_error(satdata_main, ["preview", uneven["train empty"], "--out", out])
    assert f"--split: {uneven['train empty']} has no samples in split 'train'" in line, line
    assert not out.exists()
    assert invoke(satdata_main, ["preview", uneven["train empty"], "--split", "test", "--out", out]).exit_code == 0


# --------------------------------------------------------------------------- option values


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid (untrained) small-cnn checkpoint for the tiny stores: a teacher and an eval target."""
    return untrained_checkpoint(tmp_path_factory.mktemp("ckpt") / "checkpoint.pt", CLASSES, SIZE)


def _eval(ckpt: Path, store: Path, out: Path, *extra: Any) -> list[Any]:
    return ["eval", ckpt, "--store", store, "--attacks", "pgd", "--eps", "8/255", "--steps", "1", "-q", "--out", out,
            *extra]


@pytest.mark.parametrize("device", ["meta", "mps", "xla"])
def test_a_device_torch_knows_but_satkit_cannot_use_is_one_line(store: Path, ckpt: Path, tmp_path: Path,
                                                                 device: str) -> None:
    out = tmp_path / "e.json"
    line = expect_error(sattrain_main, _eval(ckpt, store, out, "--device", device))
    assert f"--device: '{device}' is not a device satkit runs on" in line, line
    assert not out.exists()
    before = sorted(p.relative_to(store) for p in store.rglob("*"))
    line = expect_error(satdata_main, ["saliency", store, "--teacher", ckpt, "--method", "gradcam", "--name", "g",
                                       "--device", device])
    assert f"--device: '{device}' is not a device satkit runs on" in line, line
    assert sorted(p.relative_to(store) for p in store.rglob("*")) == before


@pytest.mark.parametrize("seed, fragment", [("-1", "got -1"), (str(2 ** 64), f"got {2 ** 64}")])
def test_eval_refuses_a_seed_its_generators_cannot_take(store: Path, ckpt: Path, tmp_path: Path, seed: str,
                                                        fragment: str) -> None:
    out = tmp_path / "e.json"
    line = expect_error(sattrain_main, _eval(ckpt, store, out, "--device", "cpu", "--seed", seed))
    assert line.startswith("Error: --seed: must be in [0, 2**64)") and fragment in line, line
    assert not out.exists()
    res = invoke(sattrain_main, _eval(ckpt, store, out, "--device", "cpu", "--seed", str(2 ** 64 - 1)))
    assert res.exit_code == 0 and out.exists(), res.output  # the largest seed the generators take


def test_preview_refuses_a_negative_seed(store: Path, tmp_path: Path) -> None:
    out = tmp_path / "p.png"
    assert expect_error(satdata_main, ["preview", store, "--seed", "-1", "--out", out]) == \
        "Error: --seed: must be >= 0, got -1"
    assert not out.exists()


# --------------------------------------------------------------------------- eval --out


@pytest.mark.parametrize("victim", ["store's zarr.json", "checkpoint", "text"])
def test_eval_never_replaces_a_file_that_is_not_an_evaluation(store: Path, ckpt: Path, tmp_path: Path,
                                                              victim: str) -> None:
    """`--out` at a store's zarr.json or at the checkpoint being evaluated once replaced it with
    the results: the store no longer opened, the run lost its weights."""
    kept = tmp_path / "kept"
    kept.mkdir()
    shutil.copy(ckpt, kept / "checkpoint.pt")
    (kept / "notes.txt").write_text("my notes\n")
    out = {"store's zarr.json": store / "zarr.json", "checkpoint": kept / "checkpoint.pt",
           "text": kept / "notes.txt"}[victim]
    before = out.read_bytes()
    line = expect_error(sattrain_main, _eval(kept / "checkpoint.pt", store, out, "--device", "cpu"))
    assert f"--out: {out} exists and is not the result of an evaluation; refusing to replace it" in line, line
    assert out.read_bytes() == before
    assert invoke(satdata_main, ["verify", store]).exit_code == 0
    # what it does replace: an empty file (mktemp) and its own earlier result
    out = tmp_path / "e.json"
    out.write_text("")
    for _ in range(2):
        res = invoke(sattrain_main, _eval(kept / "checkpoint.pt", store, out, "--device", "cpu"))
        assert res.exit_code == 0, res.output
        assert json.loads(out.read_text())["samples"] == 8


# --------------------------------------------------------------------------- preview and export --out


def test_preview_never_writes_through_a_link_planted_at_out(store: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("must survive\n")
    link = tmp_path / "sheet.png"
    link.symlink_to(victim)
    line = expect_error(satdata_main, ["preview", store, "--out", link])
    assert f"--out: {link} exists and is not a regular file" in line, line
    assert victim.read_text() == "must survive\n" and link.is_symlink()


@pytest.mark.parametrize("victim", ["store's zarr.json", "checkpoint"])
def test_preview_never_replaces_a_file_that_is_not_a_png(store: Path, ckpt: Path, tmp_path: Path, victim: str) -> None:
    kept = Path(shutil.copy(ckpt, tmp_path / "checkpoint.pt"))
    out = {"store's zarr.json": store / "zarr.json", "checkpoint": kept}[victim]
    before = out.read_bytes()
    line = expect_error(satdata_main, ["preview", store, "--out", out])
    assert f"--out: {out} exists and is not a PNG image; refusing to replace it" in line, line
    assert out.read_bytes() == before
    assert invoke(satdata_main, ["verify", store]).exit_code == 0
    # an earlier sheet is replaced, aside and renamed: no temporary file is left
    sheet = tmp_path / "sheets" / "p.png"
    for _ in range(2):
        assert invoke(satdata_main, ["preview", store, "--out", sheet]).exit_code == 0
    assert sorted(p.name for p in sheet.parent.iterdir()) == ["p.png"]


@pytest.mark.parametrize("where", ["zarr.json", "inside.h5"])
def test_export_refuses_an_out_inside_the_store_it_reads(store: Path, where: str) -> None:
    out = store / where
    before = sorted((p.relative_to(store), p.read_bytes()) for p in store.rglob("*") if p.is_file())
    line = expect_error(satdata_main, ["export", store, "--out", out, "--overwrite"])
    assert f"--out: {out} is inside the store {store}; write the file elsewhere" in line, line
    assert sorted((p.relative_to(store), p.read_bytes()) for p in store.rglob("*") if p.is_file()) == before


# --------------------------------------------------------------------------- sattrain report


@pytest.mark.parametrize("how", ["the same path", "another spelling", "a link to it"])
def test_report_refuses_a_run_given_twice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    """A run listed twice (an overlapping glob) was reported as two seeds of its configuration,
    its numbers averaged with themselves (n = 2, std 0)."""
    monkeypatch.chdir(tmp_path)
    run = minimal_run(tmp_path / "runs" / "sat-s0", 0)
    other = minimal_run(tmp_path / "runs" / "sat-s1", 1)
    again = {"the same path": run, "another spelling": Path("runs/../runs/sat-s0"),
             "a link to it": tmp_path / "link"}[how]
    if how == "a link to it":
        again.symlink_to(run)
    out = tmp_path / "report"
    line = expect_error(sattrain_main, ["report", run, other, again, "--out", out])
    assert f"RUN_DIRS: {again} is given twice" in line, line
    assert not out.exists()


# --------------------------------------------------------------------------- satdata build


def test_build_refuses_a_split_given_twice(tmp_path: Path) -> None:
    """`--splits train,test,train` once failed mid-build with 'stored data cannot be decoded
    (ContainsArrayError ...); the store is damaged', blaming a store that was never there."""
    out = tmp_path / "d.zarr"
    line = expect_error(satdata_main, ["build", "--source", "digits", "--size", "8", "-q", "--splits",
                                       "train,test,train", "--out", out])
    assert line == "Error: --splits: split 'train' is given 2 times; give each split once", line
    assert sorted(tmp_path.iterdir()) == []
