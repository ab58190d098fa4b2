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

from satdata.clikit import run_cli
from satdata.errors import SatkitError

EPILOG_EVAL = """\b
Examples:
  sattrain eval runs/sat-r10 --store cifar10.zarr
  sattrain eval runs/sat-r10 --store cifar10.zarr --eps 1/255,2/255,4/255,8/255 --samples 1000
  sattrain eval runs/pgd-r10/checkpoint.pt --store cifar10.zarr --attacks autoattack --device cuda

\b
Attacks (--attacks, comma-separated; clean accuracy is always measured):
  pgd          Linf PGD with random start, one run per --eps
  cw           Carlini-Wagner L2, 20 Adam iterations, c = 1 (single-label only)
  autoattack   standard AutoAttack, Linf 8/255 (needs: pip install 'satkit[autoattack]'; slow)
  distortions  contrast 0.1..1, low-pass and high-pass filtering
Multi-label stores are scored by mAP instead of accuracy.
"""


def parse_eps_list(text: str, option: str = "--eps") -> list[float]:
    """'1/255,2/255,0.03' -> [1/255, 2/255, 0.03]; each value read by sattrain.config.parse_eps."""
    from sattrain.config import parse_eps

    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise SatkitError(f"{option}: give at least one value, e.g. 8/255")
    return [parse_eps(p, option) for p in parts]


def parse_attacks(text: str) -> list[str]:
    from sattrain.evaluate import ATTACKS

    names = [p.strip().lower() for p in text.split(",") if p.strip()]
    for name in names:
        if name not in ATTACKS:
            raise SatkitError(f"--attacks: unknown attack {name!r} (known: {', '.join(ATTACKS)})")
    if not names:
        raise SatkitError(f"--attacks: give at least one of {', '.join(ATTACKS)}")
    return names


@click.command("eval", epilog=EPILOG_EVAL, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("target", type=click.Path(exists=True, path_type=Path))
@click.option("--store", "-s", "store", type=click.Path(exists=True, path_type=Path), required=True,
              help="The store to evaluate on (the one the run trained from, or another with the same classes).")
@click.option("--split", default=None, help="Split to evaluate.  [default: test, else val]")
@click.option("--eps", default="1/255,2/255,3/255,4/255,5/255,6/255,7/255,8/255", show_default=True,
              help="PGD radii (Linf, images in [0, 1]), comma-separated; 8/255 or 0.0314.")
@click.option("--steps", type=click.IntRange(min=1), default=5, show_default=True, help="PGD steps (the paper: 5; 10 for SVHN).")
@click.option("--step-size", default="2/255", show_default=True, help="PGD step size.")
@click.option("--restarts", type=click.IntRange(min=1), default=1, show_default=True,
              help="PGD random restarts; the worst case per sample is kept.")
@click.option("--attacks", default="pgd,cw,distortions", show_default=True,
              help="Comma-separated: pgd, cw, autoattack, distortions.")
@click.option("--autoattack-eps", default="8/255", show_default=True, help="AutoAttack radius (Linf).")
@click.option("--samples", "-n", type=click.IntRange(min=1), default=None,
              help="Evaluate a fixed, seeded subset of N samples (warns: numbers become estimates).  [default: all]")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the subset and of PGD's random starts.")
@click.option("--batch-size", "-b", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto (cuda when available), cpu, cuda or cuda:N.")
@click.option("--out", "-o", type=click.Path(path_type=Path), default=None,
              help="Where to write the results.  [default: RUN_DIR/eval.json]")
@click.option("--json", "as_json", is_flag=True, help="Print eval.json to stdout instead of the table.")
@click.option("--quiet", "-q", is_flag=True, help="No progress lines on stderr.")
def eval_cmd(
    target: Path, store: Path, split: str | None, eps: str, steps: int, step_size: str, restarts: int,
    attacks: str, autoattack_eps: str, samples: int | None, seed: int, batch_size: int, device: str,
    out: Path | None, as_json: bool, quiet: bool,
) -> None:
    """Measure clean and robust accuracy of a run (RUN_DIR or CHECKPOINT) on a store.

    Writes RUN_DIR/eval.json and prints a table. Robust accuracy counts a sample only if
    it is classified correctly both clean and under attack.
    """
    from sattrain.config import parse_eps
    from sattrain.evaluate import evaluate, format_table

    def go() -> None:
        progress = None if quiet else (lambda line: click.echo(line, err=True))
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            # Show warnings (a partial evaluation, a size mismatch) as one line, when they happen.
            warnings.showwarning = lambda message, *_a, **_k: click.echo(f"warning: {message}", err=True)
            result = evaluate(
                target, store, split=split, eps=parse_eps_list(eps), steps=steps,
                step_size=parse_eps(step_size, "--step-size"), restarts=restarts,
                attacks=parse_attacks(attacks), samples=samples, seed=seed, batch_size=batch_size,
                device=device, autoattack_eps=parse_eps(autoattack_eps, "--autoattack-eps"), out=out,
                progress=progress,
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

\b
Layout of report.md:
  one table per protocol (strong: AutoAttack headline; paper: the SAT authors' PGD-5),
  every row labelled with its protocol and source (split, samples/split size, file);
  runs that differ only in --seed are one configuration (mean +- std over seeds, n),
  never averaged across different sources; a sanity column (ok / FAILED (checks));
  plots: accuracy per epoch (the held-out monitor, not a robustness measure), robust
  accuracy against eps (one panel per protocol), distortions; the protocols; per-run
  numbers; training (monitor) table.
"""


@click.command("report", epilog=EPILOG_REPORT,
               context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "-o", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Directory for report.md and the PNG plots (created if missing).")
@click.option("--aggregate/--no-aggregate", default=None,
              help="One row per configuration (runs differing only in --seed; mean +- std over seeds), or one "
                   "row per run.  [default: aggregate when some configuration has more than one seed]")
def report_cmd(run_dirs: tuple[Path, ...], out: Path, aggregate: bool | None) -> None:
    """Compare runs: markdown tables per protocol and plots (accuracy per epoch, robustness against eps).

    Reads each RUN_DIR's config.json, metrics.jsonl, metrics.json (its end-of-run summary),
    eval.json and eval-paper.json (when `sattrain eval` has run) and writes OUT/report.md
    with PNGs beside it. Old run directories (eval.json version 1, pgd_acc) are read too:
    their numbers are labelled paper protocol or monitor.
    """
    from sattrain.report import write_report

    path = run_cli(lambda: write_report(list(run_dirs), out, aggregate=aggregate))
    click.echo(f"wrote {path}")
