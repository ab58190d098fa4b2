"""Scaling out: Dask builds at three image sizes and 1/2/4 workers, streaming, DDP, files.

Generates (once, cached with --data) a VOC2012-format tree of --images JPEGs of 500x375
(bench/build.py's generator), then, for each --sizes S and --workers W:

* ``build``: ``satdata build --source voc-boxes --size S --dask ADDRESS`` on a Dask
  LocalCluster of W one-thread worker processes, started before the clock (a lab's
  cluster is already running), images/s;
* ``decode_only``: the same cluster running the same decode + resize (``_process``) over
  ranges of the same length, results dropped: what the build cannot beat;
* ``build_vs_decode_only`` (goal >= 0.8 at every size) and the speed-up over W=1.

For each size, from the store built: ``streaming`` images/s of one epoch of
``StreamingSplit`` (the path ``sattrain run`` takes when a split exceeds
``--memory-budget``) with a budget of a quarter of the split, and the files per array,
counted and extrapolated to ImageNet-1k's 1,281,167 training images. Then DDP training
step throughput of the small CNN with 1 and 2 processes on CPU (gloo), from
bench/ddp_step.py. Prints one JSON object.

    python bench/scale.py --data /tmp/scale-data --json bench/results/scale.json
    python bench/scale.py --quick          # a smoke run: few images, 1 and 2 workers
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._common import emit, machine  # noqa: E402
from bench.build import make_tree  # noqa: E402

IMAGENET_TRAIN = 1_281_167


def decode_range(source: Any, records: list, size: int) -> int:
    """A Dask task: decode and resize ``records`` exactly as a build does; keep nothing."""
    from satdata import build as b

    b.init_decoder(source, (size, size), "stretch", True)
    for r in records:
        b._process(r)
    return len(records)


def run_decode_only(client: Any, root: Path, size: int, range_len: int) -> float:
    from distributed import wait

    from satdata.sources import BadSamples, SourceOptions, make_source

    src = make_source("voc-boxes", root, SourceOptions(), BadSamples(False))
    t = time.perf_counter()
    records = src.records("train")
    fut_src = client.scatter(src, broadcast=True)
    futs = [client.submit(decode_range, fut_src, records[a:a + range_len], size, pure=False)
            for a in range(0, len(records), range_len)]
    wait(futs)
    assert sum(f.result() for f in futs) == len(records)
    return time.perf_counter() - t


def run_build(address: str, root: Path, out: Path, size: int) -> tuple[float, dict[str, Any]]:
    from satdata.build import BuildConfig, build

    t = time.perf_counter()
    res = build(BuildConfig(source="voc-boxes", root=str(root), out=str(out), size=(size, size), splits=("train",),
                            dask=address, overwrite=True, progress=False))
    return time.perf_counter() - t, res.info.provenance["built_by"]


def files_per_array(store_path: Path, n: int) -> dict[str, Any]:
    """Stored files of the train images array, and of the same layout at ImageNet-1k's size."""
    from satdata.store import files_per_array as layout_files, open_store, write_unit

    st = open_store(store_path)
    arr = st.array("train", "images")
    files = sum(1 for p in (store_path / arr.path).rglob("*") if p.is_file() and p.name != "zarr.json")
    size = tuple(st.info.image_size)
    assert files == layout_files(n, size)  # type: ignore[arg-type]
    return {"samples": n, "files": files, "samples_per_file": write_unit(arr), "format_version": st.info.format_version,
            "imagenet_1k_files": layout_files(IMAGENET_TRAIN, size)}  # type: ignore[arg-type]


def run_streaming(store_path: Path) -> dict[str, Any]:
    import numpy as np
    import torch

    from sattrain.data import StreamingSplit, sample_bytes
    from satdata.store import open_store

    st = open_store(store_path)
    n = st.info.splits["train"]
    maps = ["boxes"]
    budget = max(1, n * sample_bytes(st, "train", maps) // 4)
    split = StreamingSplit(st, "train", maps, np.arange(n), torch.device("cpu"), budget)
    g = torch.Generator().manual_seed(0)
    t = time.perf_counter()
    seen = sum(b.images.shape[0] for b in split.batches(128, g, "boxes"))
    s = time.perf_counter() - t
    return {"img_per_s": round(seen / s, 1), "mb_per_s": round(seen * sample_bytes(st, "train", maps) / s / 1e6, 1),
            "memory_budget": budget, "samples": seen}


def run_ddp(quick: bool) -> dict[str, Any]:
    script = ROOT / "bench" / "ddp_step.py"
    cmd = [sys.executable, str(script)] + (["--steps", "2", "--warmup", "1", "--repeats", "1"] if quick else [])
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=1200)
    if r.returncode != 0:
        raise SystemExit(f"bench/ddp_step.py failed: {r.stderr.strip()[-2000:]}")
    return json.loads(r.stdout[r.stdout.index("{"):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=4096, help="JPEGs to build from (224x224: 8 shards of 512)")
    ap.add_argument("--sizes", default="32,64,224")
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--data", type=Path, default=None, help="cache the generated VOC tree here")
    ap.add_argument("--json", type=Path, default=None, help="also write the result here")
    ap.add_argument("--quick", action="store_true", help="smoke run: 200 images, 1 and 2 workers, a short DDP run")
    args = ap.parse_args()
    if args.quick:
        args.images, args.workers = min(args.images, 200), "1,2"
    sizes = [int(s) for s in args.sizes.split(",")]
    workers = [int(w) for w in args.workers.split(",")]

    import logging

    from distributed import Client, LocalCluster

    tmp = Path(tempfile.mkdtemp(prefix="satkit-bench-scale-"))
    data = args.data or tmp / "data"
    result: dict[str, Any] = {"benchmark": "scale", "images": args.images, "source_image": "500x375 JPEG",
                              "machine": machine(), "sizes": {}}
    try:
        root = make_tree(data, args.images)
        for size in sizes:
            per: dict[str, Any] = {"workers": {}}
            for w in workers:
                with LocalCluster(n_workers=w, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=None, silence_logs=logging.ERROR) as cluster, \
                        Client(cluster) as client:
                    out = tmp / f"voc{size}.zarr"
                    build_s, built_by = run_build(cluster.scheduler_address, root, out, size)
                    range_len = math.ceil(args.images / built_by["tasks"])
                    decode_s = run_decode_only(client, root, size, range_len)
                    # a second build: the first paid for the workers' imports
                    build_s = min(build_s, run_build(cluster.scheduler_address, root, out, size)[0])
                per["workers"][str(w)] = {"build_img_per_s": round(args.images / build_s, 1),
                                          "decode_only_img_per_s": round(args.images / decode_s, 1),
                                          "build_vs_decode_only": round(decode_s / build_s, 3),
                                          "tasks": built_by["tasks"]}
            one = per["workers"][str(workers[0])]["build_img_per_s"]
            for w, v in per["workers"].items():
                v["speedup_vs_%d_worker" % workers[0]] = round(v["build_img_per_s"] / one, 2)
            per["goal_build_vs_decode_only"] = 0.8
            per["goal_met"] = all(v["build_vs_decode_only"] >= 0.8 for v in per["workers"].values())
            per["streaming"] = run_streaming(tmp / f"voc{size}.zarr")
            per["files_per_array"] = files_per_array(tmp / f"voc{size}.zarr", args.images)
            result["sizes"][str(size)] = per
            shutil.rmtree(tmp / f"voc{size}.zarr", ignore_errors=True)
        result["ddp"] = run_ddp(args.quick)
        result["goal_met"] = all(v["goal_met"] for v in result["sizes"].values())
        emit(result, args.json)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
