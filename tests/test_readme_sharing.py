"""The README's "Sharing a store" section runs as written, against real servers at the addresses it names.

The section reads from a web server at http://127.0.0.1:8000/ and an S3-compatible server at
http://127.0.0.1:8333 (bucket ``lab``, user ``labkey``/``labsecret``). This test starts both
there (tests/httpserver.py, tests/s3server.py), puts the packed and unpacked store where the
section says a lab would, runs every satdata/sattrain command of the section in order, and
checks what they leave behind.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import pytest

from satdata.store import open_store, store_digest
from tests.httpserver import serve
from tests.s3server import SeaweedS3
from tests.test_readme import commands, run_commands

REPO = Path(__file__).resolve().parents[1]
TITLE = "## Sharing a store"
HTTP_PORT, S3_PORT = 8000, 8333


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_the_section_names_what_the_test_serves() -> None:
    cmds = commands([TITLE])
    assert cmds[0] == "satdata pack digits.zarr --out digits.zip"
    assert any("fetch" in c for c in cmds) and any(c.startswith("sattrain run http") for c in cmds)
    assert all(f"127.0.0.1:{HTTP_PORT}" in c or f"127.0.0.1:{S3_PORT}" in c for c in cmds if "://" in c)


def test_sharing_section_runs_as_written(tmp_path: Path, digits_store32: Path) -> None:
    for port in (HTTP_PORT, S3_PORT):
        if not port_free(port):
            pytest.fail(f"port {port} on 127.0.0.1 is taken; the README's sharing section serves there", pytrace=False)
    shutil.copytree(digits_store32, tmp_path / "digits.zarr")  # what the README's first command builds
    shutil.copytree(REPO / "manifests", tmp_path / "manifests")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for k in [k for k in env if k.startswith("AWS_")]:
        del env[k]
    www = tmp_path / "www"
    www.mkdir()
    cmds = commands([TITLE])
    with serve(www, port=HTTP_PORT) as http, SeaweedS3(s3_port=S3_PORT) as s3:
        s3.make_bucket("lab")
        said = run_commands(cmds[:2], tmp_path, env, timeout=900)
        # after packing and checking: share both, as the section says a lab would
        shutil.copytree(tmp_path / "digits.zarr", www / "digits.zarr")
        shutil.copy(tmp_path / "digits.zip", www / "digits.zip")
        s3.upload(tmp_path / "digits.zarr", "lab/digits.zarr")
        s3.upload(tmp_path / "digits.zip", "lab/digits.zip")
        said.update(run_commands(cmds[2:], tmp_path, env, timeout=900))
        assert any(r.path == "/digits.zip" and r.range for r in http.requests)  # the zip was read in place

    want = store_digest(open_store(tmp_path / "digits.zarr").info)
    for fetched in ("lab-digits.zarr", "lab-digits-2.zarr"):
        assert store_digest(open_store(tmp_path / fetched).info) == want
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".lab-digits")]  # no partial left
    metrics = [json.loads(x) for x in (tmp_path / "runs" / "from-http" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and metrics[-1]["train_acc"] > 0.3  # it trained on the served store (chance 0.1)
    ev = json.loads((tmp_path / "runs" / "from-http" / "eval.json").read_text())
    assert ev["store"]["path"] == "s3://lab/digits.zip" and ev["samples"] == 100
    assert "matches manifests/digits.json" in said[cmds[1]]
