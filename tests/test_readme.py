"""The README is true: every satdata/sattrain command in it runs, exactly as written.

The dataset commands run on small generated datasets in each format's real on-disk layout,
created where the README's --root options point. Commands run in order in one directory,
as a user following the README would (later ones use earlier ones' stores and runs).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from tests.fixtures.cifar import make_cifar10
from tests.fixtures.coco import make_coco
from tests.fixtures.flowers17 import make_flowers17
from tests.fixtures.tiny_imagenet import make_tiny_imagenet
from tests.fixtures.voc import make_voc

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


# Sections whose commands need servers: their own tests start them and run the section.
OWN_TESTS = {"## Sharing a store": "tests/test_readme_sharing.py", "## Scaling out": "tests/test_readme_scaling.py"}


def readme_commands() -> list[str]:
    """satdata/sattrain commands from the README's bash blocks, in order (but the OWN_TESTS sections)."""
    text = (REPO / "README.md").read_text()
    for title in OWN_TESTS:
        start = text.index(title + "\n")
        end = text.find("\n## ", start + len(title))
        text = text[:start] + (text[end:] if end >= 0 else "")
    cmds: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            for part in line.split("&&"):
                part = part.strip()
                if part.startswith(("satdata ", "sattrain ")):
                    cmds.append(part)
    return cmds


def test_readme_has_the_main_job_first() -> None:
    cmds = readme_commands()
    assert cmds[0] == "satdata build --source digits --out digits.zarr"
    assert cmds[1].startswith("sattrain run digits.zarr")
    assert len(cmds) >= 20


def test_every_readme_command_runs(tmp_path: Path) -> None:
    make_voc(tmp_path)
    make_coco(tmp_path / "coco")
    make_tiny_imagenet(tmp_path)
    make_flowers17(tmp_path / "17flowers")
    make_cifar10(tmp_path)
    shutil.copytree(REPO / "manifests", tmp_path / "manifests")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    said: dict[str, str] = {}
    for cmd in readme_commands():
        argv = shlex.split(cmd)
        argv[0] = str(BIN / argv[0])
        res = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
        assert res.returncode == 0, f"README command failed: {cmd}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
        said[cmd] = res.stdout + res.stderr

    # What the README says these commands leave behind, and that each result is sensible.
    def metrics(run: str) -> dict:
        return json.loads((tmp_path / "runs" / run / "metrics.json").read_text())

    main = metrics("digits-sat")
    assert main["last"]["clean_acc"] > 0.75, main  # 10 epochs of SAT on digits learn the task
    s = main["summary"]  # the end-of-run strong evaluation, on the whole test split here
    assert s["protocol"] == "strong" and s["samples"] == 355 and s["complete"]
    assert s["headline"]["name"] == "autoattack@8/255" and 0.0 <= s["headline"]["value"] < s["clean"]
    assert s["headline"]["value"] <= s["robust"]["pgd@8/255"] + 1 / 355
    assert (tmp_path / "runs" / "digits-sat" / "best.pt").is_file()
    for run, floor in (("sat-box", 0.6), ("pgd-sat", 0.5), ("teacher", 0.8), ("sat-gcpp", 0.6)):
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
    assert ev["headline"]["name"] == "autoattack@8/255"
    assert paper["protocol_label"] == "paper protocol" and paper["headline"]["name"] == "pgd@8/255"
    assert paper["headline"]["value"] > ev["headline"]["value"]

    pgd50x3 = evaluate(tmp_path / "runs" / "digits-sat", tmp_path / "digits.zarr", attacks=("pgd",), eps=(8 / 255,),
                       steps=50, restarts=3, step_size="eps/4", device="cpu", write=False)["robust"]["pgd@8/255"]
    assert ev["headline"]["value"] <= pgd50x3 + 0.03, (ev["headline"], pgd50x3)
    report = (tmp_path / "report" / "report.md").read_text()
    assert "strong protocol" in report.lower() and "paper protocol" in report.lower()
    assert (tmp_path / "voc-seg.png").stat().st_size > 1000
    assert (tmp_path / "gcpp.png").stat().st_size > 1000
    # the teacher is scored before its maps are made, and it is good enough not to be warned about
    gc = said["satdata gc digits.zarr"]  # the gbp map's first version, replaced just before
    assert "removed train/saliency/gbp." in gc and "freed" in gc, gc
    sal = said["satdata saliency digits.zarr --teacher runs/teacher --method gradcampp --name gcpp"]
    assert "teacher accuracy on test" in sal and "warning" not in sal.lower(), sal
    assert "headline (strong protocol): autoattack@8/255" in said["sattrain eval runs/digits-sat --store digits.zarr"]
    assert "headline (paper protocol): pgd@8/255" in said["sattrain eval runs/digits-sat --store digits.zarr --protocol paper"]
    assert (tmp_path / "digits.h5").is_file()
