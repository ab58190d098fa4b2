"""Is the strong protocol strong enough? PGD budgets and AutoAttack on the same models.

For each run directory given, on the same split and samples, robust accuracy at each
--eps under:

- the paper protocol's PGD (5 steps of 2/255, one random start) and FGSM, the weak baselines;
- the strong protocol's PGD (``sattrain.evaluation.STRONG_STEPS`` steps of eps/4,
  ``STRONG_RESTARTS`` random starts);
- a 50-step, 3-start PGD of step eps/4 (the reference point of the issue's criterion);
- the same PGD with steps and starts doubled (and, with --quadruple, quadrupled): the
  protocol is strong enough when doubling no longer lowers accuracy (here: by more than
  ``--tolerance`` samples);
- AutoAttack (standard, the reference package), the headline of ``sattrain eval``, and
  satkit's torchattacks assembly when torchattacks is installed (the cross-check).

Prints one JSON object (``--json`` also writes it): per model and eps every number, the
seconds each took, and the verdicts ``doubling_changes_at_most_tolerance`` and
``headline_minus_pgd50x3`` (the issue's criterion: the default headline is no more than
0.03 above a 50-step, 3-restart PGD of step eps/4).

    python bench/attack_strength.py runs/digits-sat runs/digits-noise --store digits.zarr
    python bench/attack_strength.py runs/sat-r10 --store cifar10.zarr --samples 1000 --device cuda
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, machine  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="run directories (or checkpoints) to attack")
    ap.add_argument("--store", type=Path, required=True)
    ap.add_argument("--eps", default="4/255,8/255", help="radii, comma-separated")
    ap.add_argument("--samples", type=int, default=None, help="a seeded subset (default: the whole split)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tolerance", type=int, default=1, help="samples doubling may still change (noise of restarts)")
    ap.add_argument("--no-autoattack", action="store_true", help="skip AutoAttack (slow on a CPU)")
    ap.add_argument("--quadruple", action="store_true", help="also 4x the steps and starts (slow on a CPU)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from sattrain.cli_eval import parse_eps_list
    from sattrain.evaluation import STRONG_RESTARTS, STRONG_STEPS, PartialEvaluationWarning, evaluate

    eps = parse_eps_list(args.eps)
    budgets = {
        "paper pgd 5x2/255": dict(steps=5, step_size=2 / 255, restarts=1, protocol="paper"),
        f"strong pgd {STRONG_STEPS}xeps/4 R{STRONG_RESTARTS}": dict(steps=STRONG_STEPS, step_size="eps/4",
                                                                     restarts=STRONG_RESTARTS),
        "pgd 50xeps/4 R3": dict(steps=50, step_size="eps/4", restarts=3),
        f"doubled pgd {2 * STRONG_STEPS}xeps/4 R{2 * STRONG_RESTARTS}": dict(
            steps=2 * STRONG_STEPS, step_size="eps/4", restarts=2 * STRONG_RESTARTS),
    }
    if args.quadruple:
        budgets[f"quadrupled pgd {4 * STRONG_STEPS}xeps/4 R{4 * STRONG_RESTARTS}"] = dict(
            steps=4 * STRONG_STEPS, step_size="eps/4", restarts=4 * STRONG_RESTARTS)
    out: dict[str, Any] = {"benchmark": "attack_strength", "machine": machine(), "store": str(args.store),
                           "eps": args.eps, "models": {}}
    common = dict(samples=args.samples, device=args.device, write=False, seed=0)
    for run in args.runs:
        rec: dict[str, Any] = {"numbers": {}, "seconds": {}}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PartialEvaluationWarning)
            for name, kw in budgets.items():
                t = time.perf_counter()
                r = evaluate(run, args.store, eps=eps, attacks=("pgd",), **kw, **common)  # type: ignore[arg-type]
                rec["seconds"][name] = round(time.perf_counter() - t, 1)
                rec["numbers"][name] = {row["eps_label"]: row["value"] for row in r["pgd"]["results"]}
                rec["clean"], rec["samples"] = r["clean"], r["samples"]
                print(f"{run}: {name}: {rec['numbers'][name]} ({rec['seconds'][name]} s)", file=sys.stderr, flush=True)
            t = time.perf_counter()
            r = evaluate(run, args.store, eps=eps, attacks=("sanity",), **common)  # type: ignore[arg-type]
            rec["numbers"]["fgsm"] = {row["eps_label"]: row["value"] for row in r["sanity"]["fgsm"]}
            rec["sanity"] = {c["name"]: c["passed"] for c in r["sanity"]["checks"]}
            rec["seconds"]["fgsm+sanity"] = round(time.perf_counter() - t, 1)
            if not args.no_autoattack:
                engines = ["reference"]
                try:
                    import torchattacks  # noqa: F401

                    engines.append("torchattacks")
                except ImportError:
                    pass
                for engine in engines:
                    vals = {}
                    for e in eps:
                        t = time.perf_counter()
                        r = evaluate(run, args.store, attacks=("autoattack",), autoattack_eps=e,
                                     autoattack_engine=engine, **common)  # type: ignore[arg-type]
                        a = r["autoattack"]
                        vals[a["eps_label"]] = a["value"]
                        rec["seconds"][f"autoattack {engine} {a['eps_label']}"] = round(time.perf_counter() - t, 1)
                    rec["numbers"][f"autoattack ({engine})"] = vals
                    print(f"{run}: autoattack {engine}: {vals}", file=sys.stderr, flush=True)
        n = rec["samples"]
        strong = rec["numbers"][f"strong pgd {STRONG_STEPS}xeps/4 R{STRONG_RESTARTS}"]
        doubled = rec["numbers"][f"doubled pgd {2 * STRONG_STEPS}xeps/4 R{2 * STRONG_RESTARTS}"]
        rec["doubling_change_samples"] = {k: round((strong[k] - doubled[k]) * n) for k in strong}
        quad = rec["numbers"].get(f"quadrupled pgd {4 * STRONG_STEPS}xeps/4 R{4 * STRONG_RESTARTS}")
        if quad:
            rec["quadrupling_change_samples"] = {k: round((strong[k] - quad[k]) * n) for k in strong}
        rec["doubling_changes_at_most_tolerance"] = all(
            abs(v) <= args.tolerance for v in rec["doubling_change_samples"].values())
        pgd50x3 = rec["numbers"]["pgd 50xeps/4 R3"]
        head = rec["numbers"].get("autoattack (reference)") or strong
        rec["headline_minus_pgd50x3"] = {k: round(head[k] - pgd50x3[k], 4) for k in head if k in pgd50x3}
        out["models"][str(run)] = rec
    emit(out, args.json)


if __name__ == "__main__":
    main()
