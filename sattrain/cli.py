"""`sattrain`: train (SAT and baselines), evaluate and report on satkit stores.

Each command only parses options and calls one library function (sattrain.train.train
for `run`); errors a user can fix are printed on one line with exit status 1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import click

from satdata.clikit import run_cli
from satdata.errors import SatkitError
from sattrain import __version__
from sattrain.config import DEFAULT_MEMORY_BUDGET, TrainConfig, parse_eps, parse_size_bytes
from sattrain.methods import get_method, method_names
from sattrain.models import model_names, model_summary


def _eps(option: str) -> Callable[[click.Context, click.Parameter, Any], float | None]:
    def cb(ctx: click.Context, param: click.Parameter, value: Any) -> float | None:
        if value is None:
            return None
        try:
            return parse_eps(value, option)
        except SatkitError as e:
            raise click.BadParameter(str(e).split(": ", 1)[-1]) from None

    return cb


def _size(ctx: click.Context, param: click.Parameter, value: Any) -> int:
    try:
        return parse_size_bytes(value)
    except SatkitError as e:
        raise click.BadParameter(str(e).split(": ", 1)[-1]) from None


def _run_epilog() -> str:
    methods = "\n".join(f"  {m:<14}{get_method(m).summary}" + (" [needs a map]" if get_method(m).needs_map else "")
                        for m in method_names())
    models = "\n".join(f"  {m:<16}{model_summary(m)}" for m in model_names())
    return f"""\b
Methods (--method):
{methods}
\b
The SAT perturbation (SAT.md), per element, epoch t from 0:
  p_t = 1 - alpha**(t/10);  g = S with probability p_t, else a random sign;
  x_tilde = clamp(x - eps0 * g, 0, 1);  S = +1 on the object, -1 elsewhere for masks and boxes.
\b
Models (--model):
{models}
\b
The run directory (--out) gets config.json, metrics.jsonl (one line per epoch),
checkpoint.pt (after every epoch) and metrics.json (clean and PGD accuracy at
eps 1/255 ... 8/255 on the held-out subset). Multi-label stores train with BCE and
report mAP.
\b
Examples:
  sattrain run digits.zarr --method sat --map ink --epochs 20 --out runs/digits-sat
  sattrain run digits.zarr --method standard --train-samples 512 --epochs 2 --device cpu
  sattrain run cifar10.zarr --method pgd+sat --map gbp_adv --model resnet10 --amp
  sattrain run tin.zarr --method sat --map boxes --map mask --epochs 100   # map ensemble
  sattrain run cifar10.zarr --out runs/c10-sat --resume                   # continue a run
"""


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="sattrain")
def main() -> None:
    """Saliency-based adversarial training (SAT) and robustness evaluation from a store.

    A store (built with `satdata build`) holds images, labels and saliency maps. `sattrain
    run` trains a model on it with SAT, PGD or TRADES (alone or mixed), and the baselines.
    """


@main.command(epilog=_run_epilog())
@click.argument("store")
@click.option("--method", "-m", type=click.Choice(method_names()), default="sat", show_default=True,
              help="Training method (see the list below).")
@click.option("--map", "maps", multiple=True, metavar="NAME",
              help="Saliency map of the store for the SAT methods (see `satdata info`). Give it twice for the "
                   "authors' ensemble: one of the maps per epoch, at random (seeded).  [default: the store's first map]")
@click.option("--model", default="small-cnn", show_default=True, help="Architecture (see the list below).")
@click.option("--epochs", type=click.IntRange(min=1), default=100, show_default=True,
              help="Epochs (the authors trained 100-200).")
@click.option("--batch-size", "-b", type=click.IntRange(min=2), default=128, show_default=True, help="Batch size.")
@click.option("--optimizer", type=click.Choice(["adam", "sgd"]), default="adam", show_default=True,
              help="Adam (the authors') or SGD with momentum; no learning-rate schedule.")
@click.option("--lr", type=float, default=None, help="Learning rate.  [default: 1e-3 for Adam, 0.1 for SGD]")
@click.option("--momentum", type=float, default=0.9, show_default=True, help="SGD momentum.")
@click.option("--weight-decay", type=float, default=0.0, show_default=True, help="Weight decay.")
@click.option("--eps0", default="8/255", show_default=True, callback=_eps("--eps0"),
              help="SAT perturbation size (also the size of the uniform-noise controls).")
@click.option("--alpha", type=float, default=0.6, show_default=True,
              help="SAT curriculum: p_t = 1 - alpha**(t/10), the share of pixels that follow the map "
                   "(0 at epoch 0, 0.4 at epoch 10 with 0.6). The authors' plots label this axis alpha^10.")
@click.option("--eps", default="8/255", show_default=True, callback=_eps("--eps"),
              help="PGD / TRADES ball in training, and the PGD of the per-epoch evaluation.")
@click.option("--steps", type=click.IntRange(min=0), default=5, show_default=True, help="PGD / TRADES steps in training.")
@click.option("--step-size", default="2/255", show_default=True, callback=_eps("--step-size"),
              help="PGD / TRADES step size (training and evaluation).")
@click.option("--beta", type=float, default=None,
              help="TRADES weight of the KL term.  [default: 6 for trades, 1 for trades+sat and trades+noise]")
@click.option("--no-augment", is_flag=True, help="No random crop (pad 4) and flip (default: on, image and map together).")
@click.option("--device", default="auto", show_default=True,
              help="auto (CUDA if available), cpu, cuda or cuda:N.")
@click.option("--amp", is_flag=True,
              help="CUDA: float16 autocast with a gradient scaler for training and its attacks (evaluation stays "
                   "float32). On the CPU it has no effect (a note says so).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seeds everything: initialisation, subsets, shuffling, augmentation, perturbations, attacks.")
@click.option("--out", "-o", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Run directory.  [default: runs/<dataset>-<method>-<model>-s<seed>]")
@click.option("--resume", is_flag=True,
              help="Continue the run in --out from its last checkpoint (same options; --epochs may grow).")
@click.option("--train-samples", type=click.IntRange(min=2), default=None,
              help="Train on a random subset of this many samples (seeded), for quick runs.")
@click.option("--eval-samples", type=click.IntRange(min=0), default=256, show_default=True,
              help="Size of the fixed held-out subset evaluated each epoch and at the end (0: the whole split).")
@click.option("--eval-split", default=None, help="Held-out split.  [default: val if present, else test]")
@click.option("--eval-steps", type=click.IntRange(min=0), default=5, show_default=True,
              help="PGD steps of the held-out evaluation (random start, --step-size).")
@click.option("--memory-budget", default=f"{DEFAULT_MEMORY_BUDGET // 1024**3}G", show_default=True, callback=_size,
              help="Host memory a training split may take; larger splits are streamed from the store in "
                   "shuffled blocks of whole chunks.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads for torch.  [default: torch's]")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def run(store: str, method: str, maps: tuple[str, ...], model: str, epochs: int, batch_size: int, optimizer: str,
        lr: float | None, momentum: float, weight_decay: float, eps0: float, alpha: float, eps: float, steps: int,
        step_size: float, beta: float | None, no_augment: bool, device: str, amp: bool, seed: int, out: Path | None,
        resume: bool, train_samples: int | None, eval_samples: int, eval_split: str | None, eval_steps: int,
        memory_budget: int, threads: int | None, quiet: bool) -> None:
    """Train a model on STORE with one of the methods; write a run directory.

    Reads the training split once into (device) memory, builds each batch's perturbation
    on the device, checkpoints after every epoch, and evaluates clean and PGD accuracy on
    a fixed held-out subset.
    """
    def go() -> None:
        from sattrain.train import train

        cfg = TrainConfig(
            store=store, out=str(out) if out is not None else None, method=method, maps=tuple(maps), model=model,
            epochs=epochs, batch_size=batch_size, optimizer=optimizer, lr=lr, momentum=momentum,
            weight_decay=weight_decay, eps0=eps0, alpha=alpha, eps=eps, steps=steps, step_size=step_size, beta=beta,
            augment=not no_augment, device=device, amp=amp, seed=seed, resume=resume, train_samples=train_samples,
            eval_samples=eval_samples, eval_split=eval_split, eval_steps=eval_steps, memory_budget=memory_budget,
            threads=threads, progress=not quiet,
        )
        train(cfg, log=lambda msg: click.echo(msg, err=True))

    run_cli(go, interrupted="interrupted: the run directory keeps the last finished epoch; continue with --resume")


# `sattrain eval` and `sattrain report` live in their own module; add them where present.
try:
    from sattrain.cli_eval import eval_cmd, report_cmd
except ModuleNotFoundError as _e:  # only the module itself may be missing, not one it imports
    if _e.name != "sattrain.cli_eval":
        raise
else:
    main.add_command(eval_cmd, "eval")
    main.add_command(report_cmd, "report")


if __name__ == "__main__":  # pragma: no cover
    main()
