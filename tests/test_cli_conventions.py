"""Conventions across every command: one meaning per short flag, --out for what a command
writes, --json for what it reports, `sattrain eval RUN` finding its own store."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from satdata.cli import main as satdata_main
from sattrain.cli import main as sattrain_main

pytestmark = pytest.mark.usefixtures("one_thread")

WRITERS = {("satdata", "build"), ("satdata", "export"), ("satdata", "pack"), ("satdata", "fetch"),
           ("satdata", "preview"), ("sattrain", "run"), ("sattrain", "eval"), ("sattrain", "report")}
REPORTERS = {("satdata", c) for c in ("build", "finalize", "info", "verify", "preview", "sources", "saliency",
                                      "compare", "export", "pack", "fetch", "gc")} | \
            {("sattrain", c) for c in ("run", "eval", "report")}


def _commands() -> dict[tuple[str, str], click.Command]:
    ctx = click.Context(satdata_main)
    out = {("satdata", n): satdata_main.get_command(ctx, n) for n in satdata_main.list_commands(ctx)}
    ctx = click.Context(sattrain_main)
    out.update({("sattrain", n): sattrain_main.get_command(ctx, n) for n in sattrain_main.list_commands(ctx)})
    return out


def test_each_short_flag_has_one_meaning_everywhere() -> None:
    meaning: dict[str, set[str]] = {}
    for (tool, name), cmd in _commands().items():
        for p in cmd.params:
            if not isinstance(p, click.Option):
                continue
            longs = [o for o in p.opts if o.startswith("--")]
            for short in (o for o in p.opts if not o.startswith("--")):
                meaning.setdefault(short, set()).add(longs[0] if longs else f"{tool} {name} {short}")
    clash = {s: sorted(m) for s, m in meaning.items() if len(m) > 1}
    assert not clash, clash


def test_writers_take_out_and_reporters_take_json() -> None:
    cmds = _commands()
    assert set(cmds) >= WRITERS | REPORTERS
    for key in WRITERS:
        assert any("--out" in p.opts for p in cmds[key].params), key
    for key in REPORTERS:
        assert any("--json" in p.opts for p in cmds[key].params), key


def test_json_outputs_parse_and_say_what_happened(digits_store: Path, tmp_path: Path) -> None:
    r = CliRunner()

    def js(main: click.Group, *args: str) -> dict:
        res = r.invoke(main, [*args, "--json"], catch_exceptions=False)
        assert res.exit_code == 0, res.output
        return json.loads(res.stdout)

    built = js(satdata_main, "build", "--source", "digits", "--size", "8", "--out", str(tmp_path / "d.zarr"), "-q")
    assert built["splits"] == {"train": 1442, "test": 355} and built["skipped"] == []
    assert "digits" in js(satdata_main, "sources")
    packed = js(satdata_main, "pack", str(tmp_path / "d.zarr"), "--out", str(tmp_path / "d.zip"), "-q")
    assert packed["files"] > 0 and Path(packed["path"]).is_file()
    exported = js(satdata_main, "export", str(tmp_path / "d.zarr"), "--out", str(tmp_path / "d.h5"), "-q")
    assert exported["maps"] == ["box", "ink"]
    assert js(satdata_main, "gc", str(tmp_path / "d.zarr"))["removed"] == []
    sheet = js(satdata_main, "preview", str(tmp_path / "d.zarr"), "-n", "4", "--out", str(tmp_path / "p.png"))
    assert sheet["tiles"] == 4 and (tmp_path / "p.png").stat().st_size > 0
    run = js(sattrain_main, "run", str(digits_store), "--method", "standard", "--epochs", "1", "--train-samples",
             "128", "--batch-size", "64", "--summary-samples", "0", "--out", str(tmp_path / "run"), "-q")
    assert run["run"] == str(tmp_path / "run") and run["last"]["epoch"] == 0
    rep = js(sattrain_main, "report", str(tmp_path / "run"), "--out", str(tmp_path / "report"))
    assert rep["report"].endswith("report.md") and Path(rep["report"]).is_file()


def test_eval_finds_the_store_its_run_recorded(digits_store: Path, tmp_path: Path) -> None:
    store = tmp_path / "digits.zarr"
    shutil.copytree(digits_store, store)
    r = CliRunner()
    res = r.invoke(sattrain_main, ["run", str(store), "--method", "standard", "--epochs", "1", "--train-samples",
                                   "128", "--batch-size", "64", "--summary-samples", "0", "--out",
                                   str(tmp_path / "run"), "-q"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    args = ["eval", str(tmp_path / "run"), "--attacks", "pgd", "--eps", "8/255", "--steps", "2", "--samples", "40",
            "--json", "-q"]
    res = r.invoke(sattrain_main, args)
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["store"]["path"] == str(store)
    shutil.move(str(store), str(tmp_path / "moved.zarr"))
    res = r.invoke(sattrain_main, args)
    assert res.exit_code == 1 and "--store: not given" in res.output and "pass --store" in res.output
    res = r.invoke(sattrain_main, [*args, "--store", str(tmp_path / "moved.zarr")])
    assert res.exit_code == 0, res.output
