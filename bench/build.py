"""Build speed: `satdata build --source voc-boxes` against a naive loop and the decode limit.

Generates (once, cached with --data) a VOC2012-format tree of N JPEGs of 500x375 with real
VOC XML, then measures images per second for

* satkit: ``satdata.build.build`` (parallel decode, whole-chunk zarr writes, digests),
* naive: one process, PIL decode + resize + one ``.npy`` per image (what research code does),
* decode-only limit: the same decoder, geometry and worker pool as satkit, nothing written,

and reports the store's size against the raw uint8 size. Prints one JSON object.
Goal: satkit >= 0.8x the decode-only limit.

    python bench/build.py --images 2000 --workers 2
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import cached, done  # noqa: E402

from satdata.build import BuildConfig, _init_worker, _process, build  # noqa: E402
from satdata.sources import BadSamples, SourceOptions, make_source  # noqa: E402
from satdata.sources.voc import VOC_CLASSES  # noqa: E402
from tests.fixtures.voc import Obj, write_xml  # noqa: E402

W, H = 500, 375


def natural_image(rng: np.random.Generator) -> np.ndarray:
    """A smooth, textured RGB image (low-frequency noise, a gradient, a few blobs):
    closer to a photo's JPEG entropy than flat colour or white noise."""
    small = rng.random((H // 25 + 2, W // 25 + 2, 3)).astype(np.float32)
    import cv2

    img = cv2.resize(small, (W, H), interpolation=cv2.INTER_CUBIC)
    img += 0.08 * rng.standard_normal((H, W, 3)).astype(np.float32)
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    img += 0.3 * (xx / W)[:, :, None]
    return (np.clip(img, 0, 1.3) / 1.3 * 255).astype(np.uint8)


def make_tree(base: Path, n: int, seed: int = 0) -> Path:
    voc = base / "VOCdevkit" / "VOC2012"
    if cached(voc, str(n)):
        return base / "VOCdevkit"
    for d in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (voc / d).mkdir(parents=True)
    rng = np.random.default_rng(seed)
    ids = [f"2008_{i:06d}" for i in range(n)]
    for iid in ids:
        objs = []
        for _ in range(int(rng.integers(1, 4))):
            x0, y0 = int(rng.integers(1, W - 60)), int(rng.integers(1, H - 60))
            x1, y1 = int(rng.integers(x0 + 20, W)), int(rng.integers(y0 + 20, H))
            objs.append(Obj(str(rng.choice(VOC_CLASSES)), x0, y0, x1, y1))
        write_xml(voc / "Annotations" / f"{iid}.xml", "2012", f"{iid}.jpg", W, H, objs, segmented=False)
        Image.fromarray(natural_image(rng)).save(voc / "JPEGImages" / f"{iid}.jpg", quality=90)
    (voc / "ImageSets" / "Main" / "train.txt").write_text("".join(i + "\n" for i in ids))
    done(voc, str(n))
    return base / "VOCdevkit"


def run_satkit(root: Path, out: Path, workers: int, size: int) -> tuple[float, dict]:
    t = time.perf_counter()
    res = build(BuildConfig(source="voc-boxes", root=str(root), out=str(out), size=(size, size), splits=("train",),
                            workers=workers, overwrite=True, progress=False))
    return time.perf_counter() - t, res.info.splits


def run_decode_only(root: Path, workers: int, size: int) -> float:
    """Same source, decoder, geometry and pool as the builder; results are dropped."""
    src = make_source("voc-boxes", root, SourceOptions(), BadSamples(False))
    t = time.perf_counter()
    records = src.records("train")
    if workers > 0:
        ctx = mp.get_context("forkserver")
        with ctx.Pool(workers, initializer=_init_worker, initargs=(src, (size, size), "stretch")) as pool:
            for _ in pool.imap(_process, records, chunksize=max(1, len(records) // (8 * workers))):
                pass
    else:
        _init_worker(src, (size, size), "stretch")
        for r in records:
            _process(r)
    return time.perf_counter() - t


def run_naive(root: Path, out: Path, size: int) -> float:
    """One process: PIL decode, resize, np.save per image (plus the label)."""
    voc = root / "VOC2012"
    ids = (voc / "ImageSets" / "Main" / "train.txt").read_text().split()
    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    for iid in ids:
        with Image.open(voc / "JPEGImages" / f"{iid}.jpg") as im:
            arr = np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR))
        np.save(out / f"{iid}.npy", arr)
    return time.perf_counter() - t


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--data", type=Path, default=None, help="cache the generated VOC tree here")
    ap.add_argument("--repeats", type=int, default=2, help="best of N for each contender")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="satkit-bench-build-"))
    data = args.data or tmp / "data"
    try:
        t = time.perf_counter()
        root = make_tree(data, args.images)
        gen_s = time.perf_counter() - t
        n = args.images
        decode = min(run_decode_only(root, args.workers, args.size) for _ in range(args.repeats))
        sat_times = []
        for _ in range(args.repeats):
            s, counts = run_satkit(root, tmp / "voc.zarr", args.workers, args.size)
            sat_times.append(s)
        sat = min(sat_times)
        naive = min(run_naive(root, tmp / f"npy{i}", args.size) for i in range(args.repeats))
        store_bytes = du(tmp / "voc.zarr")
        raw_bytes = n * args.size * args.size * (3 + 1)  # images + one uint8 map
        jpeg_bytes = du(root / "VOC2012" / "JPEGImages")
        result = {
            "benchmark": "build",
            "images": n,
            "source_image": f"{W}x{H} JPEG",
            "store_size": args.size,
            "workers": args.workers,
            "cpus": os.cpu_count(),
            "generate_seconds": round(gen_s, 2),
            "satkit_img_per_s": round(n / sat, 1),
            "decode_only_img_per_s": round(n / decode, 1),
            "naive_npy_img_per_s": round(n / naive, 1),
            "satkit_vs_decode_only": round(decode / sat, 3),
            "satkit_vs_naive": round(naive / sat, 3),
            "goal_vs_decode_only": 0.8,
            "goal_met": decode / sat >= 0.8,
            "store_bytes": store_bytes,
            "raw_uint8_bytes": raw_bytes,
            "store_vs_raw": round(store_bytes / raw_bytes, 3),
            "jpeg_bytes": jpeg_bytes,
            "counts": counts,
        }
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
