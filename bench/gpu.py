"""GPU speed of the training step and the evaluation attacks, against what the card can do.

One script, three sections, one JSON file (rewritten after every measurement, so a run
cut short still leaves what it measured; ``"complete": true`` once all sections ran):

(a) headroom: the same model's training step (cross-entropy, backward, SGD with momentum
    0.9 and weight decay 5e-4) on batches already resident on the device, no data
    pipeline, in several ways: eager fp32 NCHW; eager fp16 autocast + GradScaler, NCHW
    (what ``sattrain run --amp`` did before issue 12); eager bf16 + channels_last;
    ``torch.compile`` (default mode) of the forward pass in bf16 + channels_last; and the
    whole step (forward, backward, optimizer) captured once in a CUDA graph and replayed,
    with each batch copied into the graph's static input. The best of them is the
    reference ("best_headroom"). Variants a device cannot run are listed with the reason.
(b) trainer: satkit's own step through the trainer's loop,
    ``sattrain.trainer.train_one_epoch`` (shuffled batches of an in-memory split on the
    device, crop + flip of image and map, S from the stored map, the method, backward,
    SGD), for standard, sat and pgd (k = the trainer's default attack steps), with the
    settings ``sattrain.accel.resolve`` picks for the device (or --precision,
    --channels-last, --compile). Goals: standard >= 0.9x the best headroom, sat >= 0.97x
    standard (images/s), pgd's step <= (k + 1)x standard's.
(c) eval: the evaluation attacks' throughput on an untrained model: a fixed-cost PGD
    (``sattrain.attacks.pgd``, 50 steps, no early exit) at several batch sizes, and
    ``sattrain.evaluation.evaluate`` itself (AutoAttack standard and the strong PGD at
    8/255, its default batch size for the device) on a store whose labels are the
    model's own predictions, so that every sample is attacked (clean accuracy 1). The
    attacks stop early on the samples they fool, so those figures depend on how many
    that is (1 - robust, recorded beside them); the fixed-cost PGD's do not.
    --quick leaves AutoAttack out (its Square attack alone is 5,000 queries per sample
    it cannot fool).

    python bench/gpu.py --device cuda                      # about 5-10 minutes on one H200
    python bench/gpu.py --device cuda --sections headroom  # one section
    python bench/gpu.py --device cpu --quick               # smoke test (small-cnn, tiny batches)

Writes bench/results/gpu_<device>.json (``--json`` to choose). Needs the project
importable (``pip install -e .`` or PYTHONPATH) and nothing from the network;
BENCHMARKS.md ("On a GPU") says how to install it on an offline GPU machine.
"""

from __future__ import annotations

import argparse
import inspect
import json
import shutil
import sys
import tempfile
import time
import traceback
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, cpu_model, machine, median  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

NUM_CLASSES = 10
MAP = "mask"


# --------------------------------------------------------------------------- results file


class Results:
    """The JSON document of one run, written atomically after every change."""

    def __init__(self, path: Path, header: dict[str, Any]) -> None:
        self.path = path
        self.doc: dict[str, Any] = {**header, "complete": False, "sections": {}, "goals": {}}
        self.save()

    def section(self, name: str) -> dict[str, Any]:
        return self.doc["sections"].setdefault(name, {})

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        from satdata.atomic import write_json_atomic

        write_json_atomic(self.path, self.doc, allow_nan=False)


def _error(e: BaseException) -> dict[str, Any]:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"error": f"{type(e).__name__}: {str(e)[:400]}", "where": traceback.format_exc(limit=3)[-800:]}


def _sync(dev: torch.device) -> Callable[[], None]:
    return (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)


def device_info(dev: torch.device) -> dict[str, Any]:
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        return {"name": torch.cuda.get_device_name(dev), "type": "cuda",
                "capability": list(torch.cuda.get_device_capability(dev)),
                "memory_gib": round(props.total_memory / 2**30, 1), "cuda": torch.version.cuda,
                "cudnn": torch.backends.cudnn.version()}
    return {"name": cpu_model(), "type": dev.type, "threads": torch.get_num_threads()}


# --------------------------------------------------------------------------- (a) headroom


def headroom_variants(dev: torch.device, quick: bool) -> dict[str, dict[str, Any]]:
    """name -> {"precision", "channels_last", "compile", "graph"} or {"skipped": reason}."""
    from sattrain.accel import cuda_bf16_native

    cuda = dev.type == "cuda"
    low = "fp16" if cuda and not cuda_bf16_native(dev) else "bf16"
    only_cuda = "CUDA only: on the CPU satkit trains in fp32 NCHW (sattrain.accel's CPU defaults)"
    v: dict[str, dict[str, Any]] = {
        "eager_fp32_nchw": {"precision": "fp32", "channels_last": False, "compile": False, "graph": False},
        "eager_fp16_nchw": ({"precision": "fp16", "channels_last": False, "compile": False, "graph": False} if cuda
                            else {"skipped": "float16 autocast with a GradScaler needs a CUDA device"}),
        f"eager_{low}_cl": ({"precision": low, "channels_last": True, "compile": False, "graph": False} if cuda
                            else {"skipped": only_cuda}),
        f"compile_{low}_cl": ({"precision": low, "channels_last": True, "compile": True, "graph": False} if cuda
                              else {"skipped": only_cuda + "; torch.compile's CPU build alone takes over 30 s"}),
    }
    if not cuda:
        v[f"cuda_graph_{low}_cl"] = {"skipped": "CUDA graphs need a CUDA device"}
    elif low == "fp16":
        v["cuda_graph_fp16_cl"] = {"skipped": "the GradScaler that fp16 needs reads its found-inf flag on the host "
                                              "each step, which a CUDA graph cannot capture"}
    else:
        v[f"cuda_graph_{low}_cl"] = {"precision": low, "channels_last": True, "compile": False, "graph": True}
    if quick:
        for name in list(v):
            if v[name].get("compile"):
                v[name] = {"skipped": "--quick: no compilation"}
    return v


def headroom_step(dev: torch.device, model_name: str, bs: int, size: int, spec: dict[str, Any], *, steps: int,
                  warmup: int, repeats: int) -> dict[str, Any]:
    """Images per second of one way of running the resident-batch training step."""
    from sattrain.accel import autocast_dtype, backward_step, make_grad_scaler, to_memory_format
    from sattrain.models import create_model

    sync = _sync(dev)
    t_setup = time.perf_counter()
    torch.manual_seed(0)
    cl, graph = spec["channels_last"], spec["graph"]
    model = create_model(model_name, NUM_CLASSES).to(dev).train()
    if cl:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    scaler = make_grad_scaler(spec["precision"], dev)
    dtype = autocast_dtype(spec["precision"])
    g = torch.Generator(device=dev).manual_seed(0)
    xs = [to_memory_format(torch.rand(bs, 3, size, size, device=dev, generator=g), cl) for _ in range(2)]
    ys = [torch.randint(0, NUM_CLASSES, (bs,), device=dev, generator=g) for _ in range(2)]

    def ctx() -> Any:
        # autocast's weight cache must be off inside a CUDA graph capture (PyTorch's advice)
        return torch.autocast(dev.type, dtype=dtype, cache_enabled=not graph) if dtype is not None else nullcontext()

    def fwd(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with ctx():
            return F.cross_entropy(model(x), y)

    f = torch.compile(fwd) if spec["compile"] else fwd

    def eager_step(i: int) -> None:
        loss = f(xs[i % 2], ys[i % 2])
        opt.zero_grad(set_to_none=True)
        backward_step(loss, opt, scaler)

    step = eager_step
    if graph:
        static_x, static_y = xs[0].clone(), ys[0].clone()
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):  # warm up (optimizer state, cuDNN choices) off the capture
            for _ in range(3):
                opt.zero_grad(set_to_none=True)
                fwd(static_x, static_y).backward()
                opt.step()
        torch.cuda.current_stream(dev).wait_stream(side)
        cg = torch.cuda.CUDAGraph()
        opt.zero_grad(set_to_none=True)  # grads allocated inside the capture: each replay writes them afresh
        with torch.cuda.graph(cg):
            static_loss = fwd(static_x, static_y)
            static_loss.backward()
            opt.step()

        def graph_step(i: int) -> None:
            static_x.copy_(xs[i % 2])
            static_y.copy_(ys[i % 2])
            cg.replay()

        step = graph_step
    for i in range(warmup):
        step(i)
    sync()
    setup = time.perf_counter() - t_setup
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        for i in range(steps):
            step(i)
        sync()
        rates.append(steps * bs / (time.perf_counter() - t))
    return {"img_per_s": round(median(rates), 1), "img_per_s_all": [round(r, 1) for r in rates],
            "ms_per_step": round(bs / median(rates) * 1e3, 3), "setup_s": round(setup, 2), **spec}


def run_headroom(res: Results, dev: torch.device, args: argparse.Namespace) -> None:
    sec = res.section("headroom")
    sec["what"] = ("training step on resident batches: cross-entropy, backward, SGD(momentum 0.9, wd 5e-4); "
                   f"{args.model}, {args.image_size}x{args.image_size}, {NUM_CLASSES} classes")
    variants = headroom_variants(dev, args.quick)
    for bs in args.batch_sizes:
        rows = sec.setdefault(f"b{bs}", {})
        for name, spec in variants.items():
            if "skipped" in spec:
                rows[name] = dict(spec)
            else:
                try:
                    rows[name] = headroom_step(dev, args.model, bs, args.image_size, spec, steps=args.steps,
                                               warmup=args.warmup, repeats=args.repeats)
                except Exception as e:  # noqa: BLE001 - one variant failing must not lose the others
                    rows[name] = _error(e)
            print(f"headroom b{bs} {name}: {rows[name].get('img_per_s', rows[name].get('skipped') or rows[name].get('error'))}",
                  file=sys.stderr, flush=True)
            best = max(((k, v["img_per_s"]) for k, v in rows.items() if k != "best" and "img_per_s" in v),
                       key=lambda kv: kv[1], default=None)
            if best:
                rows["best"] = {"variant": best[0], "img_per_s": best[1]}
            res.save()


# --------------------------------------------------------------------------- (b) trainer


def run_trainer(res: Results, dev: torch.device, args: argparse.Namespace, work: Path) -> None:
    from _common import synthetic_store

    from satdata.store import open_store
    from sattrain import accel
    from sattrain.data import InMemorySplit, load_split, make_generator, map_codec
    from sattrain.methods import StepContext, get_method
    from sattrain.models import create_model
    from sattrain.perturb import curriculum_p
    from sattrain.trainer import train_one_epoch

    try:
        from sattrain.config import DEFAULT_STEPS
    except ImportError:  # an older config: the trainer's documented default
        DEFAULT_STEPS = 5
    try:
        from sattrain.config import DEFAULT_BETA
    except ImportError:
        DEFAULT_BETA = {}

    sec = res.section("trainer")
    acc = accel.resolve(dev, precision=args.precision, channels_last=args.channels_last, compile=args.compile)
    k = DEFAULT_STEPS
    epoch = 50
    sec.update({"what": "sattrain.trainer.train_one_epoch per method: images/s of an epoch of --steps full batches "
                        "(median of --repeats epochs after one warm-up epoch)",
                "accel": acc.describe(), "pgd_steps": k, "optimizer": "SGD(lr 0.01, momentum 0.9, wd 5e-4)",
                "augment": "crop+flip", "p_t": round(curriculum_p(epoch, 0.6), 4)})
    # the trainer's own channels_last for the batches, where train_one_epoch has it (else the model alone is)
    epoch_kw: dict[str, Any] = ({"channels_last": acc.channels_last}
                                if "channels_last" in inspect.signature(train_one_epoch).parameters else {})
    n_max = args.steps * max(args.batch_sizes)
    st = open_store(synthetic_store(work / f"store-{args.image_size}", n_max, args.image_size, map_name=MAP))
    codec = map_codec(st, MAP)
    sync = _sync(dev)
    for bs in args.batch_sizes:
        rows = sec.setdefault(f"b{bs}", {})
        n = args.steps * bs
        split = InMemorySplit(load_split(st, "train", (MAP,), np.arange(n), progress=False), dev, "device")
        for name in args.methods:
            try:
                method = get_method(name)
                torch.manual_seed(0)
                model = acc.prepare(create_model(args.model, NUM_CLASSES).to(dev))
                opt = torch.optim.SGD(accel.unwrap(model).parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
                scaler = acc.grad_scaler()
                t_setup = time.perf_counter()
                rates, shares = [], []
                for r in range(args.repeats + 1):  # the first epoch warms up (allocator, cuDNN, compilation)
                    ctx = StepContext(epoch=epoch, p=curriculum_p(epoch, 0.6), eps0=8 / 255, eps=8 / 255,
                                      step_size=2 / 255, steps=k, beta=DEFAULT_BETA.get(name), multilabel=False,
                                      generator=make_generator(dev, 10 + r), coin=make_generator("cpu", 20 + r),
                                      attack_bn="train")
                    sync()
                    t = time.perf_counter()
                    stats = train_one_epoch(
                        model, split, method, ctx, opt, scaler, batch_size=bs,
                        codec=codec if method.needs_map else None, map_name=MAP if method.needs_map else None,
                        augment="crop+flip", shuffle_gen=make_generator("cpu", 30 + r),
                        aug_gen=make_generator(dev, 40 + r), autocast=acc.autocast, desc=name, progress=False,
                        **epoch_kw)
                    sync()
                    if r == 0:
                        setup = time.perf_counter() - t_setup
                    else:
                        rates.append(stats["samples"] / (time.perf_counter() - t))
                        shares.append(stats["attack_share"])
                rows[name] = {"img_per_s": round(median(rates), 1), "img_per_s_all": [round(x, 1) for x in rates],
                              "ms_per_step": round(bs / median(rates) * 1e3, 3), "steps_per_epoch": stats["steps"],
                              "attack_share": round(float(np.mean(shares)), 3), "warmup_epoch_s": round(setup, 2)}
            except Exception as e:  # noqa: BLE001
                rows[name] = _error(e)
            print(f"trainer b{bs} {name}: {rows[name].get('img_per_s', rows[name].get('error'))}",
                  file=sys.stderr, flush=True)
            res.save()


def compute_goals(res: Results, batch_sizes: list[int]) -> None:
    """Ratios of section (b) to (a) and within (b), with the issue's goals."""
    head = res.doc["sections"].get("headroom", {})
    trainer = res.doc["sections"].get("trainer", {})
    k = trainer.get("pgd_steps", 5)
    goals: dict[str, Any] = {}
    for bs in batch_sizes:
        h, t = head.get(f"b{bs}", {}), trainer.get(f"b{bs}", {})
        std = t.get("standard", {}).get("img_per_s")
        best = h.get("best")
        if std and best:
            v = std / best["img_per_s"]
            goals[f"standard_vs_best_headroom_b{bs}"] = {"goal": ">= 0.9", "value": round(v, 3), "goal_met": v >= 0.9,
                                                         "best_variant": best["variant"]}
        sat = t.get("sat", {}).get("img_per_s")
        if std and sat:
            v = sat / std
            goals[f"sat_vs_standard_b{bs}"] = {"goal": ">= 0.97 (images/s)", "value": round(v, 3), "goal_met": v >= 0.97}
        pgd = t.get("pgd", {}).get("img_per_s")
        if std and pgd:
            v = std / pgd  # step time ratio
            goals[f"pgd_cost_b{bs}"] = {"goal": f"<= {k + 1} (k + 1, k = {k}) x standard's step time",
                                        "value": round(v, 3), "goal_met": v <= k + 1}
    res.doc["goals"] = goals
    res.doc["goal_met"] = bool(goals) and all(g["goal_met"] for g in goals.values())
    res.save()


# --------------------------------------------------------------------------- (c) eval


def _labelled_store(path: Path, model: torch.nn.Module, dev: torch.device, n: int, size: int) -> None:
    """A store of n random images whose labels are ``model``'s predictions (a 'test' split)."""
    from satdata.store import ArrayWriter

    if path.exists():
        shutil.rmtree(path)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
    with torch.no_grad():
        x = torch.from_numpy(images).to(dev).permute(0, 3, 1, 2).float().div_(255)
        labels = torch.cat([model(x[a:a + 256]).argmax(1) for a in range(0, n, 256)]).cpu().numpy().astype(np.int64)
    w = ArrayWriter(path, dataset="gpu-bench", classes=[str(i) for i in range(NUM_CLASSES)], image_size=(size, size),
                    label_kind="single", maps={})
    w.create_split("test", n)
    step = w.split_chunk["test"]
    for a in range(0, n, step):
        b = min(n, a + step)
        w.write("test", a, images[a:b], labels[a:b], [f"t{i}" for i in range(a, b)], {})
    w.close_split("test", n)
    w.finish({"source": "bench/gpu.py: random images labelled by an untrained model"})


def run_eval(res: Results, dev: torch.device, args: argparse.Namespace, work: Path) -> None:
    from satdata.store import open_store
    from sattrain.attacks import pgd
    from sattrain.checkpoint import save_checkpoint
    from sattrain.evaluation import STRONG_STEPS, default_batch_size, evaluate
    from sattrain.models import create_model

    sec = res.section("eval")
    sync = _sync(dev)
    torch.manual_seed(0)
    model = create_model(args.model, NUM_CLASSES).to(dev).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    steps = 5 if args.quick else STRONG_STEPS
    default_bs = default_batch_size(dev)
    sec["default_batch_size"] = default_bs
    # (c1) fixed-cost PGD: every sample takes every step, so samples/s measures how well a batch fills the device
    fixed = sec.setdefault("pgd_fixed", {"what": f"sattrain.attacks.pgd, {steps} steps of 2/255 at 8/255, random "
                                                 "start, float32 (as sattrain eval), no early exit", "rows": {}})
    sizes = sorted({*args.eval_batch_sizes, default_bs}) if not args.quick else list(args.eval_batch_sizes)
    layouts = [False, True] if dev.type == "cuda" else [False]
    g = torch.Generator(device=dev).manual_seed(0)
    for bs in sizes:
        for cl in layouts:
            key = f"b{bs}{'_cl' if cl else ''}"
            try:
                m = model.to(memory_format=torch.channels_last if cl else torch.contiguous_format)
                x = torch.rand(bs, 3, args.image_size, args.image_size, device=dev, generator=g)
                x = x.contiguous(memory_format=torch.channels_last) if cl else x
                y = torch.randint(0, NUM_CLASSES, (bs,), device=dev, generator=g)
                pgd(m, x, y, eps=8 / 255, step_size=2 / 255, steps=1, generator=g)  # warm-up
                sync()
                ts = []
                for _ in range(args.repeats):
                    t = time.perf_counter()
                    pgd(m, x, y, eps=8 / 255, step_size=2 / 255, steps=steps, generator=g)
                    sync()
                    ts.append(time.perf_counter() - t)
                fixed["rows"][key] = {"batch_size": bs, "channels_last": cl, "samples_per_s": round(bs / median(ts), 1),
                                      "sample_steps_per_s": round(bs * steps / median(ts), 1)}
            except Exception as e:  # noqa: BLE001
                fixed["rows"][key] = _error(e)
            print(f"eval pgd_fixed {key}: {fixed['rows'][key].get('samples_per_s', fixed['rows'][key].get('error'))}",
                  file=sys.stderr, flush=True)
            res.save()
    model.to(memory_format=torch.contiguous_format)
    # (c2) sattrain.evaluation end to end, its default batch size for the device
    try:
        run = work / "eval-run"
        run.mkdir(parents=True, exist_ok=True)
        store = work / "eval-store.zarr"
        _labelled_store(store, model, dev, args.eval_samples, args.image_size)
        st = open_store(store)
        save_checkpoint(run / "checkpoint.pt", {
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "optimizer": None, "epoch": 0,
            "config": {"model": args.model, "method": "standard"},
            "model_spec": {"name": args.model, "num_classes": NUM_CLASSES, "label_kind": "single",
                           "image_size": [args.image_size, args.image_size], "classes": list(st.info.classes)},
            "rng": {}, "extra": {}})
        attacks = ("pgd",) if args.no_autoattack or args.quick else ("autoattack", "pgd")
        if "autoattack" not in attacks:
            sec["autoattack_skipped"] = "--quick" if args.quick else "--no-autoattack"
        kw: dict[str, Any] = {"steps": 5} if args.quick else {}
        r = evaluate(run, st, attacks=attacks, eps=(8 / 255,), device=str(dev), write=False, **kw)
        sec["evaluate"] = {"what": "sattrain.evaluation.evaluate, strong protocol at 8/255 (labels = the untrained "
                                   "model's predictions, so clean is 1; attacks stop early on the samples they fool, "
                                   "so the figures depend on how many that is: 1 - robust)",
                           "samples": r["samples"], "batch_size": r["config"]["batch_size"], "clean": r["clean"],
                           "robust": r["robust"], "seconds": r["seconds"], "samples_per_s": r["samples_per_s"],
                           "pgd_steps": r["config"]["steps"], "pgd_restarts": r["config"]["restarts"]}
    except Exception as e:  # noqa: BLE001
        sec["evaluate"] = _error(e)
    print(f"eval evaluate: {sec['evaluate'].get('samples_per_s', sec['evaluate'].get('error'))}", file=sys.stderr,
          flush=True)
    res.save()


# --------------------------------------------------------------------------- main


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="smoke test: small-cnn, 16x16, batch 16, 2 steps")
    ap.add_argument("--sections", default="headroom,trainer,eval")
    ap.add_argument("--model", default=None, help="default resnet18 (--quick: small-cnn)")
    ap.add_argument("--batch-sizes", type=_ints, default=None, help="training batch sizes (default 128,512)")
    ap.add_argument("--image-size", type=int, default=None, help="default 32 (--quick: 16)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per repeat; trainer: steps per epoch (default 30)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed headroom steps (default 10)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats, median (default 3)")
    ap.add_argument("--methods", default="standard,sat,pgd")
    ap.add_argument("--precision", default="auto", help="trainer section: as sattrain run --precision")
    ap.add_argument("--channels-last", default="auto", help="trainer section: auto|on|off")
    ap.add_argument("--compile", default="none", help="trainer section: none|default|reduce-overhead|max-autotune")
    ap.add_argument("--eval-batch-sizes", type=_ints, default=None, help="fixed-cost PGD batch sizes (default 256,1024,4096)")
    ap.add_argument("--eval-samples", type=int, default=None, help="samples for evaluate() (default 1024)")
    ap.add_argument("--no-autoattack", action="store_true")
    ap.add_argument("--work", type=Path, default=None, help="cache the generated stores here")
    ap.add_argument("--json", type=Path, default=None, help="default bench/results/gpu_<device>.json")
    args = ap.parse_args()

    q = args.quick
    args.model = args.model or ("small-cnn" if q else "resnet18")
    args.batch_sizes = args.batch_sizes or ([16] if q else [128, 512])
    args.image_size = args.image_size or (16 if q else 32)
    args.steps = args.steps or (2 if q else 30)
    args.warmup = args.warmup if args.warmup is not None else (1 if q else 10)
    args.repeats = args.repeats or (1 if q else 3)
    args.eval_batch_sizes = args.eval_batch_sizes or ([16] if q else [256, 1024, 4096])
    args.eval_samples = args.eval_samples or (16 if q else 1024)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in sections if s not in ("headroom", "trainer", "eval")]
    if unknown:
        raise SystemExit(f"bench/gpu.py: --sections: unknown section {unknown[0]!r} (known: headroom, trainer, eval)")

    from satdata.errors import SatkitError
    from sattrain.device import resolve_device
    from sattrain.methods import get_method

    try:
        dev = resolve_device(args.device)
        for m in args.methods:
            get_method(m)
    except SatkitError as e:
        raise SystemExit(f"bench/gpu.py: {e}") from None
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True  # every variant and the trainer alike (sattrain.accel does the same)
    tag = dev.type + ("_quick" if q else "")
    path = args.json or RESULTS / f"gpu_{tag}.json"
    res = Results(path, {
        "benchmark": "gpu",
        "command": "python bench/gpu.py " + " ".join(sys.argv[1:]),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device_info(dev),
        "torch": torch.__version__,
        "model": args.model, "image_size": args.image_size, "batch_sizes": args.batch_sizes,
        "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats, "quick": q,
        "machine": machine(),
    })
    work = args.work or Path(tempfile.mkdtemp(prefix="satkit-bench-gpu-"))
    try:
        runners = {"headroom": lambda: run_headroom(res, dev, args), "trainer": lambda: run_trainer(res, dev, args, work),
                   "eval": lambda: run_eval(res, dev, args, work)}
        for s in sections:
            t = time.perf_counter()
            try:
                runners[s]()
            except Exception as e:  # noqa: BLE001 - a section that fails leaves the others
                res.section(s)["error"] = _error(e)
            res.section(s)["seconds"] = round(time.perf_counter() - t, 1)
            compute_goals(res, args.batch_sizes)
        res.doc["complete"] = True
        res.doc["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        res.save()
        print(json.dumps(res.doc, indent=2))
        print(f"bench/gpu.py: wrote {path}", file=sys.stderr)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
