"""The `s3` fixture (tests/s3server.py): a real S3 server that tests and benchmarks can trust.

Put and get as the read-write user, the read-only user refused a write, a wrong secret
refused, and the server gone (process and ports) after stop.
"""

from __future__ import annotations

import socket
import uuid
from pathlib import Path

import pytest

from tests.s3server import SeaweedS3


def test_upload_then_read_back(s3: SeaweedS3, tmp_path: Path) -> None:
    bucket = f"t-{uuid.uuid4().hex[:8]}"
    s3.make_bucket(bucket)
    tree = tmp_path / "tree"
    (tree / "a" / "b").mkdir(parents=True)
    (tree / "a" / "b" / "x.bin").write_bytes(bytes(range(256)) * 1000)
    (tree / "top.json").write_text('{"k": 1}')
    s3.upload(tree, f"{bucket}/tree")
    s3.upload(tree / "top.json", f"{bucket}/single.json")
    for readonly in (False, True):
        fs = s3.filesystem(readonly=readonly)
        assert sorted(fs.find(f"{bucket}/tree")) == [f"{bucket}/tree/a/b/x.bin", f"{bucket}/tree/top.json"]
        assert fs.cat(f"{bucket}/tree/a/b/x.bin") == bytes(range(256)) * 1000
        assert fs.cat(f"{bucket}/single.json") == b'{"k": 1}'
    assert s3.endpoint.startswith("http://127.0.0.1:")
    assert s3.storage_options() == {"key": "labkey", "secret": "labsecret", "endpoint_url": s3.endpoint}


def test_readonly_user_cannot_write(s3: SeaweedS3) -> None:
    bucket = f"t-{uuid.uuid4().hex[:8]}"
    s3.make_bucket(bucket)
    ro = s3.filesystem(readonly=True)
    with pytest.raises(PermissionError):
        ro.pipe(f"{bucket}/nope.txt", b"refused")
    with pytest.raises(PermissionError):
        ro.mkdir(f"t-{uuid.uuid4().hex[:8]}")
    assert not s3.filesystem().exists(f"{bucket}/nope.txt")


def test_wrong_secret_is_refused(s3: SeaweedS3) -> None:
    import s3fs

    bucket = f"t-{uuid.uuid4().hex[:8]}"
    s3.make_bucket(bucket)
    s3.filesystem().pipe(f"{bucket}/secret.txt", b"x")
    bad = s3fs.S3FileSystem(skip_instance_cache=True, key="labkey", secret="wrong", endpoint_url=s3.endpoint)
    with pytest.raises(PermissionError):
        bad.cat(f"{bucket}/secret.txt")
    anon = s3fs.S3FileSystem(skip_instance_cache=True, anon=True, endpoint_url=s3.endpoint)
    with pytest.raises(PermissionError):
        anon.cat(f"{bucket}/secret.txt")


def test_stop_frees_everything() -> None:
    """A second server of its own: after the block, its process is gone and its S3 port is free."""
    with SeaweedS3() as server:
        proc, port, where = server.proc, server.ports["s3"], server.dir
        assert proc is not None and proc.poll() is None
    assert proc.poll() is not None and not where.exists()
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0
