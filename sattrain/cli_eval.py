"""`sattrain eval` and `sattrain report`: thin click commands over evaluate() and write_report().

``sattrain/cli.py`` adds them to the ``sattrain`` group::

    main.add_command(eval_cmd, "eval")
    main.add_command(report_cmd, "report")
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import click

from satdata.clikit import echo_json, json_option, run_cli, storage_option
from satdata.errors import SatkitError

EPILOG_EVAL = """\b
Examples:
  sattrain eval runs/sat-r10 --store cifar10.zarr                       # strong protocol (default)
  sattrain eval runs/sat-r10 --store cifar10.zarr --protocol paper      # the SAT authors' protocol
  sattrain eval runs/sat-r10/best.pt --store cifar10.zarr --samples 1000 --device cuda
  sattrain eval runs/sat-r10 --store cifar10.zarr --attacks pgd --eps 8/255 --steps 200 --restarts 10

\b
Protocols (--protocol):
  strong  AutoAttack (standard, Linf 8/255: APGD-CE, APGD-T, FAB-T, Square; the authors'
          package); PGD at 1,2,4,8/255 with 50 steps of eps/4 and 2 random starts; the
          headline autoattack+pgd@8/255 counts a sample robust only if neither AutoAttack
          nor PGD at 8/255 fools it; the SAT authors' distortions; sanity checks. Doubling PGD's steps and
          starts moves its numbers by at most 2 of 355 samples on the README's model, and
          AutoAttack stays below both (docs/evaluation.md). Add cw to --attacks for
          CW-L2 (a 9-step binary search on c).
  paper   exactly the SAT authors' evaluation: PGD 5 steps of 2/255, one random start,
          eps 1/255 ... 8/255; CW-L2 as they ran it (advertorch: c0 1e-3, 20 iterations, 3
          search steps); their distortions; sanity checks. Every number is labelled
          "paper protocol". It overstates robustness: quote it only to compare with the paper.

\b
Attacks (--attacks, comma-separated; clean accuracy is always measured):
  autoattack   standard AutoAttack, Linf, --autoattack-eps (single-label, slow on a CPU)
  pgd          Linf PGD with random starts, one run per --eps
  cw           Carlini-Wagner L2 with a binary search over c (single-label)
  distortions  contrast (fade to grey), Gaussian low-pass and high-pass of the greyscale image
  sanity       gradient-masking checks: accuracy must not rise with eps, PGD must beat FGSM,
               AutoAttack must beat PGD, PGD at 64/255 must leave <= 5% correct, and
               steps x step size >= eps; a failure prints a warning and marks the table
Multi-label stores are scored by mAP instead of accuracy (PGD on the BCE loss only).
"""


def parse_eps_list(text: str, option: str = "--eps") -> list[float]:
    """'1/255,2/255,0.03' -> [1/255, 2/255, 0.03]; each value read by sattrain.config.parse_eps."""
    from sattrain.config import parse_eps

    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise SatkitError(f"{option}: give at least one value, e.g. 8/255")
    return [parse_eps(p, option) for p in parts]


def parse_attacks(text: str) -> list[str]:
    from sattrain.evaluation import ATTACKS

    names = [p.strip().lower() for p in text.split(",") if p.strip()]
    for name in names:
        if name not in ATTACKS:
            raise SatkitError(f"--attacks: unknown attack {name!r} (known: {', '.join(ATTACKS)})")
    if not names:
        raise SatkitError(f"--attacks: give at least one of {', '.join(ATTACKS)}")
    return names


def parse_step_size(text: str) -> float | str:
    """'2/255' -> 2/255 (absolute); 'eps/4' -> 'eps/4' (a fraction of each eps, checked here)."""
    from sattrain.config import parse_eps
    from sattrain.evaluation import parse_step_fraction

    if "eps" in text.lower():
        parse_step_fraction(text)
        return text
    return parse_eps(text, "--step-size")


@click.command("eval", epilog=EPILOG_EVAL, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("target", type=click.Path(exists=True, path_type=Path))
@click.option("--store", "store", default=None,
              help="The store to evaluate on (another with the same classes, or the one the run trained from): "
                   "a directory, a packed .zip, or a URL (https://..., s3://...).  [default: the store the run "
                   "recorded in its config.json]")
@storage_option
@click.option("--protocol", "-p", type=click.Choice(["strong", "paper"]), default="strong", show_default=True,
              help="Which evaluation: strong (AutoAttack and PGD, headline their per-sample worst case) or paper "
                   "(the SAT authors' PGD-5); see below.")
@click.option("--split", default=None, help="Split to evaluate.  [default: test, else val]")
@click.option("--eps", default=None,
              help="PGD radii (Linf, images in [0, 1]), comma-separated; 8/255 or 0.0314.  "
                   "[default: strong 1,2,4,8/255; paper 1/255 ... 8/255]")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="PGD steps.  [default: strong 50, paper 5]")
@click.option("--step-size", default=None,
              help="PGD step: absolute (2/255) or a fraction of each eps (eps/4).  [default: strong eps/4, paper 2/255]")
@click.option("--restarts", type=click.IntRange(min=1), default=None,
              help="PGD random starts; the worst case per sample is kept.  [default: strong 2, paper 1]")
@click.option("--attacks", default=None,
              help="Comma-separated: autoattack, pgd, cw, distortions, sanity.  "
                   "[default: strong autoattack,pgd,distortions,sanity; paper pgd,cw,distortions,sanity]")
@click.option("--autoattack-eps", default="8/255", show_default=True, help="AutoAttack radius (Linf).")
@click.option("--autoattack-engine", type=click.Choice(["reference", "torchattacks"]), default="reference",
              show_default=True,
              help="reference: the AutoAttack authors' package (pyautoattack); torchattacks: satkit's assembly of "
                   "torchattacks' attacks with the same settings (pip install 'satkit[autoattack]'), for cross-checks.")
@click.option("--cw-search-steps", type=click.IntRange(min=1), default=None,
              help="CW-L2 binary-search steps over c (20 iterations each).  [default: 9, paper 3]")
@click.option("--samples", "-n", type=click.IntRange(min=1), default=None,
              help="Evaluate a fixed, seeded subset of N samples (warns: numbers become estimates).  [default: all]")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the subset and of the attacks' random starts.")
@click.option("--batch-size", "-b", type=click.IntRange(min=1), default=None,
              help="Samples per attacked batch.  [default: 256 on the CPU, 1024 on a GPU of 40 GiB or more]")
@click.option("--device", default="auto", show_default=True, help="auto (cuda when available), cpu, cuda or cuda:N.")
@click.option("--out", "-o", type=click.Path(path_type=Path), default=None,
              help="Where to write the results.  [default: RUN_DIR/eval.json, or RUN_DIR/eval-paper.json for --protocol paper]")
@click.option("--json", "as_json", is_flag=True, help="Print eval.json to stdout instead of the table.")
@click.option("--quiet", "-q", is_flag=True, help="No progress lines on stderr.")
def eval_cmd(
    target: Path, store: str | None, protocol: str, split: str | None, eps: str | None, steps: int | None,
    step_size: str | None, restarts: int | None, attacks: str | None, autoattack_eps: str, autoattack_engine: str,
    cw_search_steps: int | None, samples: int | None, seed: int, batch_size: int | None, device: str,
    out: Path | None, as_json: bool, quiet: bool, storage_options: tuple[str, ...],
) -> None:
    """Measure clean and robust accuracy of a run (RUN_DIR or CHECKPOINT) on a store.

    Writes RUN_DIR/eval.json (eval-paper.json under --protocol paper) and prints a table
    ending in the headline robust accuracy. Robust accuracy counts a sample only if it is
    classified correctly both clean and under attack.
    """
    from satdata.clikit import parse_storage_options
    from sattrain.config import parse_eps
    from sattrain.evaluation import evaluate, format_table, paper_out

    def go() -> None:
        from sattrain.rundir import recorded_store

        progress = None if quiet else (lambda line: click.echo(line, err=True))
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            # Show warnings (a partial evaluation, a failed sanity check) as one line, when they happen.
            warnings.showwarning = lambda message, *_a, **_k: click.echo(f"warning: {message}", err=True)
            result = evaluate(
                target, store if store is not None else recorded_store(target), protocol=protocol, split=split,
                eps=parse_eps_list(eps) if eps is not None else None, steps=steps,
                step_size=parse_step_size(step_size) if step_size is not None else None, restarts=restarts,
                attacks=parse_attacks(attacks) if attacks is not None else None, samples=samples, seed=seed,
                batch_size=batch_size, device=device, autoattack_eps=parse_eps(autoattack_eps, "--autoattack-eps"),
                autoattack_engine=autoattack_engine, cw_search_steps=cw_search_steps,
                out=out if out is not None else (paper_out(target) if protocol == "paper" else None),
                progress=progress, storage_options=parse_storage_options(storage_options),
            )
        if as_json:
            click.echo(json.dumps(result, indent=2))
        else:
            click.echo(format_table(result))

    run_cli(go)


EPILOG_REPORT = """\b
Examples:
  sattrain report runs/std runs/sat-boxes --out report
  sattrain report runs/sat-s0 runs/sat-s1 runs/sat-s2 runs/std --out report   # seeds averaged
  sattrain report runs/sat-s* --out report --no-aggregate                      # one row per run
  sattrain report runs/*-s* --out report --frontier                           # robustness against cost

\b
Layout of report.md:
  one table per protocol (strong: AutoAttack + PGD headline; paper: the SAT authors' PGD-5),
  every row labelled with its protocol and source (split, samples/split size, file);
  runs that differ only in --seed are one configuration (mean +- std over seeds, n),
  never averaged across different sources; a sanity column (ok / FAILED (checks));
  plots: accuracy per epoch (the held-out monitor, not a robustness measure), robust
  accuracy against eps (one panel per protocol), distortions; the frontier (below); the
  protocols; per-run numbers; training (monitor) table.

\b
The frontier (frontier.png and its table; bench/frontier.py draws the same):
  AutoAttack (strong protocol) and the strong PGD sweep against training cost:
  forward-backward passes per example per epoch of budget (1 standard, noise, sat, free;
  steps + 1 pgd, fgsm-rs; steps + 2 trades; the coin methods by their attack share) and
  measured training images/s (metrics.jsonl), clean accuracy beside, mean +- std over
  seeds, the Pareto-optimal points marked. Drawn when some run has both numbers.
"""


@click.command("report", epilog=EPILOG_REPORT,
               context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "-o", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Directory for report.md and the PNG plots (created if missing).")
@click.option("--aggregate/--no-aggregate", default=None,
              help="One row per configuration (runs differing only in --seed; mean +- std over seeds), or one "
                   "row per run.  [default: aggregate when some configuration has more than one seed]")
@click.option("--strict", is_flag=True,
              help="Stop at the first unreadable run (a damaged or foreign file) instead of skipping it "
                   "with a warning and reporting the others.")
@click.option("--frontier/--no-frontier", default=None,
              help="Robust accuracy against training cost (frontier.png and a table): --frontier requires it (an "
                   "error when no run has a strong evaluation with AutoAttack and a measured training speed), "
                   "--no-frontier leaves it out.  [default: drawn when some run has both]")
@json_option
def report_cmd(run_dirs: tuple[Path, ...], out: Path, aggregate: bool | None, strict: bool,
               frontier: bool | None, as_json: bool) -> None:
    """Compare runs: markdown tables per protocol and plots (accuracy per epoch, robustness against eps and cost).

    Reads each RUN_DIR's config.json, metrics.jsonl, metrics.json (its end-of-run summary),
    eval.json and eval-paper.json (when `sattrain eval` has run) and writes OUT/report.md
    with PNGs beside it. Old run directories (eval.json version 1, pgd_acc) are read too:
    their numbers are labelled paper protocol or monitor. A run whose files are damaged is
    skipped with a one-line warning and listed under "Skipped runs" (--strict: an error).
    """
    from sattrain.report import write_report

    path = run_cli(lambda: write_report(list(run_dirs), out, aggregate=aggregate, strict=strict, frontier=frontier))
    if as_json:
        echo_json({"report": str(path), "plots": sorted(str(p) for p in Path(path).parent.glob("*.png")),
                   "runs": [str(r) for r in run_dirs]})
    else:
        click.echo(f"wrote {path}")
