"""Progress: a bar on a terminal, plain periodic lines in logs (satdata.clikit.progress_bar)."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest

from satdata import clikit
from satdata.clikit import ProgressLines, progress_bar


def test_lines_not_bars_when_stderr_is_not_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(clikit.PROGRESS_ENV, raising=False)
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert isinstance(progress_bar(10, "x"), ProgressLines)
    monkeypatch.setenv(clikit.PROGRESS_ENV, "bar")
    assert not isinstance(progress_bar(10, "x"), ProgressLines)
    monkeypatch.setenv(clikit.PROGRESS_ENV, "off")
    assert progress_bar(10, "x").disable
    assert progress_bar(10, "x", enabled=False).disable


def test_progress_lines_say_count_share_rate_and_postfix(monkeypatch: pytest.MonkeyPatch) -> None:
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    now = [0.0]
    with ProgressLines(200, "build", "img", every=30) as p:
        p._clock = lambda: now[0]  # type: ignore[method-assign]
        p._t0 = p._last = 0.0
        for _ in range(100):
            now[0] += 0.5
            p.update(1)
        p.set_postfix(loss="0.52")
        now[0] += 10
        p.update(50)
    lines = err.getvalue().splitlines()
    assert lines[0] == "build: 60/200 img (30%), 2 img/s, 30 s"
    assert lines[-1].startswith("build: 150/200 img (75%)") and lines[-1].endswith("; loss 0.52")
    assert len(lines) == 3  # at 30 s, at 60 s (0.5 s x 100 + 10 s crosses it), and at close
    b = ProgressLines(3 * 1024**2, "load", "B", unit_scale=True, every=0)
    monkeypatch.setattr(sys, "stderr", err := io.StringIO())
    b.update(1024**2)
    assert err.getvalue().startswith("load: 1.0 MiB/3.0 MiB (33%)")


def test_a_logged_build_has_no_carriage_returns(tmp_path: Path) -> None:
    """`satdata build` with stderr to a file: no bar redraws in the log."""
    res = subprocess.run([sys.executable, "-m", "satdata", "build", "--source", "digits", "--size", "8",
                          "--out", str(tmp_path / "d.zarr")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "\r" not in res.stderr and "wrote" in res.stdout + res.stderr
