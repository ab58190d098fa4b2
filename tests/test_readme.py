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


def readme_commands() -> list[str]:
    """satdata/sattrain commands from the README's bash blocks, in order."""
    text = (REPO / "README.md").read_text()
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
    for cmd in readme_commands():
        argv = shlex.split(cmd)
        argv[0] = str(BIN / argv[0])
        res = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert res.returncode == 0, f"README command failed: {cmd}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"

    # what the README says these commands leave behind
    for run in ("digits-sat", "sat-box", "pgd-sat", "teacher", "sat-gcpp"):
        m = json.loads((tmp_path / "runs" / run / "metrics.json").read_text())
        assert 0.0 <= m["clean_acc"] <= 1.0
    main = json.loads((tmp_path / "runs" / "digits-sat" / "metrics.json").read_text())
    assert main["clean_acc"] > 0.5, main  # 10 epochs of SAT on digits learn the task
    assert (tmp_path / "runs" / "digits-sat" / "eval.json").is_file()
    assert (tmp_path / "report" / "report.md").is_file()
    assert (tmp_path / "voc-seg.png").stat().st_size > 1000
    assert (tmp_path / "digits.h5").is_file()
