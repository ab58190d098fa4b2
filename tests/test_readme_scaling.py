"""The README's "Scaling out" section runs as written, and what it claims holds.

Every torchrun/satdata/sattrain command of the section runs in order in a fresh directory
holding `digits.zarr` (what the README's first command builds) and the manifests. Then:
the Dask-built and shard-built stores equal the one-process store array for array (their
per-array digests cover every chunk file's bytes); the two-process run's loss curve agrees
with the one-process run's within the tolerance the section states; both end well above
chance; the map computed on Dask workers equals the same map computed in one process.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from satdata.store import open_store
from tests.test_readme import commands, run_commands

pytest.importorskip("distributed")

REPO = Path(__file__).resolve().parents[1]
TITLE = "## Scaling out"


def losses(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_scaling_section_runs_as_written(tmp_path: Path, digits_store32: Path) -> None:
    shutil.copytree(digits_store32, tmp_path / "digits.zarr")
    shutil.copytree(REPO / "manifests", tmp_path / "manifests")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmds = commands([TITLE], ("torchrun", "satdata", "sattrain"))
    assert cmds[0].startswith("torchrun --standalone --nproc-per-node 2 -m sattrain run digits.zarr")
    assert sum("--shard" in c for c in cmds) == 3 and any("--dask" in c for c in cmds)
    said = run_commands(cmds, tmp_path, env, timeout=900)

    # the stores: byte for byte what one process wrote (digests cover every chunk file)
    want = open_store(digits_store32).info.digests
    assert len(want) >= 6
    for name in ("digits-dask.zarr", "digits-shards.zarr"):
        assert open_store(tmp_path / name).info.digests == want, name
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".digits-") and not p.name.endswith(".lock")]
    assert any("matches manifests/digits.json" in v for v in said.values())

    # training: two processes against one, the tolerance the section states
    two, one = losses(tmp_path / "runs" / "ddp"), losses(tmp_path / "runs" / "one")
    assert len(two) == len(one) == 3
    for a, b in zip(one, two):
        assert abs(a["loss"] - b["loss"]) <= 0.1 + 0.1 * a["loss"], (a["epoch"], a["loss"], b["loss"])
    assert one[-1]["clean_acc"] > 0.5 and two[-1]["clean_acc"] > 0.5  # chance is 0.1
    cfg = json.loads((tmp_path / "runs" / "ddp" / "config.json").read_text())
    assert cfg["processes"]["world_size"] == 2 and cfg["processes"]["batch_size_per_process"] == 32

    # the teacher's maps from Dask workers equal one process's
    from satdata.saliency.generate import SaliencyConfig, generate_maps

    st = open_store(tmp_path / "digits.zarr")
    assert "gradcampp-dask" in st.info.maps
    shutil.copytree(digits_store32, tmp_path / "again.zarr")
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each Dask worker computes
    try:
        here = generate_maps(SaliencyConfig(store=str(tmp_path / "again.zarr"), method="gradcampp",
                                            teacher=str(tmp_path / "runs" / "one"), progress=False))
    finally:
        torch.set_num_threads(threads)
    again = open_store(tmp_path / "again.zarr")
    for split in ("train", "test"):
        assert (here.info.digests[again.array_key(split, "saliency", "gradcampp")]
                == st.info.digests[st.array_key(split, "saliency", "gradcampp-dask")])
