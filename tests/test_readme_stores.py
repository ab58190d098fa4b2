"""The README's sections on building, looking at, mapping and exporting stores run as written.

"Building stores", "Looking at a store", "Maps from a teacher" and "HDF5 in and out", in
README order in one directory, after the README's first command (the digits store they
use): the dataset commands read small generated datasets in each format's real on-disk
layout, created where the README's --root options point. tests/test_readme.py runs the
rest of the README.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tests.fixtures.cifar import make_cifar10
from tests.fixtures.coco import make_coco
from tests.fixtures.flowers17 import make_flowers17
from tests.fixtures.tiny_imagenet import make_tiny_imagenet
from tests.fixtures.voc import make_voc
from tests.test_readme import OWN_TESTS, REPO, commands, run_commands

SECTIONS = [title for title, path in OWN_TESTS.items() if path == "tests/test_readme_stores.py"]


def test_stores_sections_run_as_written(tmp_path: Path) -> None:
    make_voc(tmp_path)
    make_coco(tmp_path / "coco")
    make_tiny_imagenet(tmp_path)
    make_flowers17(tmp_path / "17flowers")
    make_cifar10(tmp_path)
    shutil.copytree(REPO / "manifests", tmp_path / "manifests")
    first = commands()[0]
    assert first == "satdata build --source digits --out digits.zarr"
    cmds = [first, *commands(SECTIONS)]
    assert len(cmds) >= 20
    said = run_commands(cmds, tmp_path)

    for run, floor in (("teacher", 0.8), ("sat-gcpp", 0.6)):
        m = json.loads((tmp_path / "runs" / run / "metrics.json").read_text())
        assert m["last"]["clean_acc"] > floor, (run, m["last"])
        assert m["summary"] is None and "summary_skipped" in m, run
    assert (tmp_path / "voc-seg.png").stat().st_size > 1000
    assert (tmp_path / "gcpp.png").stat().st_size > 1000
    # the teacher is scored before its maps are made, and it is good enough not to be warned about
    gc = said["satdata gc digits.zarr"]  # the gbp map's first version, replaced just before
    assert "removed train/saliency/gbp." in gc and "freed" in gc, gc
    sal = said["satdata saliency digits.zarr --teacher runs/teacher --method gradcampp --name gcpp"]
    assert "teacher accuracy on test" in sal and "warning" not in sal.lower(), sal
    assert (tmp_path / "digits.h5").is_file()
    assert (tmp_path / "digits-from-h5.zarr" / "zarr.json").is_file()


# Last in the module: a quick test (see LONG_RUNNING in tests/conftest.py).
def test_the_sections_here_are_the_readmes() -> None:
    assert SECTIONS == ["## Building stores", "## Looking at a store", "## Maps from a teacher", "## HDF5 in and out"]
    assert len(commands(SECTIONS)) >= 20
