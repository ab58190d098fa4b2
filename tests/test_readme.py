"""The README is true: every satdata/sattrain command in it runs, exactly as written.

Commands run in order in one directory, as a user following the README would (later ones
use earlier ones' stores and runs). The README is run in four parts that share nothing but
the first command's store, so that the suite's two processes share the work: this file
runs the main job and "Training and evaluation"; each section of OWN_TESTS has its own
test file (the dataset commands on small generated datasets in each format's real on-disk
layout, the servers' sections against servers they start).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


# Sections run by their own test files; every other section's commands run here.
OWN_TESTS = {
    "## Building stores": "tests/test_readme_stores.py",
    "## Looking at a store": "tests/test_readme_stores.py",
    "## Maps from a teacher": "tests/test_readme_stores.py",
    "## HDF5 in and out": "tests/test_readme_stores.py",
    "## Sharing a store": "tests/test_readme_sharing.py",
    "## Scaling out": "tests/test_readme_scaling.py",
}


def _sections() -> list[tuple[str, str]]:
    """(title, text) of each "## " section of the README, in order; the text before the first has title ""."""
    parts = re.split(r"^(## .*)$", (REPO / "README.md").read_text(), flags=re.M)
    return [("", parts[0]), *zip(parts[1::2], parts[2::2])]


def commands(titles: list[str] | None = None, programs: tuple[str, ...] = ("satdata", "sattrain")) -> list[str]:
    """The commands of ``programs`` in the bash blocks of the sections ``titles`` (None: every
    section not in OWN_TESTS), in README order; a line's ``&&``-joined commands each count."""
    sections = _sections()
    for t in titles or ():
        assert t in dict(sections), f"README has no section {t!r}"
    return [part.strip() for t, body in sections if (t in titles if titles is not None else t not in OWN_TESTS)
            for block in re.findall(r"```bash\n(.*?)```", body, flags=re.S)
            for line in block.splitlines() for part in line.split("&&")
            if part.strip().startswith(tuple(p + " " for p in programs))]


def run_commands(cmds: list[str], cwd: Path, env: dict[str, str] | None = None,
                 timeout: float = 1800) -> dict[str, str]:
    """Run each command in ``cwd`` as a user would (``env``: the environment, by default this
    one with the checkout importable); each must succeed. Returns what each said."""
    env = env if env is not None else {**os.environ, "PYTHONPATH": str(REPO)}
    said: dict[str, str] = {}
    for cmd in cmds:
        argv = shlex.split(cmd)
        argv[0] = str(BIN / argv[0])
        res = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        assert res.returncode == 0, f"README command failed: {cmd}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
        said[cmd] = res.stdout + res.stderr
    return said


def test_the_main_job_and_training_and_evaluation_run(tmp_path: Path) -> None:
    said = run_commands(commands(), tmp_path)

    # What the README says these commands leave behind, and that each result is sensible.
    def metrics(run: str) -> dict:
        return json.loads((tmp_path / "runs" / run / "metrics.json").read_text())

    main = metrics("digits-sat")
    assert main["last"]["clean_acc"] > 0.75, main  # 10 epochs of SAT on digits learn the task
    s = main["summary"]  # the end-of-run strong evaluation, on the whole test split here
    assert s["protocol"] == "strong" and s["samples"] == 355 and s["complete"]
    assert s["headline"]["name"] == "autoattack+pgd@8/255" and 0.0 <= s["headline"]["value"] < s["clean"]
    assert s["headline"]["value"] <= min(s["robust"]["pgd@8/255"], s["robust"]["autoattack@8/255"])
    assert (tmp_path / "runs" / "digits-sat" / "best.pt").is_file()
    for run, floor in (("sat-box", 0.6), ("pgd-sat", 0.5)):
        m = metrics(run)
        assert m["last"]["clean_acc"] > floor, (run, m["last"])
        assert m["summary"] is None and "summary_skipped" in m, run
    from sattrain.evaluation import evaluate

    # PGD-AT + SAT buys robustness that SAT alone does not (the strong protocol's PGD at 8/255)
    strong_pgd = dict(attacks=("pgd",), eps=(8 / 255,), samples=100, device="cpu", write=False)
    pgd_sat = evaluate(tmp_path / "runs" / "pgd-sat", tmp_path / "digits.zarr", **strong_pgd)["robust"]["pgd@8/255"]
    sat = evaluate(tmp_path / "runs" / "digits-sat", tmp_path / "digits.zarr", **strong_pgd)["robust"]["pgd@8/255"]
    assert pgd_sat > sat + 0.1, (pgd_sat, sat)
    # `sattrain eval` with defaults: the strong protocol; its headline is no more than 0.03 above a
    # 50-step, 3-start PGD of step eps/4 (the criterion of a trustworthy number), and the paper
    # protocol reports more robustness, labelled as such
    ev = json.loads((tmp_path / "runs" / "digits-sat" / "eval.json").read_text())
    paper = json.loads((tmp_path / "runs" / "digits-sat" / "eval-paper.json").read_text())
    assert ev["protocol"] == "strong" and ev["sanity"]["passed"], ev["sanity"]
    assert ev["headline"]["name"] == "autoattack+pgd@8/255"
    assert paper["protocol_label"] == "paper protocol" and paper["headline"]["name"] == "pgd@8/255"
    assert paper["headline"]["value"] > ev["headline"]["value"]

    assert ev["samples"] == paper["samples"] == 100 and ev["split_size"] == 355
    pgd50x3 = evaluate(tmp_path / "runs" / "digits-sat", tmp_path / "digits.zarr", attacks=("pgd",), eps=(8 / 255,),
                       steps=50, restarts=3, step_size="eps/4", samples=100, device="cpu",
                       write=False)["robust"]["pgd@8/255"]  # the same seeded subset
    assert ev["headline"]["value"] <= pgd50x3 + 0.03, (ev["headline"], pgd50x3)
    report = (tmp_path / "report" / "report.md").read_text()
    assert "strong protocol" in report.lower() and "paper protocol" in report.lower()
    assert "headline (strong protocol): autoattack+pgd@8/255" in said[
        "sattrain eval runs/digits-sat --store digits.zarr --samples 100"]
    assert "headline (paper protocol): pgd@8/255" in said[
        "sattrain eval runs/digits-sat --store digits.zarr --samples 100 --protocol paper"]


# Last in the module: a quick test (see LONG_RUNNING in tests/conftest.py).
def test_the_main_job_comes_first_and_every_section_runs_somewhere() -> None:
    here = commands()
    assert here[0] == "satdata build --source digits --out digits.zarr"
    assert here[1].startswith("sattrain run digits.zarr")
    assert "sattrain report runs/digits-sat runs/sat-box runs/pgd-sat --out report" in here
    assert set(OWN_TESTS) <= {t for t, _ in _sections()}
    for path in set(OWN_TESTS.values()):
        assert (REPO / path).is_file(), path
    assert len(commands([t for t, _ in _sections()])) >= 40 and len(here) >= 7
