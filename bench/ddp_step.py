"""Training-step throughput (images/s) of a model in one process and in several (DistributedDataParallel).

Each measurement starts ``nproc`` fresh processes (torch.multiprocessing, spawn) that train
the model on a synthetic batch, as ``sattrain run`` does under torchrun: the global batch
(--batch-size) split evenly over the processes, each process's step forward, cross-entropy,
backward (gradients averaged by DDP) and an Adam step. Rank 0 times --steps steps after
--warmup untimed ones, --repeats times; the row reports the median, as global images/s.

* CPU (gloo): one process (the plain model, no process group) and each N of --nproc (DDP),
  the --threads cores split evenly over the processes, so the rows compare the same CPU.
* CUDA: one process, plain against DDP-wrapped (a one-process NCCL group): what the wrapper
  costs per step; then each N of --nproc up to the GPUs present (one GPU per process).

    python bench/ddp_step.py                                   # CPU: 1 and 2 processes
    python bench/ddp_step.py --device cuda --model resnet18 --batch-size 512
    python bench/ddp_step.py --steps 3 --repeats 1 --warmup 1  # smoke

``measure(nproc, ddp=..., ...)`` is the one measurement, for other scripts.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, machine, median  # noqa: E402

import torch  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, nproc: int, ddp: bool, opts: dict[str, Any], port: int, results: Any) -> None:
    """One process: join the group (ddp), train --steps steps --repeats times; rank 0 reports seconds."""
    import torch.nn.functional as F

    from sattrain.models import create_model

    torch.set_num_threads(opts["threads"])
    cuda = opts["device"] == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if ddp:
        import torch.distributed as dist

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=nproc)
    torch.manual_seed(0)
    model = create_model(opts["model"], 10).to(device)
    net = model
    if ddp:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[rank] if cuda else None)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    b, s = opts["batch_size"] // nproc, opts["image_size"]
    g = torch.Generator().manual_seed(rank)
    x = torch.rand(b, 3, s, s, generator=g).to(device)
    y = torch.randint(0, 10, (b,), generator=g).to(device)

    def step() -> None:
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    net.train()
    for _ in range(opts["warmup"]):
        step()
    times = []
    for _ in range(opts["repeats"]):
        sync()
        t = time.perf_counter()
        for _ in range(opts["steps"]):
            step()
        sync()
        times.append(time.perf_counter() - t)
    if rank == 0:
        results.put(times)
    if ddp:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()


def measure(nproc: int, *, ddp: bool, device: str = "cpu", model: str = "small-cnn", batch_size: int = 128,
            image_size: int = 32, steps: int = 20, warmup: int = 3, repeats: int = 3,
            threads: int | None = None) -> dict[str, Any]:
    """Global images/s of ``nproc`` processes (DDP when ``ddp``; ``nproc`` 1 without it: the plain model).

    ``threads``: CPU threads in all, split over the processes (default: the machine's cores).
    """
    import torch.multiprocessing as mp

    if batch_size % nproc:
        raise ValueError(f"--batch-size {batch_size} does not split over {nproc} processes")
    if nproc > 1 and not ddp:
        raise ValueError("several processes train together only with DDP")
    total = threads or os.cpu_count() or 1
    opts = {"device": device, "model": model, "batch_size": batch_size, "image_size": image_size, "steps": steps,
            "warmup": warmup, "repeats": repeats, "threads": max(1, total // nproc)}
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    mp.start_processes(_worker, args=(nproc, ddp, opts, _free_port(), results), nprocs=nproc, join=True,
                       start_method="spawn")
    times = results.get()
    sec = median(times) / steps
    return {"processes": nproc, "ddp": ddp, "device": device, "model": model, "batch_size": batch_size,
            "batch_per_process": batch_size // nproc, "threads_per_process": opts["threads"],
            "ms_per_step": round(sec * 1e3, 3), "images_per_s": round(batch_size / sec, 1),
            "repeats": [round(t / steps * 1e3, 3) for t in times]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--model", default="small-cnn")
    ap.add_argument("--batch-size", type=int, default=128, help="global batch (split over the processes)")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--nproc", default="2", help="process counts besides 1, comma-separated (default 2)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per repeat")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads in all (default: the cores)")
    ap.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench/ddp_step.py: --device cuda: no CUDA device")
    counts = sorted({int(k) for k in args.nproc.split(",") if k.strip()} - {1})
    if args.device == "cuda":
        counts = [k for k in counts if k <= torch.cuda.device_count()]
    kw = dict(device=args.device, model=args.model, batch_size=args.batch_size, image_size=args.image_size,
              steps=args.steps, warmup=args.warmup, repeats=args.repeats, threads=args.threads)
    rows = [measure(1, ddp=False, **kw)]
    if args.device == "cuda":
        rows.append(measure(1, ddp=True, **kw))  # the wrapper's own cost
    rows += [measure(k, ddp=True, **kw) for k in counts]
    for r in rows:
        print(f"{r['processes']} process(es), {'DDP' if r['ddp'] else 'plain'}: {r['images_per_s']:,.0f} img/s "
              f"({r['ms_per_step']} ms/step)", file=sys.stderr, flush=True)
    base = rows[0]["images_per_s"]
    emit({"benchmark": "ddp_step", "machine": machine(), "rows": rows,
          "speedup_vs_plain": {f"{r['processes']}{'-ddp' if r['ddp'] else ''}": round(r["images_per_s"] / base, 3)
                               for r in rows[1:]}}, args.json)


if __name__ == "__main__":
    main()
