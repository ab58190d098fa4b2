"""cifar10 / cifar100: pixel layout, labels and class order, no maps, bad files, speed."""

from __future__ import annotations

import pickle
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from satdata.build import BuildConfig, build, transform
from satdata.cli import main
from satdata.errors import SourceError
from satdata.sources import BadSamples, SourceOptions, make_source
from satdata.store import open_store
from tests.fixtures.cifar import CIFAR10_NAMES, CIFAR100_FINE, dump, make_cifar10, make_cifar100


def _build(source: str, root: Path, out: Path, **kw: object) -> None:
    build(BuildConfig(source=source, root=str(root), out=str(out), progress=False, **kw))


def _no_store(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_pixel_layout_is_rgb_planes_row_major(tmp_path: Path) -> None:
    """Row = 1024 R values, then G, then B, each plane row-major: checked by hand, not by the fixture."""
    fx = make_cifar10(tmp_path, per_batch=2)
    row = np.zeros(3072, np.uint8)
    row[0:1024] = 200  # R plane
    row[1024 + 1] = 7  # G of pixel (y=0, x=1)
    row[2048 + 32] = 9  # B of pixel (y=1, x=0)
    d = pickle.load(open(fx["root"] / "data_batch_1", "rb"))
    d[b"data"] = np.stack([row, row])
    dump(fx["root"] / "data_batch_1", d)
    src = make_source("cifar10", fx["root"], SourceOptions(), BadSamples(False))
    img = src.decode(src.records("train")[0]).image
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    assert (img[:, :, 0] == 200).all()
    assert img[0, 1, 1] == 7 and img[:, :, 1].sum() == 7
    assert img[1, 0, 2] == 9 and img[:, :, 2].sum() == 9


def test_cifar10_build_exact_images_labels_no_maps(tmp_path: Path) -> None:
    fx = make_cifar10(tmp_path / "data", per_batch=20)
    out = tmp_path / "c10.zarr"
    _build("cifar10", fx["root"], out)  # root: the batches directory itself
    st = open_store(out)
    assert st.info.classes == CIFAR10_NAMES
    assert st.info.maps == {}
    assert st.info.splits == {"train": 100, "test": 20}
    for split in ("train", "test"):
        images, labels = fx[split]
        np.testing.assert_array_equal(st.load(split, "images"), images)
        np.testing.assert_array_equal(st.load(split, "labels"), labels)
        assert not st.has_boxes(split)
    ids = st.load("train", "ids").tolist()
    assert ids[0] == "data_batch_1:0" and ids[20] == "data_batch_2:0" and ids[-1] == "data_batch_5:19"


def test_cifar100_via_cli_fine_labels(tmp_path: Path) -> None:
    fx = make_cifar100(tmp_path / "data")
    out = tmp_path / "c100.zarr"
    res = CliRunner().invoke(main, ["build", "-s", "cifar100", "-r", str(tmp_path / "data"), "-o", str(out),
                                    "--size", "16", "-q"])
    assert res.exit_code == 0, res.output
    assert "100 classes" in res.output and "maps: none" in res.output
    st = open_store(out)
    assert st.info.classes == CIFAR100_FINE and len(CIFAR100_FINE) == 100
    assert st.info.splits == {"train": 60, "test": 30}
    np.testing.assert_array_equal(st.load("test", "labels"), fx["test"][1])
    assert st.load("train", "images").shape == (60, 16, 16, 3)


def test_decode_reads_no_files(tmp_path: Path) -> None:
    fx = make_cifar10(tmp_path / "data", per_batch=5)
    src = make_source("cifar10", fx["root"], SourceOptions(), BadSamples(False))
    records = src.records("train")
    shutil.rmtree(fx["root"])  # decoding must not need the batch files any more
    images = np.stack([transform(src, r, (32, 32), "stretch")[0] for r in records])
    np.testing.assert_array_equal(images, fx["train"][0])
    # a record pickles with its own image only (3 KB), not the whole batch
    assert len(pickle.dumps(records[0])) < 4 * 3072


def test_50000_images_build_fast(tmp_path: Path) -> None:
    fx = make_cifar10(tmp_path / "data", per_batch=10_000)
    out = tmp_path / "full.zarr"
    t0 = time.perf_counter()
    _build("cifar10", fx["root"], out, splits=("train",))
    seconds = time.perf_counter() - t0
    st = open_store(out)
    assert st.info.splits == {"train": 50_000}
    k = np.array([0, 9_999, 10_000, 31_337, 49_999])
    np.testing.assert_array_equal(st.array("train", "images").oindex[k], fx["train"][0][k])
    np.testing.assert_array_equal(st.load("train", "labels"), fx["train"][1])
    assert seconds < 60, f"50,000 CIFAR images took {seconds:.1f} s to build"


# --------------------------------------------------------------------------- bad input


def _corrupt(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:500])


def _wrong_shape(path: Path) -> None:
    d = pickle.load(open(path, "rb"))
    d[b"data"] = d[b"data"][:, :3071]
    dump(path, d)


def _label_count(path: Path) -> None:
    d = pickle.load(open(path, "rb"))
    d[b"labels"] = d[b"labels"][:-1]
    dump(path, d)


def _label_range(path: Path) -> None:
    d = pickle.load(open(path, "rb"))
    d[b"labels"][3] = 10
    dump(path, d)


class _Evil:
    def __reduce__(self) -> tuple:
        return (print, ("this must never run",))


def _hostile(path: Path) -> None:
    dump(path, {b"data": _Evil(), b"labels": []})


BAD_FILES = {
    "missing batch": (lambda p: p.unlink(), "missing batch file"),
    "corrupt pickle": (_corrupt, "not a CIFAR batch: unreadable or corrupt pickle"),
    "wrong data shape": (_wrong_shape, "'data' is (20, 3071) uint8, expected (N, 3072) uint8"),
    "label count": (_label_count, "has 20 images but 19 labels"),
    "label range": (_label_range, "label 10 is outside 0..9"),
    "hostile pickle": (_hostile, "not a CIFAR batch: the pickle refers to __builtin__.print"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_batch_is_an_error_naming_the_file(case: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    fx = make_cifar10(tmp_path / "data", per_batch=20)
    damage, problem = BAD_FILES[case]
    victim = fx["root"] / "data_batch_3"
    damage(victim)
    out = tmp_path / "o.zarr"
    with pytest.raises(SourceError) as err:
        _build("cifar10", fx["root"], out)
    assert str(err.value).startswith(f"{victim}: {problem}")
    assert "this must never run" not in capsys.readouterr().out
    _no_store(out)


def test_cli_errors_exit_nonzero(tmp_path: Path) -> None:
    fx = make_cifar100(tmp_path / "data", n_train=4, n_test=2)
    _corrupt(fx["root"] / "meta")
    out = tmp_path / "o.zarr"
    res = CliRunner().invoke(main, ["build", "-s", "cifar100", "-r", str(fx["root"]), "-o", str(out), "-q"])
    assert res.exit_code == 1 and f"{fx['root'] / 'meta'}: not a CIFAR batch" in res.output
    _no_store(out)
    res = CliRunner().invoke(main, ["build", "-s", "cifar10", "-r", str(fx["root"]), "-o", str(out), "-q"])
    assert res.exit_code == 1 and "no batches.meta here or in cifar-10-batches-py/" in res.output
    _no_store(out)
