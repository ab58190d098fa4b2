"""The cost frontier: robust accuracy against training cost, every training method (issue 14).

Every method ``sattrain.methods.method_names()`` lists among standard, noise, sat,
fgsm-rs, fgsm-rs+sat, free, pgd, trades, pgd+sat and trades+sat (``--methods`` to choose)
is trained on the same store, with the same model, the same recipe and the same budget
(--epochs: every method trains the same number of images; ``free`` replays each
minibatch --replays times over epochs / replays passes, so its gradient steps match),
for each seed, through ``sattrain.trainer.train`` (what ``sattrain run`` calls), then
evaluated with the strong protocol of ``sattrain eval`` (``sattrain.evaluation.evaluate``:
AutoAttack at 8/255, the PGD sweep of 50 steps of eps/4 with 2 random starts, the
gradient-masking sanity checks) into each run's eval.json. The table and the plot are
``sattrain report``'s frontier (``sattrain.report.cost_frontier``): robust accuracy
against forward-backward passes per example (``Method.passes`` with the run's attack
share) and against measured training images/s, clean accuracy beside, mean ± std over
seeds. ``sattrain report RUN_DIRS --frontier`` draws the same from the run directories.

Defaults (CPU): scikit-learn's digits at 16x16 (``satdata build --source digits``, as
bench/evidence.py), small-cnn, 8 epochs of budget, batch 32, recipe paper (Adam 1e-3),
no augmentation, seeds 0,1,2, SAT-family methods on the ink mask with the paper's
100-epoch curriculum compressed into --epochs (bench/evidence.py's alpha_c), AutoAttack and
the PGD sweep on a seeded subset of --eval-samples test images (AutoAttack takes about 40 s
plus 2 s per robust image per run on a CPU core: the subset is what fits about 25 minutes on
2 idle cores; BENCHMARKS.md section 2f took 34 on 2 shared ones); two
runs at a time, one torch thread each. On a GPU: ``--device cuda --model resnet10`` (or
preact-resnet18, resnet18, wrn-28-10; ``--store`` for another store, e.g. CIFAR-10 with a
map from ``satdata saliency``).

    python bench/frontier.py                           # the full CPU table (19 min on 2 idle cores)
    python bench/frontier.py --quick                   # smoke test (seconds per method)
    python bench/frontier.py --device cuda --model resnet10 --size 32 --epochs 16 --eval-samples 1000 --workers 1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, emit, machine  # noqa: E402
from evidence import (DEFAULT_ALPHA, PAPER_EPOCHS, cli, eps_label, eval_current, run_all, sh, shown,  # noqa: E402
                      train_once, work_dir)

# The methods, in the order of the table; those this sattrain lacks are left out.
METHODS = ("standard", "noise", "sat", "fgsm-rs", "fgsm-rs+sat", "free", "pgd", "trades", "pgd+sat", "trades+sat")
AUTOATTACK_EPS = 8 / 255


def available_methods() -> list[str]:
    from sattrain.methods import method_names

    known = set(method_names())
    return [m for m in METHODS if m in known]


@dataclass
class Job:
    method: str
    seed: int
    store: str
    out: str
    maps: tuple[str, ...]
    alpha: float
    epochs: int
    replays: int | None
    batch_size: int
    model: str
    recipe: str
    augment: str
    device: str
    threads: int
    train_samples: int | None
    eval_samples: int | None
    eps: tuple[float, ...]
    autoattack_eps: float = AUTOATTACK_EPS


def train_config(job: Job) -> Any:
    from sattrain.config import TrainConfig

    return TrainConfig(store=job.store, out=job.out, method=job.method, maps=job.maps, model=job.model,
                       epochs=job.epochs, batch_size=job.batch_size, recipe=job.recipe, alpha=job.alpha,
                       replays=job.replays, augment=job.augment, device=job.device, seed=job.seed,
                       train_samples=job.train_samples, eval_samples=64, summary_samples=0, threads=job.threads,
                       progress=False)


def run_job(job: Job) -> dict[str, Any]:
    """Train one method and seed with sattrain.trainer.train, evaluate it with sattrain.evaluation (strong)."""
    import torch

    torch.set_num_threads(job.threads)
    from sattrain.evaluation import evaluate
    from sattrain.rundir import EVAL_JSON

    out = Path(job.out)
    t = time.perf_counter()
    trained = train_once(out, lambda: train_config(job))
    t_train = time.perf_counter() - t
    done = out / EVAL_JSON
    t = time.perf_counter()
    if not eval_current(done, trained, job.eps, job.eval_samples, autoattack_eps=job.autoattack_eps) or \
            "autoattack" not in json.loads(done.read_text()).get("config", {}).get("attacks", []):
        evaluate(out, job.store, eps=job.eps, attacks=("autoattack", "pgd", "sanity"), samples=job.eval_samples,
                 autoattack_eps=job.autoattack_eps, device=job.device, out=done)
    return {"method": job.method, "seed": job.seed, "run_dir": str(out), "reused": trained,
            "seconds_train": round(t_train, 1), "seconds_eval": round(time.perf_counter() - t, 1),
            "eval": json.loads(done.read_text())["robust"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=None,
                    help="comma-separated (default: every one of " + ", ".join(METHODS) + " that sattrain has)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=8,
                    help="budget of every method (free: epochs / replays passes of --replays replays)")
    ap.add_argument("--replays", type=int, default=8, help="Free-AT's minibatch replays m (Shafahi et al.: 8 at 8/255)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--model", default="small-cnn")
    ap.add_argument("--recipe", default="paper", help="one recipe for every method (sattrain run --recipe)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", type=int, default=16, help="image size of the digits store built here")
    ap.add_argument("--store", default=None, help="train on this store instead of building the digits")
    ap.add_argument("--map", default="ink", help="the SAT-family methods' map (digits: ink or box)")
    ap.add_argument("--augment", default="none", help="sattrain run --augment (default none: digits are 16 px)")
    ap.add_argument("--alpha", type=float, default=None,
                    help=f"SAT curriculum alpha (default: {DEFAULT_ALPHA}^({PAPER_EPOCHS}/epochs), bench/evidence.py's)")
    ap.add_argument("--eps", default="1/255,2/255,4/255,8/255", help="the PGD sweep's radii")
    ap.add_argument("--autoattack-eps", default="8/255", help="AutoAttack's radius (the frontier's headline)")
    ap.add_argument("--eval-samples", type=int, default=24,
                    help="seeded test subset for AutoAttack and the PGD sweep (0: the whole split)")
    ap.add_argument("--train-samples", type=int, default=None, help="train on a subset (smoke tests)")
    ap.add_argument("--workers", type=int, default=None, help="runs at a time (default: 2 on a CPU, 1 on a GPU)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    ap.add_argument("--quick", action="store_true",
                    help="smoke test of the pipeline, not numbers: 2 epochs (free: 2 replays), batch 8, 256 training "
                         "images, seed 0, 8 test images, PGD at 8/255 and 32/255 and AutoAttack at 32/255 (which breaks "
                         "such models in a second; at 8/255 AutoAttack takes ~20 s per model with a robust image on "
                         "a CPU core)")
    ap.add_argument("--work", type=Path, default=None, help="store and run dirs (kept; finished runs are reused)")
    ap.add_argument("--json", type=Path, default=RESULTS / "frontier.json")
    ap.add_argument("--markdown", type=Path, default=RESULTS / "frontier.md")
    ap.add_argument("--plot", type=Path, default=RESULTS / "frontier.png")
    args = ap.parse_args()
    if args.quick:
        args.epochs, args.replays, args.seeds, args.batch_size = 2, 2, "0", 8
        args.train_samples = args.train_samples or 256
        args.eval_samples = 8
        args.eps, args.autoattack_eps = "8/255,32/255", "32/255"

    from sattrain.config import parse_eps
    from sattrain.methods import get_method
    from sattrain.report import cost_frontier, load_run

    eps = tuple(parse_eps(e.strip()) for e in args.eps.split(",") if e.strip())
    aa_eps = parse_eps(args.autoattack_eps, "--autoattack-eps")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    have = available_methods()
    methods = have if args.methods is None else [m.strip() for m in args.methods.split(",") if m.strip()]
    from satdata.errors import SatkitError

    for m in methods:
        try:
            get_method(m)
        except SatkitError as e:
            raise SystemExit(f"bench/frontier.py: {str(e).replace('--method', '--methods', 1)}") from None
    missing = [m for m in METHODS if m not in have]
    if "free" in methods and args.epochs % args.replays:
        raise SystemExit(f"--epochs {args.epochs} is not a multiple of --replays {args.replays}: free would train "
                         f"{-(-args.epochs // args.replays) * args.replays} epochs of budget, not {args.epochs}")
    alpha_c = args.alpha if args.alpha is not None else DEFAULT_ALPHA ** (PAPER_EPOCHS / args.epochs)
    workers = args.workers or (1 if args.device.startswith("cuda") else min(2, os.cpu_count() or 1))
    eval_samples = args.eval_samples or None
    work, tmp = work_dir(args.work, "frontier")
    t_all = time.perf_counter()
    commands: list[str] = []
    try:
        if args.store:
            store = args.store
            dataset = args.store
        else:
            path = work / f"digits{args.size}.zarr"
            cmd = [cli("satdata"), "build", "--source", "digits", "--size", str(args.size), "--out", str(path), "-q"]
            commands.append(shown(cmd))
            if not path.exists():
                sh(cmd, work / "commands.log")
            store, dataset = str(path), f"digits (scikit-learn), {args.size}x{args.size}"
        jobs = []
        for m in methods:
            spec = get_method(m)
            for s in seeds:
                jobs.append(Job(method=m, seed=s, store=store, out=str(work / "runs" / f"{m}-s{s}"),
                                maps=(args.map,) if spec.needs_map else (), alpha=alpha_c if spec.needs_map else DEFAULT_ALPHA,
                                epochs=args.epochs, replays=args.replays if m == "free" else None,
                                batch_size=args.batch_size, model=args.model, recipe=args.recipe, augment=args.augment,
                                device=args.device, threads=args.threads, train_samples=args.train_samples,
                                eval_samples=eval_samples, eps=eps, autoattack_eps=aa_eps))
        plan = (f"plan: {len(methods)} methods x {len(seeds)} seed(s) = {len(jobs)} runs on {dataset}, {args.model}, "
                f"{args.device}, {args.epochs} epochs of budget each (free: {args.epochs // args.replays} pass(es) x "
                f"{args.replays} replays), batch {args.batch_size}, recipe {args.recipe}, SAT alpha {alpha_c:.3g}; "
                f"strong evaluation (AutoAttack {eps_label(aa_eps)}, PGD {', '.join(eps_label(e) for e in eps)}, "
                f"sanity) on {eval_samples or 'all'} test images; {workers} run(s) at a time, {args.threads} "
                f"thread(s) each")
        print(plan, file=sys.stderr, flush=True)
        if missing:
            print(f"not in this sattrain (left out): {', '.join(missing)}", file=sys.stderr, flush=True)
        # the costliest first, so the workers finish together
        jobs.sort(key=lambda j: -get_method(j.method).passes(5, 0.5))
        t = time.perf_counter()
        results = run_all(run_job, jobs, workers, lambda j, r: (
            f"{j.method} seed {j.seed}: train {r['seconds_train']:.0f} s, eval {r['seconds_eval']:.0f} s; "
            + ", ".join(f"{k} {v:.3f}" for k, v in r["eval"].items())))
        seconds_runs = time.perf_counter() - t

        runs = [load_run(Path(j.out), Path(j.out).name) for j in sorted(jobs, key=lambda j: (methods.index(j.method), j.seed))]
        fr = cost_frontier(runs)
        title = (f"{dataset}, {args.model}, {args.epochs} epochs of budget, {len(seeds)} seed(s); "
                 f"AutoAttack on {fr.source}")
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        fr.plot(args.plot, title=title)
        job0 = jobs[0]
        example = train_config(job0)
        settings = {
            "dataset": dataset, "model": args.model, "device": args.device, "epochs": args.epochs,
            "replays_free": args.replays, "batch_size": args.batch_size, "recipe": args.recipe, "augment": args.augment,
            "map": args.map, "alpha_sat": alpha_c, "seeds": seeds, "methods": methods, "methods_missing": missing,
            "eval_samples": eval_samples, "train_samples": args.train_samples, "eps": [eps_label(e) for e in eps],
            "autoattack_eps": eps_label(aa_eps), "quick": args.quick, "workers": workers, "threads_per_run": args.threads,
        }
        result = {
            "benchmark": "frontier",
            "settings": settings,
            "machine": machine(),
            "plan": plan,
            "frontier": fr.to_json(),
            "excluded": fr.excluded,
            "runs": sorted(results, key=lambda r: (methods.index(r["method"]), r["seed"])),
            "commands": commands + [
                "(per method and seed) sattrain.trainer.train(TrainConfig(" + ", ".join(
                    f"{k}={v!r}" for k, v in asdict(job0).items() if k in (
                        "model", "epochs", "batch_size", "recipe", "augment", "device", "train_samples", "threads"))
                + ", method=..., seed=..., maps=(map,) for the SAT family, alpha=alpha_sat for the SAT family, "
                "replays=replays_free for free, eval_samples=64, summary_samples=0))  # = sattrain run "
                + " ".join(str(x) for x in ("--epochs", example.epochs, "--batch-size", example.batch_size,
                                            "--model", example.model, "--recipe", example.recipe)),
                "(per run) sattrain.evaluation.evaluate(run, store, eps=" + repr([eps_label(e) for e in eps])
                + f", attacks=('autoattack', 'pgd', 'sanity'), autoattack_eps={eps_label(aa_eps)}, samples={eval_samples}, "
                f"device={args.device!r})"
                "  # = sattrain eval RUN --store STORE --attacks autoattack,pgd,sanity"
                + (f" --samples {eval_samples}" if eval_samples else ""),
                "sattrain report " + " ".join(f"runs/{j.method}-s{j.seed}" for j in jobs[:2]) + " ... --frontier",
            ],
            "seconds": {"runs": round(seconds_runs, 1), "total": round(time.perf_counter() - t_all, 1)},
        }
        head = ["# The cost frontier (`bench/frontier.py`)", "",
                f"{dataset}; {args.model}; {args.epochs} epochs of budget for every method (free: "
                f"{args.epochs // args.replays} pass(es) over the data x {args.replays} replays of each minibatch, the "
                f"same images trained); batch {args.batch_size}; recipe {args.recipe}; augment {args.augment}; "
                f"SAT-family on `{args.map}` with alpha {alpha_c:.3g}; seeds {', '.join(map(str, seeds))}; "
                f"{args.device}, {workers} run(s) at a time, {args.threads} thread(s) each."
                + (f" Not in this sattrain: {', '.join(missing)}." if missing else ""), ""]
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        plot_ref = os.path.relpath(args.plot, args.markdown.parent)
        args.markdown.write_text("\n".join(head + fr.markdown(plot_ref)))
        emit(result, args.json)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
