"""`sattrain`: train (SAT and baselines), evaluate and report on satkit stores.

Each command only parses options and calls one library function (sattrain.trainer.train
for `run`); errors a user can fix are printed on one line with exit status 1.

Option values are validated in one place, ``TrainConfig.resolved()`` (sattrain.config):
click only parses text, and its float type accepts "nan", "inf" and "1e999", which
resolved() refuses naming the option (``--lr: must be a finite number > 0, got nan``).
The callbacks here only turn epsilons ("8/255") and sizes ("8G") into numbers.
"""

from __future__ import annotations

import json

from typing import Any, Callable

import click

from satdata.clikit import SatkitGroup, debug_option, run_cli, storage_option
from satdata.errors import SatkitError
from sattrain import __version__
from sattrain.accel import CHANNELS_LAST, COMPILE_MODES, PRECISIONS
from sattrain.config import AUGMENTS, DEFAULT_MEMORY_BUDGET, RECIPES, SCHEDULES, TrainConfig, parse_eps, parse_size_bytes
from sattrain.methods import get_method, method_names
from sattrain.models import model_names, model_summary
from sattrain.schedule import SCHEDULE_HELP


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
    recipes = "\n".join(
        f"  {r.name:<8}{r.optimizer} lr {r.lr:g}"
        + "".join(f" ({lr:g} for {m})" for m, lr in r.lr_by_method)
        + f", momentum {r.momentum:g}, weight decay {r.weight_decay:g}, "
        f"--schedule {r.schedule}, --attack-bn {r.attack_bn}" for r in RECIPES.values())
    schedules = "\n".join(f"  {k:<11}{v}" for k, v in SCHEDULE_HELP.items())
    return f"""\b
Methods (--method):
{methods}
\b
The SAT perturbation (docs/method.md), per element, epoch t from 0:
  p_t = 1 - alpha**(t/10);  g = S with probability p_t, else a random sign;
  x_tilde = clamp(x - eps0 * g, 0, 1);  S = +1 on the object, -1 elsewhere for masks and boxes.
\b
Models (--model):
{models}
\b
Recipes (--recipe; an explicit --optimizer, --lr, --momentum, --weight-decay,
--schedule or --attack-bn overrides the recipe's value):
{recipes}
\b
Learning-rate schedules (--schedule; epochs t from 0 of E, scaled to --epochs; onecycle
and cyclic per optimizer step):
{schedules}
\b
The run directory (--out) gets config.json (every option as resolved), metrics.jsonl
(one line per epoch: loss, lr, held-out clean_acc and pgd5_monitor), checkpoint.pt
(the last epoch, after every epoch; --resume continues it), best.pt (the epoch with the
highest pgd5_monitor; ties keep the earlier epoch), summary.json and metrics.json.
pgd5_monitor is cheap monitoring (PGD, 5 steps of --eps/4, --eval-samples held-out
samples), never the model's robustness: that is the end-of-run summary, AutoAttack and
PGD (50 x eps/4, 2 starts) at 8/255 on --summary-samples held-out samples of checkpoint.pt (the
console's last line states its headline, per sample the worst case of the two), or `sattrain eval RUN_DIR` (or RUN_DIR/best.pt).
Without a val split the monitor (and so best.pt) runs on test, the split the summary
evaluates: --holdout N chooses best.pt on N samples held out of training instead.
Multi-label stores train with BCE and report mAP.
\b
Examples:
  sattrain run digits.zarr --method sat --map ink --epochs 20 --out runs/digits-sat
  sattrain run digits.zarr --method standard --train-samples 512 --epochs 2 --summary-samples 0
  sattrain run cifar10.zarr --method pgd --recipe madry --model resnet18 --epochs 200
  sattrain run cifar10.zarr --method pgd+sat --map gbp_adv --model resnet10 --precision bf16
  sattrain run cifar10.zarr --method fgsm-rs --recipe fast --epochs 15 --early-stop
  sattrain run cifar10.zarr --method free --recipe fast --epochs 80     # 10 passes x 8 replays
  sattrain run tin.zarr --method sat --map boxes --map mask --epochs 100   # map ensemble
  sattrain run cifar10.zarr --out runs/c10-sat --resume                   # continue a run
\b
Many processes (one per GPU, or CPU processes over gloo): launch with torchrun;
--batch-size is the global batch, split evenly over the processes:
  torchrun --nproc-per-node 4 -m sattrain run cifar10.zarr --method sat --batch-size 512
  torchrun --standalone --nproc-per-node 2 -m sattrain run digits.zarr --device cpu --batch-size 64
Each process loads (or streams) only its part of the training samples; gradients are
averaged (DistributedDataParallel); rank 0 alone logs and writes the run directory and
evaluates. --resume under torchrun needs the run's number of processes. A process that
waits longer than SATKIT_DIST_TIMEOUT seconds (default 1800) for the others stops.
"""


@click.group(cls=SatkitGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="sattrain")
@debug_option
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
@click.option("--recipe", type=click.Choice(list(RECIPES)), default="paper", show_default=True,
              help="Optimisation settings of a published setup (values below): paper = the SAT authors' (Adam lr 1e-3, "
                   "constant lr, attacks in BN train mode); madry = PGD-AT (SGD 0.1, momentum 0.9, weight decay 5e-4, "
                   "multistep); trades = the TRADES reference (SGD 0.1, momentum 0.9, weight decay 2e-4, x0.1 at "
                   "75/90/100% of the epochs). The options below override single values.")
@click.option("--optimizer", type=click.Choice(["adam", "sgd"]), default=None,
              help="Adam or SGD with momentum.  [default: the recipe's: adam for paper, sgd for madry and trades]")
@click.option("--lr", type=float, default=None,
              help="(Peak) learning rate.  [default: the recipe's: 1e-3 for Adam (paper), 0.1 for SGD (madry, "
                   "trades); with an --optimizer other than the recipe's: 1e-3 for Adam, 0.1 for SGD]")
@click.option("--momentum", type=float, default=None,
              help="SGD momentum, in [0, 1); Adam ignores it.  [default: the recipe's: 0.9]")
@click.option("--weight-decay", type=float, default=None,
              help="Weight decay (L2, added to the gradient).  [default: the recipe's: 0 for paper, 5e-4 for madry, "
                   "2e-4 for trades]")
@click.option("--schedule", type=click.Choice(list(SCHEDULES)), default=None,
              help="Learning-rate schedule (see the list below; recorded per epoch as lr in metrics.jsonl).  "
                   "[default: the recipe's: constant for paper, multistep for madry, trades for trades]")
@click.option("--attack-bn", type=click.Choice(["train", "eval"]), default=None,
              help="Batch norm while training-time attacks (PGD, TRADES) craft their examples: train = batch "
                   "statistics, running statistics updated by the attack (the SAT authors' scripts); eval = running "
                   "statistics, left unchanged (the TRADES reference). The training pass is always in train mode.  "
                   "[default: the recipe's: train for paper, eval for madry and trades]")
@click.option("--eps0", default="8/255", show_default=True, callback=_eps("--eps0"),
              help="SAT perturbation size (also the size of the uniform-noise controls).")
@click.option("--alpha", type=float, default=0.6, show_default=True,
              help="SAT curriculum: p_t = 1 - alpha**(t/10), the share of pixels that follow the map "
                   "(0 at epoch 0, 0.4 at epoch 10 with 0.6). The authors' plots label this axis alpha^10.")
@click.option("--eps", default="8/255", show_default=True, callback=_eps("--eps"),
              help="PGD / TRADES ball in training, and the PGD of the per-epoch monitor.")
@click.option("--steps", type=click.IntRange(min=0), default=None,
              help="PGD / TRADES steps in training.  [default: 5; fgsm-rs takes exactly 1]")
@click.option("--step-size", default=None, callback=_eps("--step-size"),
              help="Step size of the training attack (and of the per-epoch monitor for the PGD / TRADES methods).  "
                   "A given step with --steps x --step-size < --eps draws a warning (the attack cannot reach the "
                   "edge of the ball).  [default: --eps/4 (2/255 at 8/255, the SAT authors'); 1.25 x --eps for "
                   "fgsm-rs (Wong et al.), --eps for free (Shafahi et al.)]")
@click.option("--replays", type=click.IntRange(min=1), default=None,
              help="free: optimizer steps on each minibatch (Shafahi et al.'s m). The run makes ceil(--epochs / m) "
                   "passes over the data, so it takes the gradient steps of --epochs epochs.  [default: 8]")
@click.option("--early-stop", is_flag=True,
              help="Stop when the per-epoch monitor falls by more than 0.2 in one epoch (catastrophic overfitting of "
                   "FGSM training; Wong et al.'s remedy); the summary then evaluates best.pt.")
@click.option("--beta", type=float, default=None,
              help="TRADES weight of the KL term.  [default: 6 for trades, 1 for trades+sat and trades+noise]")
@click.option("--augment", type=click.Choice(list(AUGMENTS)), default="auto", show_default=True,
              help="Training augmentation, image and map together: crop+flip = random crop (zero padding 4) and "
                   "horizontal flip; crop = the crop alone; none. auto = crop+flip when the store says a mirror "
                   "keeps the class, crop otherwise (digits); config.json records the value used.")
@click.option("--no-augment", is_flag=True, help="Same as --augment none.")
@click.option("--device", default="auto", show_default=True,
              help="auto (CUDA if available), cpu, cuda or cuda:N.")
@click.option("--precision", type=click.Choice(list(PRECISIONS)), default="auto", show_default=True,
              help="Arithmetic of training and its attacks (autocast; weights, optimizer and the evaluation stay "
                   "float32): auto = bf16 on CUDA GPUs with native bfloat16 (Ampere and later), fp16 with a "
                   "gradient scaler on older ones, fp32 on the CPU (so CPU results do not change). bf16 on the CPU "
                   "only when asked. config.json records it under accel.")
@click.option("--channels-last", type=click.Choice(list(CHANNELS_LAST)), default="auto", show_default=True,
              help="Weights and batches in NHWC order, what tensor-core convolutions use: auto = on for CUDA, "
                   "off on the CPU.")
@click.option("--compile", "compile_mode", type=click.Choice(list(COMPILE_MODES)), default="none",
              show_default=True,
              help="torch.compile mode for the training steps; none by default (measured slower than eager bf16 "
                   "+ channels_last on an H200, BENCHMARKS.md) and it compiles again for each new batch shape.")
@click.option("--amp", is_flag=True,
              help="Same as --precision fp16 on CUDA (the older flag); on the CPU it has no effect (a note says so).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seeds everything: initialisation, subsets, shuffling, augmentation, perturbations, attacks.")
@click.option("--out", "-o", type=click.Path(file_okay=False), default=None,
              help="Run directory.  [default: runs/<dataset>-<method>-<model>-s<seed>]")
@click.option("--resume", is_flag=True,
              help="Continue the run in --out from its last checkpoint.pt, schedule included (same options; --epochs may "
                   "grow under --schedule constant only: the others are scaled to the epochs).")
@click.option("--train-samples", type=click.IntRange(min=2), default=None,
              help="Train on a random subset of this many samples (seeded), for quick runs (with --holdout: of "
                   "the samples left after it).")
@click.option("--holdout", type=click.IntRange(min=1), default=None, metavar="N",
              help="Take N seeded samples out of the train split (the same samples for every run of the store with "
                   "that N) and run the per-epoch monitor on them (--eval-samples of them), so that best.pt is not "
                   "chosen on the test split; --train-samples draws from the rest, the summary still evaluates "
                   "--eval-split; --resume needs the same N.  [default: none: the monitor runs on --eval-split]")
@click.option("--eval-samples", type=click.IntRange(min=0), default=256, show_default=True,
              help="Size of the fixed held-out subset of the per-epoch monitor (0: the whole split).")
@click.option("--eval-split", default=None,
              help="Held-out split of the summary, and of the monitor unless --holdout.  [default: val if present, "
                   "else test]")
@click.option("--eval-steps", type=click.IntRange(min=0), default=5, show_default=True,
              help="PGD steps of the per-epoch monitor (random start, steps of --step-size or --eps/4, at --eps): cheap monitoring "
                   "that picks best.pt, recorded as pgd<N>_monitor, not a robustness number.")
@click.option("--summary-samples", type=click.IntRange(min=0), default=500, show_default=True,
              help="Held-out samples of the end-of-run summary with the strong protocol (AutoAttack and PGD at "
                   "8/255; minutes on a CPU); 0 skips it (measure later with `sattrain eval`).")
@click.option("--memory-budget", default=f"{DEFAULT_MEMORY_BUDGET // 1024**3}G", show_default=True, callback=_size,
              help="Host memory a training split may take; larger splits are streamed from the store in "
                   "shuffled blocks of whole chunks (or shards), at most two blocks in memory at once: a "
                   "streamed run then peaks within the budget (at least two files: about 200 MB at 224x224) + "
                   "what the model and one batch's work take + 64 MiB (docs/store-format.md).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads for torch.  [default: torch's]")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@click.option("--json", "as_json", is_flag=True,
              help="At the end, print the run's metrics.json (summary, best and last epochs) to stdout as JSON; "
                   "the log stays on stderr.")
@storage_option
def run(store: str, method: str, maps: tuple[str, ...], model: str, epochs: int, batch_size: int, recipe: str,
        optimizer: str | None, lr: float | None, momentum: float | None, weight_decay: float | None,
        schedule: str | None, attack_bn: str | None, eps0: float, alpha: float, eps: float, steps: int | None,
        step_size: float | None, replays: int | None, early_stop: bool, beta: float | None, augment: str, no_augment: bool, device: str,
        precision: str, channels_last: str, compile_mode: str, amp: bool, seed: int,
        out: str | None, resume: bool, train_samples: int | None, holdout: int | None, eval_samples: int, eval_split: str | None,
        eval_steps: int, summary_samples: int, memory_budget: int, threads: int | None, quiet: bool,
        as_json: bool, storage_options: tuple[str, ...]) -> None:
    """Train a model on STORE with one of the methods; write a run directory.

    Reads the training split once into (device) memory, builds each batch's perturbation
    on the device, checkpoints after every epoch (and best.pt at the best held-out monitor
    score), monitors clean and cheap-PGD accuracy on a fixed held-out subset, and ends
    with a strong-protocol evaluation (AutoAttack and PGD) of the final model.
    """
    def go() -> None:
        from satdata.clikit import parse_storage_options
        from sattrain.distributed import PeerFailed, world_from_env
        from sattrain.trainer import train

        world = world_from_env()  # torchrun's processes (one when not launched by torchrun)
        try:
            if no_augment and augment not in ("auto", "none"):
                # the same in every process: rank 0 alone says it (sattrain.distributed)
                raise (SatkitError if world.main else PeerFailed)(
                    f"--no-augment contradicts --augment {augment}; give one of them")
            cfg = TrainConfig(
                store=store, out=out, method=method, maps=tuple(maps), model=model,
                epochs=epochs, batch_size=batch_size, recipe=recipe, optimizer=optimizer, lr=lr, momentum=momentum,
                weight_decay=weight_decay, schedule=schedule, attack_bn=attack_bn, eps0=eps0, alpha=alpha, eps=eps,
                steps=steps, step_size=step_size, replays=replays, early_stop=early_stop, beta=beta,
                augment="none" if no_augment else augment, device=device, amp=amp, precision=precision,
                channels_last=channels_last, compile=compile_mode, seed=seed, resume=resume,
                train_samples=train_samples, holdout=holdout, eval_samples=eval_samples,
                eval_split=eval_split, eval_steps=eval_steps, summary_samples=summary_samples,
                memory_budget=memory_budget, threads=threads, progress=not quiet,
            )
            run_dir = train(cfg, log=lambda msg: click.echo(msg, err=True),
                            storage_options=parse_storage_options(storage_options))
            if as_json and world.main:  # the run's metrics.json (its summary, best and last epochs) on stdout
                from sattrain.rundir import METRICS_JSON

                click.echo(json.dumps({"run": str(run_dir), **json.loads((run_dir / METRICS_JSON).read_text())},
                                      indent=1))
        except PeerFailed:  # another process failed and printed why: one line in all, exit status 1
            raise SystemExit(1) from None
        except SatkitError as e:
            if world.main:
                raise
            raise SatkitError(f"{world.who()}: {e}") from None

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
