"""`satdata info`: a summary for people, JSON for scripts, one-line errors for non-stores."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import zarr
from click.testing import CliRunner

from satdata.cli import main


def run(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(main, list(args))
    return res.exit_code, res.output


def test_info_json_has_the_contract_fields(digits_store: Path) -> None:
    code, out = run("info", str(digits_store), "--json")
    assert code == 0, out
    d = json.loads(out)
    assert d["format_version"] == 1
    assert d["dataset"] == "digits"
    assert d["classes"] == [str(i) for i in range(10)]
    assert d["image_size"] == [16, 16]
    assert d["splits"] == {"train": {"count": 1442, "maps": ["box", "ink"]},
                           "test": {"count": 355, "maps": ["box", "ink"]}}
    assert d["label_kind"] == "single"
    assert d["maps"]["ink"]["kind"] == "mask" and d["maps"]["ink"]["encoding"] == "binary"
    assert d["maps"]["box"]["kind"] == "boxes"
    assert d["provenance"]["source"] == "digits" and d["provenance"]["size"] == [16, 16]
    assert len(d["digest"]) == 64


def test_info_human_output_is_readable(digits_store: Path) -> None:
    code, out = run("info", str(digits_store))
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0].startswith(str(digits_store)) and "format v1" in lines[0]
    text = "\n".join(lines)
    for expected in ("dataset     digits", "images      16x16 RGB uint8", "10 classes: 0, 1, 2",
                     "splits      train 1,442, test 355", "ink", "mask", "binary", "built from  digits"):
        assert expected in text, f"{expected!r} missing from:\n{text}"
    assert max(len(line) for line in lines) <= 100, "lines too long to read in a terminal"


def test_info_reads_a_zipped_store(digits_store: Path, tmp_path: Path) -> None:
    z = tmp_path / "digits.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for f in sorted(digits_store.rglob("*")):
            if f.is_file():
                zf.write(f, f.relative_to(digits_store).as_posix())
    code, out = run("info", str(z), "--json")
    assert code == 0, out
    assert json.loads(out)["splits"]["test"]["count"] == 355


@pytest.mark.parametrize("what,make,message", [
    ("missing", lambda p: None, "no such store"),
    ("plain directory", lambda p: p.mkdir(), "no zarr.json"),
    ("text file", lambda p: p.write_text("hello"), "no zarr.json"),
    ("foreign zarr group", lambda p: zarr.open_group(str(p), mode="w").attrs.update({"x": 1}),
     "no 'satkit' attribute"),
    ("unfinished build", None, "no 'satkit' attribute"),
])
def test_info_on_non_stores_is_one_line(digits_store: Path, tmp_path: Path, what: str, make, message: str) -> None:
    p = tmp_path / "thing.zarr"
    if make is None:  # a build killed before its last step: every array but no attribute
        shutil.copytree(digits_store, p)
        meta = json.loads((p / "zarr.json").read_text())
        del meta["attributes"]["satkit"]
        (p / "zarr.json").write_text(json.dumps(meta))
    else:
        make(p)
    code, out = run("info", str(p))
    assert code == 1, f"{what}: {out}"
    assert out.startswith("Error: ") and str(p) in out and message in out, f"{what}: {out}"
    assert len(out.strip().splitlines()) == 1, f"{what}: not one line: {out}"


def test_info_on_a_damaged_zip_is_one_line(tmp_path: Path) -> None:
    p = tmp_path / "store.zip"
    p.write_bytes(b"this is not a zip archive")
    code, out = run("info", str(p))
    assert code == 1 and out.startswith("Error: ") and str(p) in out, out
    assert len(out.strip().splitlines()) == 1, out


def test_installed_command_exit_status(digits_store: Path, tmp_path: Path) -> None:
    ok = subprocess.run([sys.executable, "-m", "satdata.cli", "info", str(digits_store), "--json"],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and json.loads(ok.stdout)["dataset"] == "digits"
    bad = subprocess.run([sys.executable, "-m", "satdata.cli", "info", str(tmp_path / "nope.zarr")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1
    assert bad.stdout == ""
    assert bad.stderr.strip() == f"Error: {tmp_path / 'nope.zarr'}: no such store"
