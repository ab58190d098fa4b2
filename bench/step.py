"""Training-step cost: seconds per step of each method, same model and batch, as ratios to standard.

Each method of ``sattrain.methods`` is timed through the trainer's own loop,
``sattrain.trainer.train_one_epoch`` (the data path of ``sattrain run``: shuffled batches of
an in-memory split, crop + flip of image and map together, floats and S on the device,
the method, backward, Adam step), over epochs of --steps full batches: one warm-up epoch,
then the median of --repeats epochs. Methods with a per-batch coin (pgd+sat, trades+sat)
attack about half the batches; their measured attack share is reported beside the time.

Baseline for the SAT perturbation itself: the same step with the perturbation built on
the host in numpy (random signs, Bernoulli mask, x - eps * g, clip, as research code
does) and the result copied to the device (``sat_host_numpy``), against the same loop with
``sattrain.perturb.sat_perturb`` on the device (``sat_device``). On a CPU the copy is free,
so there the difference is numpy's random numbers against torch's.

Goals: sat within 1.10x of standard; pgd+sat about half way between standard and pgd;
fgsm-rs (one attack step) within 2.1x of standard, where that method exists.

How the model runs is ``sattrain.accel``'s, as in ``sattrain run``: ``--precision``
(auto: bf16 on CUDA devices with native bfloat16, fp16 on older ones, fp32 on the CPU),
``--channels-last`` (auto: on for CUDA) and ``--compile`` (none by default). ``--amp`` is
the older spelling of ``--precision fp16`` on CUDA and does nothing on the CPU. The CPU
defaults are fp32, NCHW, not compiled: the numbers measured before these options existed.

    python bench/step.py                                          # CPU: small-cnn, batch 128
    python bench/step.py --device cuda --model resnet18 --batch-size 512   # a GPU (bf16, channels_last)
    python bench/step.py --device cuda --model resnet18 --batch-size 512 --precision fp16 --channels-last off
    python bench/step.py --steps 2 --repeats 1 --methods standard,sat             # smoke
"""

from __future__ import annotations

import argparse
import inspect
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, machine, median, timed  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

BASE_METHODS = ("standard", "noise", "sat", "pgd", "trades", "pgd+sat", "trades+sat")
# the fast adversarial-training baselines, measured where sattrain.methods has them
FAST_METHODS = ("fgsm-rs", "fgsm-rs+sat", "free")
MAP = "mask"


def available_methods() -> tuple[str, ...]:
    from sattrain.methods import method_names

    known = set(method_names())
    return BASE_METHODS + tuple(m for m in FAST_METHODS if m in known)


METHODS = available_methods()


def sat_numpy(x: np.ndarray, S: np.ndarray, *, eps: float, p: float, rng: np.random.Generator) -> np.ndarray:
    """The SAT perturbation of docs/method.md computed on the host in numpy (the research-code way)."""
    n = rng.integers(0, 2, size=x.shape, dtype=np.int8).astype(np.float32) * 2 - 1
    w = rng.random(size=x.shape, dtype=np.float32) < p
    g = np.where(w, np.broadcast_to(S, x.shape), n)
    return np.clip(x - eps * g, 0.0, 1.0).astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small-cnn")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=12, help="full batches per timed epoch")
    ap.add_argument("--repeats", type=int, default=5, help="timed epochs per method (median)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="auto", help="auto|fp32|fp16|bf16, as sattrain run --precision")
    ap.add_argument("--channels-last", default="auto", help="auto|on|off, as sattrain run --channels-last")
    ap.add_argument("--compile", default="none", help="none|default|reduce-overhead|max-autotune, as sattrain run")
    ap.add_argument("--amp", action="store_true", help="the older flag: --precision fp16 on CUDA (nothing on the CPU)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--epoch", type=int, default=50, help="curriculum epoch t for p_t (cost does not depend on it)")
    ap.add_argument("--data", type=Path, default=None, help="cache the generated store here")
    ap.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from read import make_data  # the synthetic store of bench/read.py, at --image-size

    from satdata.store import open_store
    from sattrain.data import InMemorySplit, load_split, make_generator, map_codec, prepare_batch
    from sattrain.methods import StepContext, get_method
    from sattrain.models import create_model
    from sattrain.perturb import curriculum_p, sat_perturb
    from sattrain import accel
    from sattrain.accel import backward_step
    from sattrain.trainer import resolve_device, train_one_epoch

    from satdata.errors import SatkitError

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    try:
        dev = resolve_device(args.device)
        for m in methods:
            get_method(m)
        precision = "fp16" if args.amp and dev.type == "cuda" else args.precision
        acc = accel.resolve(dev, precision=precision, channels_last=args.channels_last, compile=args.compile)
    except SatkitError as e:
        raise SystemExit(f"bench/step.py: {e}") from None
    amp = acc.precision != "fp32"
    sync: Callable[[], None] = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    # the trainer's own channels_last option, where train_one_epoch has it (else the model alone is)
    epoch_kw: dict[str, Any] = ({"channels_last": acc.channels_last}
                                if "channels_last" in inspect.signature(train_one_epoch).parameters else {})
    n = args.steps * args.batch_size
    tmp = Path(tempfile.mkdtemp(prefix="satkit-bench-step-"))
    try:
        paths = make_data(args.data or tmp / "data", n, size=args.image_size)
        st = open_store(paths["store"])
        codec = map_codec(st, MAP)
        host = load_split(st, "train", (MAP,), np.arange(n), progress=False)
        on_dev = InMemorySplit(host, dev, "device")
        on_host = InMemorySplit(host, torch.device("cpu"), "device")  # research code: batches on the host
        num_classes = len(st.info.classes)
        p = curriculum_p(args.epoch, 0.6)
        eps = 8 / 255

        def fresh() -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
            torch.manual_seed(0)
            model = acc.prepare(create_model(args.model, num_classes).to(dev))
            opt = torch.optim.Adam(accel.unwrap(model).parameters(), lr=1e-3)
            return model, opt, acc.grad_scaler()

        autocast = acc.autocast

        def ctx_for(seed: int, method: str) -> StepContext:
            from sattrain.config import TrainConfig

            # each method's own attack settings, as `sattrain run` resolves them (pgd 5 steps of
            # 2/255, fgsm-rs one step of 1.25 eps, free steps of eps, TRADES' beta)
            cfg = TrainConfig(store="bench", method=method, eps0=eps, eps=eps).resolved()
            return StepContext(epoch=args.epoch, p=p, eps0=eps, eps=eps, step_size=cfg.step_size, steps=cfg.steps,
                               beta=cfg.beta, multilabel=False,
                               generator=make_generator(dev, 10 + seed), coin=make_generator("cpu", 20 + seed))

        results: dict[str, dict[str, Any]] = {}
        for name in methods:
            method = get_method(name)
            model, opt, scaler = fresh()
            times, shares = [], []
            for r in range(args.repeats + 1):  # the first epoch warms up (allocator, cuDNN autotune)
                sync()
                t = time.perf_counter()
                stats = train_one_epoch(
                    model, on_dev, method, ctx_for(r, name), opt, scaler, batch_size=args.batch_size,
                    codec=codec if method.needs_map else None, map_name=MAP if method.needs_map else None,
                    augment=True, shuffle_gen=make_generator("cpu", 30 + r), aug_gen=make_generator(dev, 40 + r),
                    autocast=autocast, desc=name, progress=False, **epoch_kw)
                sync()
                if r:
                    times.append((time.perf_counter() - t) / stats["steps"])
                    shares.append(stats["attack_share"])
            results[name] = {"seconds_per_step": median(times), "seconds_per_step_mean": float(np.mean(times)),
                             "attack_share": round(float(np.mean(shares)), 3), "repeats": len(times)}
            print(f"{name}: {median(times) * 1e3:.1f} ms/step", file=sys.stderr, flush=True)

        # the SAT perturbation on the host (numpy, then copied) against on the device, same loop
        def own_loop(split: InMemorySplit, host_sat: bool, seed: int, model: Any, opt: Any, scaler: Any) -> float:
            rng = np.random.default_rng(seed)
            g = make_generator(split.storage, 50 + seed)
            gen = make_generator(dev, 60 + seed)
            steps = 0
            sync()
            t = time.perf_counter()
            for raw in split.batches(args.batch_size, make_generator("cpu", 30 + seed), MAP):
                batch = prepare_batch(raw, codec, multilabel=False, augment=True, generator=g)
                batch = batch._replace(x=acc.batch(batch.x))
                if host_sat:
                    xt = sat_numpy(batch.x.numpy(), batch.S.numpy(), eps=eps, p=p, rng=rng)
                    x_t = acc.batch(torch.from_numpy(xt).to(dev, non_blocking=True))
                    y = batch.y.to(dev, non_blocking=True)
                else:
                    x_t, y = sat_perturb(batch.x, batch.S, eps=eps, p=p, generator=gen), batch.y
                with autocast():
                    loss = F.cross_entropy(model(x_t).float(), y)
                opt.zero_grad(set_to_none=True)
                backward_step(loss, opt, scaler)
                steps += 1
            sync()
            return (time.perf_counter() - t) / steps

        for key, split, host_sat in (("sat_device", on_dev, False), ("sat_host_numpy", on_host, True)):
            model, opt, scaler = fresh()
            ts = [own_loop(split, host_sat, r, model, opt, scaler) for r in range(args.repeats + 1)][1:]
            results[key] = {"seconds_per_step": median(ts), "seconds_per_step_mean": float(np.mean(ts)),
                            "attack_share": 0.0, "repeats": len(ts), "loop": "bench/step.py own_loop"}
            print(f"{key}: {median(ts) * 1e3:.1f} ms/step", file=sys.stderr, flush=True)

        # the perturbation alone, per batch (no model): what the host baseline adds
        x0 = torch.rand(args.batch_size, 3, args.image_size, args.image_size, device=dev)
        S0 = torch.rand(args.batch_size, 1, args.image_size, args.image_size, device=dev) * 2 - 1
        gen = make_generator(dev, 1)
        rng = np.random.default_rng(1)
        xs, Ss = x0.cpu().numpy(), S0.cpu().numpy()

        def pert_dev() -> None:
            sat_perturb(x0, S0, eps=eps, p=p, generator=gen)

        def pert_host() -> None:
            torch.from_numpy(sat_numpy(xs, Ss, eps=eps, p=p, rng=rng)).to(dev)

        k = 20
        dev_t = timed(pert_dev, k, warmup=3, sync=sync)
        host_t = timed(pert_host, k, warmup=3, sync=sync)
        perturb_only = {"device_ms": round(median(dev_t) * 1e3, 3), "host_numpy_and_copy_ms": round(median(host_t) * 1e3, 3)}

        base = results["standard"]["seconds_per_step"] if "standard" in results else None
        for v in results.values():
            v["ms_per_step"] = round(v.pop("seconds_per_step") * 1e3, 3)
            v["ms_per_step_mean"] = round(v.pop("seconds_per_step_mean") * 1e3, 3)
            if base:
                v["vs_standard"] = round(v["ms_per_step"] / (base * 1e3), 3)
        goals: dict[str, Any] = {}
        if "sat" in results and base:
            r = results["sat"]["vs_standard"]
            goals["sat_vs_standard"] = {"goal": "<= 1.10", "value": r, "goal_met": r <= 1.10}
        if "fgsm-rs" in results and base:
            r = results["fgsm-rs"]["vs_standard"]
            goals["fgsm-rs_vs_standard"] = {"goal": "<= 2.1", "value": r, "goal_met": r <= 2.1}
        if all(m in results for m in ("standard", "pgd", "pgd+sat")):
            s, g_, m = (results[k]["ms_per_step_mean"] for k in ("standard", "pgd", "pgd+sat"))
            pos = (m - s) / (g_ - s) if g_ > s else float("nan")
            share = results["pgd+sat"]["attack_share"]
            goals["pgd+sat_position"] = {
                "goal": "about 0.5 of the way from standard (0) to pgd (1)", "value": round(pos, 3),
                "attack_share": share, "goal_met": abs(pos - 0.5) <= 0.15,
                "note": "mean over timed epochs; the coin's share of attacked batches is reported beside it",
            }
        if "sat_device" in results:
            goals["sat_device_vs_host_numpy"] = {
                "value": round(results["sat_host_numpy"]["ms_per_step"] / results["sat_device"]["ms_per_step"], 3),
                "note": "host-numpy step time / device step time (> 1: ours is faster)"}
        result = {
            "benchmark": "step",
            "model": args.model,
            "batch_size": args.batch_size,
            "image_size": args.image_size,
            "device": str(dev),
            "amp": amp,
            "accel": acc.describe(),
            "steps_per_epoch": args.steps,
            "repeats": args.repeats,
            "warmup_epochs": 1,
            "p_t": round(p, 4),
            "results": results,
            "perturbation_only": perturb_only,
            "goals": goals,
            "goal_met": all(g.get("goal_met", True) for g in goals.values()),
            "machine": machine(),
        }
        emit(result, args.json)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
