"""Reading a store over S3 against reading the same store from the local disk.

Writes (once; cached with --data) a synthetic store of --samples samples of --size x --size
with ``satdata.store.ArrayWriter`` (random uint8 images, a binary rectangle mask per
image, 10 classes, one split), starts a SeaweedFS S3 server on 127.0.0.1
(``tests/s3server.py``, the ``weed`` binary of the dev extra), uploads the store to it,
and starts a forwarding proxy in front of the server that waits --delay-ms before each
request (``tests/s3server.py``, ``DelayProxy``: a far-away server made of a near one).
Then, for the store on the local disk (**the baseline**), over S3 on loopback, and over S3
behind the proxy (satkit's S3 defaults: satdata/remote.py, ``backend_options``):

* ``train``: a streamed training epoch of --train-samples samples, a small-CNN step per
  batch while the next block is read (what ``sattrain run`` sees);
* ``stream``: one epoch of ``StreamingSplit`` batches (images + map + labels), with a
  --memory-budget small enough to force streaming (blocks of whole chunks, read by a
  background thread while the previous block is consumed); samples per second;
* ``load``: ``open_store`` + ``load_split`` of the whole split (images, labels, map);
* ``verify``: ``open_store`` + ``verify_digests`` (every chunk fetched, hashed, decoded).

Each is timed --repeats times (median); ratios are local seconds / remote seconds (for
streaming: remote samples/s over local samples/s), so 1.0 means "as fast as the local
disk". The goals: streaming from S3 >= 0.8x local, and >= 0.5x with the added delay,
for training and for the reads alone.
``fetch`` is the transfer limit: every chunk file of the images and the map fetched,
``satdata.chunkio.DEFAULT_CONCURRENCY`` in flight, nothing decoded; no reader can stream
faster than that (``stream_ceiling_vs_local``). ``*_before`` rows (unless --no-before)
measure, in the same run, how satkit read before ``satdata/chunkio.py``: streaming with
each block read one chunk after another through zarr, and verify fetching each chunk
twice, one at a time. (Loading has no such row: it reads through zarr, which fetches a
slab's chunks concurrently, before and after.)

    python bench/remote.py                                  # 200,000 samples of 16x16
    python bench/remote.py --samples 4096 --repeats 1 --data /tmp/remote-data
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator
from unittest import mock

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, machine, median, synthetic_store  # noqa: E402

MAP = "mask"
BUCKET = "bench"


# --------------------------------------------------------------------------- data


def du(path: Path) -> tuple[int, int]:
    """Bytes and files under ``path``."""
    files = [f for f in path.rglob("*") if f.is_file()]
    return sum(f.stat().st_size for f in files), len(files)


# --------------------------------------------------------------------------- contenders


@contextlib.contextmanager
def before_chunkio() -> Iterator[None]:
    """Streaming as satkit did it before satdata/chunkio.py: each block read one chunk after
    another (the local-disk branch of StreamingSplit._read_block, taken for every store)."""
    from satdata import chunkio

    with mock.patch.object(chunkio, "is_local", lambda arr: True):
        yield


def stream_epoch(opener: Callable[[], Any], n: int, bs: int, budget: int, *, train: bool = False,
                 seed: int = 1000) -> Callable[[], dict[str, Any]]:
    """One timed epoch of StreamingSplit batches over the first ``n`` samples; the split is
    opened outside the timing.

    With ``train``, each batch (images + map + labels) takes a SAT-like step of the small
    CNN (the map's saliency as the perturbation, one forward and one backward pass, Adam),
    so the next block is read while the model trains on this one, as in ``sattrain run``:
    what a user sees. Without, the epoch only reads.
    """
    import torch

    from sattrain.data import StreamingSplit, images_to_float, make_generator, map_codec, saliency_from_stored
    from sattrain.models import create_model

    st = opener()
    split = StreamingSplit(st, "train", (MAP,), np.arange(n), torch.device("cpu"), budget)
    codec = map_codec(st, MAP)
    torch.manual_seed(0)
    model = create_model("small-cnn", 10)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    epoch = [0]

    def step(raw: Any) -> None:
        x = images_to_float(raw.images)
        x = (x - (8 / 255) * saliency_from_stored(raw.maps, codec)).clamp(0, 1)
        loss = torch.nn.functional.cross_entropy(model(x), raw.labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def run() -> dict[str, Any]:
        g = make_generator("cpu", seed + epoch[0])
        epoch[0] += 1
        seen = 0
        t = time.perf_counter()
        for raw in split.batches(bs, g, MAP):
            if train:
                step(raw)
            seen += raw.images.shape[0]
        dt = time.perf_counter() - t
        assert seen >= n - 1, f"an epoch yielded {seen} of {n} samples"
        return {"seconds": dt, "block_samples": split.block_samples, "samples": seen}

    return run


def load_whole(opener: Callable[[], Any], n: int) -> Callable[[], dict[str, Any]]:
    from sattrain.data import load_split

    def run() -> dict[str, Any]:
        t = time.perf_counter()
        host = load_split(opener(), "train", (MAP,), np.arange(n), progress=False)
        dt = time.perf_counter() - t
        return {"seconds": dt, "bytes": host.nbytes}

    return run


def verify(opener: Callable[[], Any]) -> Callable[[], dict[str, Any]]:
    from satdata.verify import verify_digests

    def run() -> dict[str, Any]:
        t = time.perf_counter()
        rep = verify_digests(opener())
        dt = time.perf_counter() - t
        assert rep.ok, [str(p) for p in rep.problems]
        return {"seconds": dt, "arrays": len(rep.checked)}

    return run


def verify_before(opener: Callable[[], Any]) -> Callable[[], dict[str, Any]]:
    """``satdata verify`` as it was before satdata/chunkio.py: chunk after chunk, each chunk
    fetched twice (its stored bytes for the file digest, then decoded again through zarr).
    The report is not built; the same bytes are fetched and hashed."""
    import hashlib

    from satdata.store import _canonical_bytes, chunk_file_digest, iter_chunks, read_chunk_file

    def run() -> dict[str, Any]:
        t = time.perf_counter()
        st = opener()
        for path in sorted(st.info.digests):
            arr = st.group[path]
            whole = hashlib.sha256()
            for i, (a, b) in enumerate(iter_chunks(arr)):
                chunk_file_digest(read_chunk_file(arr, i))
                whole.update(_canonical_bytes(np.asarray(arr[a:b])))
        return {"seconds": time.perf_counter() - t, "arrays": len(st.info.digests)}

    return run


def fetch_all(opener: Callable[[], Any]) -> Callable[[], dict[str, Any]]:
    """The transfer limit: every chunk file of the images and the map fetched (chunkio's window),
    nothing decoded or hashed; the store is opened outside the timing."""
    from satdata.chunkio import iter_chunk_files
    from satdata.store import iter_chunks

    st = opener()
    arrays = [st.array("train", "images"), st.array("train", "saliency", MAP)]

    def run() -> dict[str, Any]:
        t = time.perf_counter()
        got = 0
        for _, _, stored, _ in iter_chunk_files(((a, i) for a in arrays for i in range(len(list(iter_chunks(a))))),
                                                decode=False):
            got += len(stored or b"")
        return {"seconds": time.perf_counter() - t, "bytes": got}

    return run


def s3fs_version() -> str:
    import s3fs

    return str(s3fs.__version__)


def timed(fn: Callable[[], dict[str, Any]], repeats: int) -> dict[str, Any]:
    runs = [fn() for _ in range(repeats)]
    secs = [r["seconds"] for r in runs]
    out = {k: v for k, v in runs[0].items() if k != "seconds"}
    out.update({"seconds": round(median(secs), 4), "runs": [round(s, 4) for s in secs]})
    return out


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=200_000)
    ap.add_argument("--size", type=int, default=16, help="image side (the chunk holds 1,024 samples at 16x16)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--memory-budget", default="32M", help="StreamingSplit's budget (forces streaming)")
    ap.add_argument("--delay-ms", type=float, default=20.0, help="added before every request by the proxy")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per contender (median)")
    ap.add_argument("--train-samples", type=int, default=20_000,
                    help="samples of the streamed training epoch (``train``: model steps overlap the reads)")
    ap.add_argument("--no-before", action="store_true",
                    help="skip the rows that measure the reads before satdata/chunkio.py (the slowest part)")
    ap.add_argument("--data", type=Path, default=None, help="cache the generated store here")
    ap.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    from satdata.chunkio import DEFAULT_CONCURRENCY
    from satdata.store import open_store
    from sattrain.config import parse_size_bytes
    from tests.s3server import DelayProxy, SeaweedS3

    budget = parse_size_bytes(args.memory_budget)
    tmp = Path(tempfile.mkdtemp(prefix="satkit-bench-remote-"))
    try:
        t = time.perf_counter()
        local = synthetic_store(args.data or tmp / "data", args.samples, args.size)
        gen_s = time.perf_counter() - t
        nbytes, nfiles = du(local)
        with SeaweedS3() as s3, DelayProxy(s3.endpoint, args.delay_ms / 1000) as proxy:
            t = time.perf_counter()
            s3.make_bucket(BUCKET)
            s3.upload(local, f"{BUCKET}/store.zarr")
            upload_s = time.perf_counter() - t
            url = f"s3://{BUCKET}/store.zarr"
            slow_opts = {**s3.storage_options(readonly=True), "endpoint_url": proxy.endpoint}
            where: dict[str, Callable[[], Any]] = {
                "local": lambda: open_store(local),
                "s3": lambda: open_store(url, storage_options=s3.storage_options(readonly=True)),
                "s3_delayed": lambda: open_store(url, storage_options=slow_opts),
            }
            n, r = args.samples, args.repeats
            res: dict[str, dict[str, Any]] = {"fetch": {}, "stream": {}, "train": {}, "load": {}, "verify": {}}
            for name, opener in where.items():
                res["fetch"][name] = timed(fetch_all(opener), r)
                res["train"][name] = timed(stream_epoch(opener, min(n, args.train_samples), args.batch_size, budget,
                                                        train=True, seed=2000), r)
                res["stream"][name] = timed(stream_epoch(opener, n, args.batch_size, budget), r)
                res["load"][name] = timed(load_whole(opener, n), r)
                res["verify"][name] = timed(verify(opener), r)
            if not args.no_before:
                for name in ("s3", "s3_delayed"):
                    with before_chunkio():
                        res["stream"][f"{name}_before"] = timed(stream_epoch(where[name], n, args.batch_size, budget), 1)
                    res["verify"][f"{name}_before"] = timed(verify_before(where[name]), 1)
            requests_delayed = proxy.requests

        for what, rows in res.items():
            base = rows["local"]["seconds"]
            for v in rows.values():
                v["vs_local"] = round(base / v["seconds"], 3)
                if what == "stream":
                    v["samples_per_s"] = round(n / v["seconds"], 0)
                if what == "train":
                    v["samples_per_s"] = round(v["samples"] / v["seconds"], 0)
        # goal: streaming from S3 >= 0.8x local, >= 0.5x with the delay; for training and for reads alone
        goals = {f"{what}_{name}_vs_local": {"goal": goal, "value": res[what][name]["vs_local"],
                                             "goal_met": res[what][name]["vs_local"] >= goal}
                 for what in ("stream", "train") for name, goal in (("s3", 0.8), ("s3_delayed", 0.5))}
        # no reader streams faster than the chunk files arrive: local streaming time over the
        # time to fetch the same files is the most any reader could reach on this machine
        ceiling = {k: round(res["stream"]["local"]["seconds"] / v["seconds"], 3) for k, v in res["fetch"].items() if k != "local"}
        result = {
            "benchmark": "remote",
            "samples": n,
            "image_size": [args.size, args.size],
            "batch_size": args.batch_size,
            "memory_budget_bytes": budget,
            "delay_ms": args.delay_ms,
            "concurrency": DEFAULT_CONCURRENCY,  # satdata.chunkio.DEFAULT_CONCURRENCY
            "store": {"bytes": nbytes, "files": nfiles, "generate_seconds": round(gen_s, 1),
                      "upload_seconds": round(upload_s, 1)},
            "server": "SeaweedFS `weed server -s3` on 127.0.0.1 (tests/s3server.py)",
            "client": {"s3fs": s3fs_version(), "storage_options": "key, secret, endpoint_url only, plus satkit's "
                       "defaults (satdata/remote.py backend_options: max_concurrency=1, 32 pooled connections)"},
            "stream_ceiling_vs_local": ceiling,
            "proxy_requests": requests_delayed,
            "results": res,
            "goals": goals,
            "goal_met": all(g["goal_met"] for g in goals.values()),
            "machine": machine(),
        }
        emit(result, args.json)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
