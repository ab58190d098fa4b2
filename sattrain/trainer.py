"""``train(cfg) -> run_dir``: train a classifier on a store with one of the methods.

A run directory holds::

    config.json     resolved options (recipe, optimizer, lr, schedule, attack_bn, augment
                    as resolved), store (path, dataset, digest), data placement, device,
                    package versions, git revision
    metrics.jsonl   one line per epoch: epoch (from 0, the t of p_t), map, p_t, loss,
                    train_acc, lr (the epoch's first step) and lr_last (its last step),
                    clean_acc and pgd<N>_monitor on a fixed held-out subset with the
                    monitor's parameters ("monitor"), attack_share, seconds, images_per_s
    checkpoint.pt   the last epoch, after every epoch (sattrain.checkpoint: model,
                    optimizer, scheduler, epochs done, best so far, model_spec, config, RNG
                    states), loadable with weights_only=True; --resume continues it
    best.pt         the epoch with the highest pgd<N>_monitor so far (same format, no
                    optimizer state)
    summary.json    the end-of-run evaluation with the strong protocol (sattrain.evaluation:
                    AutoAttack and PGD at 8/255 on --summary-samples held-out
                    samples) of checkpoint.pt; absent with --summary-samples 0
    metrics.json    at the end: "summary" (that evaluation's protocol, samples, split,
                    clean, robust {"autoattack@8/255", "pgd@8/255", "autoattack+pgd@8/255"}
                    and headline: per sample the worst case of the two attacks),
                    "best" and "last" (monitor numbers of the best and the last epoch),
                    "monitor" (what the monitor measures), run facts

The monitor. After every epoch the model is scored on a fixed held-out subset
(--eval-samples, 256) clean and under a cheap PGD (--eval-steps 5 steps of eps/4, the
--step-size of the PGD / TRADES methods, at --eps, one random start). That is for
watching a run and choosing best.pt, and its key says so: ``pgd5_monitor`` (``pgd<N>_monitor`` with --eval-steps N). A few weak
PGD steps overestimate robustness, so it is never reported as the model's robustness:
that is the summary's job (or ``sattrain eval``).

best.pt (robust overfitting, Rice et al. 2020: the held-out robust accuracy of
adversarial training often peaks and then falls while the training loss keeps falling).
An epoch replaces the best only with a strictly higher monitor score, so a tie keeps
the earlier epoch (the one that got there with less training). Multi-label runs compare
the monitor's mAP under attack. A NaN score never becomes the best.

What best.pt is chosen on: the monitor's subset is of --eval-split (val, else test), or,
with ``--holdout N``, of N samples taken out of the train split (sattrain.data.split_holdout,
HOLDOUT_SEED: the same in every process and every run of the store; --train-samples draws
from the rest). Without --holdout on the test split the log says once that best.pt is
chosen on test, and metrics.json's "monitor" has "split" and a "selection" note (after
--early-stop, "summary" and "stopped_early" say that the summary evaluated best.pt on the
split that chose it). config.json records "holdout" under "options" and "data".

For multi-label stores every "acc" above is the mean average precision over classes
(``"metric": "mAP"`` says so), and PGD maximises the BCE loss.

Reproducibility: every random stream of epoch t (shuffle, augmentation, perturbation,
attack, per-batch coin, map choice, evaluation) is seeded from (seed, t, stream name)
alone, and the model, optimizer and scheduler state are checkpointed after each epoch
(and the best-so-far record with them: best.pt is rewritten from checkpoint.pt on resume
if a kill fell between the two writes). So on the
CPU a run killed at any point and continued with ``--resume`` ends with exactly the
metrics of an uninterrupted run (tests/test_resume.py kills one with SIGKILL). On CUDA
the same holds up to the non-determinism of cuDNN kernels.

Host synchronisation: a training step does not wait for the device. The loss and
accuracy are accumulated on the device and read (together with a non-finite-loss flag)
every LOG_EVERY steps for the progress bar.

Divergence: a non-finite loss stops the run with an error naming the epoch, the step and
the value (``epoch 3 (t = 2), step 17 of 40: the training loss is not finite (loss is
nan): training diverged; try a lower --lr; runs/x/checkpoint.pt keeps epoch 2 (the last
finite one), and the run is not finished``). After every epoch, before anything of it is
written, the mean loss, the weights and the optimizer state are checked too (one device
sync per epoch): the last step's update can overflow after a finite loss. Nothing of a
diverged epoch is written, so checkpoint.pt and best.pt keep the last finite epoch (and
sattrain.checkpoint.save_checkpoint refuses non-finite state as a last net), no
metrics.json says the run finished (a resumed run removes the metrics.json and
summary.json of its earlier end before it trains), and the exit status is 1.

The run directory (--out) is checked before anything is read from or written to it: a
symbolic link (which could redirect the run's files) or an existing non-directory is
refused, and after the resume checks it is created and proven writable with a probe file,
before any data is loaded or any training starts. Every file of the run is written aside
and renamed into place (satdata.atomic.atomic_write) and metrics.jsonl is appended to
with O_NOFOLLOW, so a link planted in the directory cannot send a write elsewhere.

Resuming validates everything it reads before using it (``_restore``): the checkpoint's
keys and types, the options it records, its network and classes, finite weights, the
optimizer, scheduler and scaler states, the best-epoch record, and metrics.jsonl (the
lines of exactly the epochs done); a refused resume changes nothing in the run directory.

Many processes (``torchrun --nproc-per-node N -m sattrain run ...``; sattrain.distributed,
docs/design.md): every process runs ``train``. Each trains a DistributedDataParallel replica
on its part of the training samples (sattrain.data.partition, or its share of each epoch's
streamed chunks) in batches of ``--batch-size / N``, padded so that all take the same steps;
shuffling, augmentation, perturbations and attacks are seeded with the rank
(``Comm.seed``), the epoch's map and the per-batch coin are shared. The loss, accuracy,
attack share and samples of metrics.jsonl are sums over the processes, and each line
records the digest of the weights every process held after the epoch ("replicas": checked
equal, else the run stops). Rank 0 alone logs, writes the run directory, runs the monitor
(the same function, seed and samples as one process) and the end-of-run summary (after the
others have left). ``--resume``: rank 0 restores and validates checkpoint.pt and broadcasts
the model, optimizer, scheduler and scaler states; no RNG state is shared or saved per
process, since every stream of epoch t is seeded from (seed, t, stream, rank) alone. A run
resumes only with the number of processes it was trained with (``world_size`` in its
options): another number would deal other parts and draw other noise.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
import warnings
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, ContextManager, Sequence

import numpy as np
import torch
import torch.nn as nn

from satdata.errors import SatkitError
from satdata.atomic import write_json_atomic, write_text_atomic
from satdata.store import MAPS_GROUP, Store, open_store, parse_array_path, store_digest
from sattrain import accel
from sattrain.checkpoint import (
    check_optimizer_state,
    check_scaler_state,
    check_scheduler_state,
    load_checkpoint,
    load_model_state,
    non_finite_tensors,
    same_value,
    save_checkpoint,
)
from sattrain.config import (
    LEGACY_STEP_SIZE,
    REPLAY_METHODS,
    SINGLE_STEP_METHODS,
    TrainConfig,
    format_eps,
    resolve_augment,
    resume_mismatches,
    short_attack_warning,
)
from sattrain.rundir import (
    BEST_NAME,
    CHECKPOINT_NAME,
    CONFIG_JSON,
    METRICS_JSON,
    METRICS_JSONL,
    SUMMARY_JSON,
    append_line,
    check_run_dir,
    default_run_dir,
    environment,
    git_revision,
    lock_run_dir,
    make_run_dir,
    read_metrics_lines,
)
from sattrain.device import resolve_device
from sattrain.distributed import Comm, PeerFailed, params_digest, rank_device, world_from_env
from sattrain.distributed import start as start_processes
from sattrain.evaluation import evaluate_heldout
from sattrain.metrics import mean_average_precision
from sattrain.data import (
    EvalSplit,
    InMemorySplit,
    MapCodec,
    StreamingSplit,
    choose_maps,
    derive_seed,
    epoch_samples,
    load_split,
    make_generator,
    map_codec,
    num_batches,
    open_train_split,
    partition,
    prepare_batch,
    sample_bytes,
    select_indices,
    split_holdout,
)
from sattrain.methods import Method, StepContext, StepResult, get_method
from sattrain.models import create_model
from sattrain.perturb import curriculum_p
from sattrain.schedule import make_scheduler, step_per_step

# The end-of-run summary (sattrain.evaluation, strong protocol): AutoAttack and the strong PGD
# at 8/255, the headline their per-sample worst case; the eps sweep, CW, distortions and the sanity
# checks are `sattrain eval` (a sweep of strong PGD costs minutes on a CPU, and a summary
# runs after every training run).
SUMMARY_ATTACKS = ("autoattack", "pgd")
SUMMARY_EPS = (8 / 255,)
SUMMARY_SEED = 0
LOG_EVERY = 20  # steps between host reads of the running loss (progress bar, NaN check)
# Fixed seed of the held-out subset: the same samples for every run, whatever its --seed,
# so runs with different seeds and methods are compared on the same images.
EVAL_SUBSET_SEED = 20200607
# Seed of --holdout's samples (sattrain.data.split_holdout): fixed like EVAL_SUBSET_SEED, so
# every run with --holdout N of a store trains on the same samples and is monitored on the
# same held-out ones, whatever its --seed and method (--train-samples then draws its subset
# from the rest with the run's seed).
HOLDOUT_SEED = 20200608


class NonFiniteLoss(SatkitError):
    """The training diverged: the loss, or the weights or optimizer state, became NaN or infinite."""


Log = Callable[[str], None]


# --------------------------------------------------------------------------- one epoch


def train_one_epoch(
    model: nn.Module,
    data: InMemorySplit | StreamingSplit,
    method: Method,
    ctx: StepContext,
    optimizer: torch.optim.Optimizer,
    scaler: Any,
    *,
    batch_size: int,
    codec: MapCodec | None,
    map_name: str | None,
    augment: str | bool,
    shuffle_gen: torch.Generator,
    aug_gen: torch.Generator,
    autocast: Callable[[], ContextManager[Any]],
    desc: str,
    progress: bool,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    comm: Comm | None = None,
    replays: int = 1,
    channels_last: bool = False,
) -> dict[str, Any]:
    """One pass over the training split; returns loss, train score, attack share, samples,
    steps, and the learning rate of the first and of the last step (lr, lr_last).

    ``replays``: optimizer steps per batch (Free-AT's minibatch replays, ``--replays``): the
    method is called, backpropagated and stepped that many times on each batch; the loss and
    score of a batch are those of its last replay, ``samples`` counts each sample once, and
    ``steps`` and the attack share count optimizer steps. ``channels_last``: each batch's
    images in channels_last order (the model's weights already are, sattrain.accel).

    ``augment``: "crop+flip", "crop" or "none" (sattrain.data.prepare_batch).
    ``scheduler``: a per-step learning-rate scheduler (one-cycle), stepped after every
    optimizer step; per-epoch schedulers are the caller's to step.
    ``comm``: the processes of a distributed run (``model`` is then their
    DistributedDataParallel, ``data`` this process's part and ``batch_size`` its share of
    the batch): the non-finite-loss check is agreed by all of them every LOG_EVERY steps
    (so all stop at the same step), and loss, score, attack share and samples cover every
    process's samples; ``steps`` is per process (the same in each).
    """
    from satdata.clikit import progress_bar

    model.train()
    device = next(model.parameters()).device
    total = num_batches(data.n, batch_size)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device)
    first_bad = torch.full((), -1, dtype=torch.long, device=device)
    bad_value = torch.zeros((), device=device)
    all_logits: list[torch.Tensor] = []
    all_y: list[torch.Tensor] = []
    seen = 0
    attacked = 0
    steps = 0  # optimizer steps (batches x replays)
    batches = 0
    lr_first = lr_last = float(optimizer.param_groups[0]["lr"])
    bar = progress_bar(total, desc, "batch", enabled=progress)
    shared = comm is not None and comm.world.distributed

    def check(step: int) -> None:
        bad = int(first_bad)  # the one host sync per LOG_EVERY steps
        where, value = "", float(bad_value) if bad >= 0 else 0.0
        if shared:
            assert comm is not None
            found = [(r, b, v) for r, (b, v) in enumerate(comm.gather((bad, value), "checking the training loss"))
                     if b >= 0]
            if found:
                r, bad, value = min(found, key=lambda f: (f[1], f[0]))
                where = f" (process {r} of {comm.world.size})"
        if bad >= 0:
            raise NonFiniteLoss(
                f"epoch {ctx.epoch + 1} (t = {ctx.epoch}), step {bad + 1} of {total}{where}: the training loss is not "
                f"finite (loss is {value}): training diverged; try a lower --lr"
                f"{', or train in --precision fp32' if scaler is not None else ''}"
            )
        if progress:
            post = {"loss": f"{float(loss_sum) / max(1, seen):.4f}"}
            if not ctx.multilabel:
                post["acc"] = f"{float(correct) / max(1, seen):.3f}"
            bar.set_postfix(post)

    try:
        for step, raw in enumerate(data.batches(batch_size, shuffle_gen, map_name)):
            batch = prepare_batch(raw, codec, multilabel=ctx.multilabel, augment=augment, generator=aug_gen)
            if channels_last:
                batch = batch._replace(x=accel.to_memory_format(batch.x, True))
            for _ in range(replays):
                res, lr_last = _optimizer_step(model, batch, method, ctx, optimizer, scaler, scheduler, autocast)
                attacked += int(res.attacked)
                steps += 1
            b = batch.x.shape[0]
            loss_d = res.loss.detach().float()
            newly_bad = ~torch.isfinite(loss_d) & (first_bad < 0)
            bad_value = torch.where(newly_bad, loss_d, bad_value)
            first_bad = torch.where(newly_bad, step, first_bad)
            loss_sum += loss_d * b
            if ctx.multilabel:
                all_logits.append(res.logits.float())
                all_y.append(batch.y)
            else:
                correct += (res.logits.argmax(dim=1) == batch.y).sum()
            seen += b
            batches += 1
            bar.update(1)
            if batches % LOG_EVERY == 0:
                check(step)
        check(batches - 1)
    finally:
        bar.close()
    if seen == 0:
        raise SatkitError(f"epoch {ctx.epoch}: no training batch (fewer than 2 samples?)")
    if shared:  # every process's samples: sums over the processes
        assert comm is not None
        loss_total, correct_total, seen_total, attacked_total, steps_total = comm.sum(
            [float(loss_sum), float(correct), seen, attacked, steps], "adding up the epoch's training metrics")
        if ctx.multilabel:
            parts = comm.gather((torch.cat(all_logits).cpu(), torch.cat(all_y).cpu()), "gathering the training scores")
            train_score = mean_average_precision(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
        else:
            train_score = correct_total / seen_total
        return {"loss": loss_total / seen_total, "train_acc": train_score, "attack_share": attacked_total / steps_total,
                "samples": int(seen_total), "steps": steps, "lr": lr_first, "lr_last": lr_last}
    train_score = (mean_average_precision(torch.cat(all_logits), torch.cat(all_y)) if ctx.multilabel
                   else float(correct) / seen)
    return {"loss": float(loss_sum) / seen, "train_acc": train_score, "attack_share": attacked / steps,
            "samples": seen, "steps": steps, "lr": lr_first, "lr_last": lr_last}


def _optimizer_step(model: nn.Module, batch: Any, method: Method, ctx: StepContext, optimizer: torch.optim.Optimizer,
                    scaler: Any, scheduler: Any, autocast: Callable[[], ContextManager[Any]]) -> tuple[StepResult, float]:
    """One optimizer step of ``method`` on ``batch``: the loss, backward, the method's own
    after-backward update (Free-AT's perturbation), the step, the per-step schedule. Returns
    the method's result and the learning rate the step was taken with."""
    with autocast():
        res = method.fn(model, batch, ctx)
    optimizer.zero_grad(set_to_none=True)
    lr = float(optimizer.param_groups[0]["lr"])  # a Python float: no device sync
    accel.backward_step(res.loss, optimizer, scaler, between=res.after_backward)
    if scheduler is not None:
        if scaler is not None:
            # a step the scaler skipped (inf/nan gradients while it calibrates) still
            # advances the schedule, as it must to stay on its total; torch warns about it
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
                scheduler.step()
        else:
            scheduler.step()
    return res, lr


# --------------------------------------------------------------------------- the run


def _make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """Adam or SGD with the resolved lr, weight decay (and momentum for SGD)."""
    assert cfg.lr is not None and cfg.weight_decay is not None and cfg.momentum is not None
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _pick_eval_split(store: Store, requested: str | None) -> str:
    splits = store.info.splits
    if requested is not None:
        if requested not in splits:
            raise SatkitError(f"--eval-split: {store.path} has no split {requested!r} "
                              f"(splits: {', '.join(splits)})")
        chosen = requested
    else:
        found = [s for s in ("val", "test") if s in splits]
        if not found:
            raise SatkitError(f"{store.path}: no val or test split for the held-out evaluation; "
                              "pass --eval-split train to evaluate on (a subset of) training samples")
        chosen = found[0]
    if not splits[chosen]:
        raise SatkitError(f"--eval-split: {store.path} has no samples in split {chosen!r} to evaluate on "
                          f"(splits: {', '.join(f'{s} {n:,}' for s, n in splits.items())}); pass another")
    return chosen


def _best_state(ckpt: dict[str, Any], best: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """The best.pt dict for the epoch ``best`` records, whose model is ``ckpt["model"]``."""
    return {
        "model": ckpt["model"],
        "optimizer": None,
        "scheduler": None,
        "scaler": None,
        "epoch": int(best["epoch"]) + 1,
        "best": best,
        "model_spec": ckpt["model_spec"],
        "config": ckpt["config"],
        "rng": {},
        "extra": {**ckpt.get("extra", {}), "best_of": str(run_dir)},
    }


def _sync_best(run_dir: Path, ckpt: dict[str, Any], log: Log) -> None:
    """Make best.pt hold what checkpoint.pt's best record says (called on resume).

    best.pt is written just after checkpoint.pt in the epoch that set the record, so the
    only inconsistency a kill can leave is a best.pt one record behind a checkpoint whose
    own epoch is the best, and that checkpoint holds exactly the weights best.pt needs.
    """
    best = ckpt.get("best")
    if not best:
        return
    path = run_dir / BEST_NAME
    have = None
    if path.is_file():
        try:
            have = load_checkpoint(path).get("best")
        except SatkitError:
            have = None  # a torn or foreign file: rewritten below if we can
    if same_value(have, best):
        return
    if int(best["epoch"]) == int(ckpt["epoch"]) - 1:
        save_checkpoint(path, _best_state(ckpt, best, run_dir))
        log(f"note: rewrote {path} for epoch {int(best['epoch']) + 1} (the run stopped before it was written)")
    else:
        log(f"note: {path} does not hold the run's best epoch ({int(best['epoch']) + 1}), and its weights are "
            "not in checkpoint.pt; best.pt will follow the next better epoch")


def run_arrays(store: Store, maps: Sequence[str], eval_split: str) -> dict[str, str | None]:
    """The arrays a run trains and evaluates from, by name ('train/images', 'train/saliency/ink',
    'test/labels': a map by its name, not its array's), with their content digests (sha256).

    A resume compares these, not the whole store's digest: a map added to the store, or
    another map replaced, does not change them; a rebuilt store with other data, or a
    replaced map the run trains from, does.
    """
    named = [("train", "images", None), ("train", "labels", None)]
    named += [("train", "saliency", m) for m in maps]
    named += [(eval_split, "images", None), (eval_split, "labels", None)]
    out: dict[str, str | None] = {}
    for split, field_name, m in named:
        key = f"{split}/{field_name}" + (f"/{m}" if m else "")
        out[key] = (store.info.digests.get(store.array_key(split, field_name, m)) or {}).get("sha256")
    return out


def _check_same_arrays(run_dir: Path, ckpt_path: Path, extra: dict[str, Any], arrays: dict[str, str | None],
                       digest: str, store_path: str) -> None:
    """Refuse a resume whose store differs in an array the run trains or evaluates from."""
    saved = extra.get("arrays")
    if saved is None:  # a checkpoint from before per-array digests: the whole store must match
        saved_digest = extra.get("store_digest")
        if saved_digest != digest:
            raise SatkitError(f"{run_dir}: --resume with a store whose contents differ from the run's "
                              f"({store_path} digest {digest[:12]}, the run's {str(saved_digest)[:12]}; the run's "
                              "checkpoint predates per-array digests, so any change to the store counts)")
        return
    if not (isinstance(saved, dict) and all(isinstance(k, str) and (v is None or isinstance(v, str))
                                            for k, v in saved.items())):
        raise SatkitError(f"{ckpt_path}: damaged satkit checkpoint: 'extra' has arrays {repr(saved)[:80]}; expected "
                          "an object of array name -> sha256")
    for key in sorted(set(saved) | set(arrays)):
        was, now = saved.get(key), arrays.get(key)
        if was != now:
            what = (f"{key} is not among the arrays the run used" if key not in saved else
                    f"{key} is not in the store" if key not in arrays else
                    f"{key} has sha256 {str(now)[:12]}..., the run's {str(was)[:12]}...")
            parsed = parse_array_path(key)
            why = ("the map was replaced" if parsed is not None and parsed.field == MAPS_GROUP
                   else "the store was rebuilt or replaced")
            raise SatkitError(f"{run_dir}: --resume with a store whose contents differ from the run's in an array "
                              f"it trains or evaluates from: {what} ({store_path}: {why} since the run started); "
                              "start a new run")


def _restore(run_dir: Path, cfg: TrainConfig, digest: str, store_path: str, model: nn.Module,
             optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: Any,
             device: torch.device, log: Log, *, model_spec: dict[str, Any] | None = None,
             steps_per_epoch: int = 1, method_states: list[dict[str, Any]] | None = None,
             arrays: dict[str, str | None] | None = None, step_size_given: bool = True,
             ) -> tuple[int, dict[str, Any] | None, list[dict[str, Any]], TrainConfig]:
    """(epochs already done in run_dir, best record so far, metrics.jsonl records of those
    epochs, the run's config): (0, None, [], cfg) for a new run; otherwise the model,
    optimizer, scheduler and scaler are restored and best.pt checked (and repaired:
    _sync_best) once all is valid.

    The config returned is ``cfg`` but for one case: a run started when the multi-step
    methods' default --step-size was a fixed 2/255 (LEGACY_STEP_SIZE), resumed without
    --step-size (``step_size_given`` False) at an --eps where the default is now another
    (eps/4), continues with the step it started with (``_resumed_step``).

    A directory that holds a run needs --resume; resuming checks that the options (except
    those in RESUMABLE_CHANGES) and the contents of the arrays the run trains and evaluates
    from (``arrays``, see ``run_arrays``; a checkpoint that predates them: the whole store's
    ``digest``) are the run's, and that --epochs changes only under the constant schedule
    (the others are scaled to the epochs).

    Everything the checkpoint holds is validated before it is used, each failure one
    SatkitError naming the file: the options it records (as ``TrainConfig.resolved()``
    checks options), the network and classes (``model_spec`` against this run's), finite
    weights that fit the network, the optimizer state (parameter groups and buffers of
    the parameters' shapes, sattrain.checkpoint.check_optimizer_state), the scheduler state
    (consistent with the epochs done), the scaler state, and the best-epoch record.
    """
    ckpt_path = run_dir / CHECKPOINT_NAME
    if (ckpt_path.is_file() or (run_dir / CONFIG_JSON).is_file()) and not cfg.resume:
        raise SatkitError(f"{run_dir}: already holds a run; pass --resume to continue it, or choose another --out")
    if not cfg.resume:
        return 0, None, [], cfg
    if not ckpt_path.is_file():
        log(f"note: {run_dir} has no checkpoint yet; starting from scratch")
        return 0, None, [], cfg
    ckpt = load_checkpoint(ckpt_path, map_location=device)

    def damaged(what: str) -> SatkitError:
        return SatkitError(f"{ckpt_path}: damaged satkit checkpoint: {what}")

    saved = ckpt.get("config", {})
    try:
        saved_cfg = TrainConfig.from_json(saved).resolved()
    except SatkitError as e:
        raise damaged(f"the run options it records are invalid ({e})") from None
    saved_world = saved_cfg.world_size  # 1 for runs from before world_size was recorded
    if saved_world != cfg.world_size:
        how = (f"torchrun --nproc-per-node {saved_world} (x --nnodes: {saved_world} processes in all)"
               if saved_world > 1 else "one process (without torchrun, or torchrun --nproc-per-node 1)")
        raise SatkitError(f"{run_dir}: --resume in {cfg.world_size} process(es), but the run was trained in {saved_world}: "
                          f"each process trains on its own part of the samples with its own noise, so another number "
                          f"would not continue the same run; resume it in {how}")
    if not step_size_given:
        cfg = _resumed_step(cfg, saved_cfg, run_dir, log)
    diffs = resume_mismatches({"world_size": 1, **saved}, cfg.to_json())
    if diffs:
        raise SatkitError(f"{run_dir}: --resume with options other than the run's: " + "; ".join(diffs))
    saved_epochs = saved_cfg.epochs
    if cfg.schedule != "constant" and saved_epochs != cfg.epochs:
        raise SatkitError(f"--epochs {cfg.epochs}: the run in {run_dir} has a {cfg.schedule} schedule over "
                          f"{saved_epochs} epochs, and changing the epochs would change the learning rates of epochs "
                          f"already done; resume with --epochs {saved_epochs} or start a new run")
    done = ckpt["epoch"]  # an integer >= 0 (check_checkpoint): passes over the data (epochs but for Free-AT)
    if done > saved_cfg.passes:
        raise damaged(f"'epoch' says {done} epochs are done of a run of {saved_cfg.passes}")
    if done > cfg.passes:
        raise SatkitError(f"--epochs {cfg.epochs}: the run in {run_dir} has already done {done} epochs")
    spec = ckpt["model_spec"]
    for key, want in (model_spec or {}).items():
        have = spec.get(key)
        if have is not None and not same_value(have, want):
            raise SatkitError(f"{ckpt_path}: the checkpoint's network has {key} {repr(have)[:80]}, but this run's "
                              f"has {repr(want)[:80]} (a checkpoint of another network or store)")
    _check_same_arrays(run_dir, ckpt_path, ckpt.get("extra") or {}, arrays if arrays is not None else {}, digest,
                       store_path)
    best = ckpt.get("best")
    monitor_key = f"pgd{cfg.eval_steps}_monitor"
    if best is not None:
        value, clean, b_epoch = best.get(monitor_key), best.get("clean_acc"), best.get("epoch")
        if not (isinstance(b_epoch, int) and 0 <= b_epoch < done and _score(value) and (clean is None or _score(clean))):
            raise damaged(f"best record {repr(best)[:100]}; expected an epoch in [0, {done}) and scores "
                          f"{monitor_key} and clean_acc in [0, 1]")
    load_model_state(model, ckpt["model"], ckpt_path, spec)
    if ckpt.get("optimizer") is None:
        raise SatkitError(f"{ckpt_path}: holds no optimizer state (a best.pt?); --resume continues a run's "
                          f"{CHECKPOINT_NAME}")
    sched_state = ckpt.get("scheduler")
    if sched_state is not None:
        check_scheduler_state(sched_state, scheduler, ckpt_path,
                              done * steps_per_epoch if step_per_step(str(cfg.schedule)) else done)
    elif cfg.schedule != "constant":
        raise damaged(f"no scheduler state for the {cfg.schedule} schedule")
    check_optimizer_state(ckpt["optimizer"], optimizer, ckpt_path,
                          last_lr=list(sched_state["_last_lr"]) if sched_state and "_last_lr" in sched_state else None)
    scaler_state = ckpt.get("scaler") if scaler is not None else None
    if scaler_state:
        check_scaler_state(scaler_state, ckpt_path)
    for what, obj, state in (("optimizer", optimizer, ckpt["optimizer"]), ("scheduler", scheduler, sched_state),
                             ("scaler", scaler, scaler_state)):
        if obj is None or not state:
            continue
        try:
            obj.load_state_dict(state)
        except (ValueError, KeyError, TypeError, RuntimeError, IndexError, AttributeError) as e:
            raise damaged(f"the {what} state does not load ({type(e).__name__}: {str(e)[:120]})") from None
    saved_states = ckpt.get("method_state")
    if saved_states is not None and method_states is not None:
        method_states[:] = _check_method_states(saved_states, cfg, damaged)
    history = read_metrics_lines(run_dir / METRICS_JSONL, done)
    _sync_best(run_dir, ckpt, log)
    return done, best, history, cfg


def _resumed_step(cfg: TrainConfig, saved: TrainConfig, run_dir: Path, log: Log) -> TrainConfig:
    """``cfg`` with the step size of the run being resumed (``saved``) when the run recorded
    the old default (a fixed 2/255, LEGACY_STEP_SIZE) and this invocation's default (eps/4)
    differs: the same command line continues the run with the step it started with. Called
    only when --step-size was not given; anything else is left to the options' comparison."""
    if (cfg.method in SINGLE_STEP_METHODS or cfg.method in REPLAY_METHODS or saved.step_size != LEGACY_STEP_SIZE
            or cfg.step_size == saved.step_size):
        return cfg
    assert cfg.step_size is not None
    log(f"note: {run_dir} was started when the default --step-size was 2/255 at any --eps; it continues with "
        f"2/255 (the default is now --eps/4, {format_eps(cfg.step_size)} at --eps {format_eps(cfg.eps)}: a new run "
        f"gets it)")
    return replace(cfg, step_size=saved.step_size)


def _check_method_states(states: Any, cfg: TrainConfig, damaged: Callable[[str], SatkitError]) -> list[dict[str, Any]]:
    """A checkpoint's per-process method state (Free-AT's perturbation): one dict of named
    finite tensors per process, each within the --eps ball."""
    if not (isinstance(states, list) and len(states) == cfg.world_size and all(
            isinstance(d, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in d.items())
            for d in states)):
        raise damaged(f"'method_state' is {repr(states)[:80]}; expected one dict of named tensors per process "
                      f"({cfg.world_size})")
    for d in states:
        for k, v in d.items():
            fits = v.is_floating_point() and v.dim() == 4 and v.numel() > 0
            if not (fits and bool(torch.isfinite(v).all()) and float(v.abs().max()) <= float(cfg.eps) + 1e-6):
                raise damaged(f"'method_state' {k!r} is not a finite perturbation within --eps of NCHW shape")
    return states


def _score(v: Any) -> bool:
    """A monitor score: a finite number in [0, 1]."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and 0 <= v <= 1


def _check_finite_training(model: nn.Module, optimizer: torch.optim.Optimizer, stats: dict[str, Any],
                           epoch: int) -> None:
    """Raise NonFiniteLoss when an epoch ended with a non-finite mean loss, weights or optimizer
    state (the last step's update can overflow after a finite loss). One device sync per epoch."""
    where = f"epoch {epoch + 1} (t = {epoch}), after step {stats['steps']} of {stats['steps']}"
    if not math.isfinite(stats["loss"]):
        raise NonFiniteLoss(f"{where}: the epoch's mean training loss is not finite ({stats['loss']}): training "
                            "diverged; try a lower --lr")
    for what, state in (("weights hold", model.state_dict()), ("optimizer state holds", optimizer.state_dict()["state"])):
        bad = non_finite_tensors(state)
        if bad:
            raise NonFiniteLoss(f"{where}: the {what} NaN or infinite values ({len(bad)} tensor(s), e.g. {bad[0]}): "
                                "training diverged; try a lower --lr")


# --early-stop: Wong et al.'s test for catastrophic overfitting of FGSM training (their
# train_fgsm.py: PGD accuracy down by more than 0.2 from the epoch before), on the monitor.
COLLAPSE_DROP = 0.2


def _collapsed(history: list[dict[str, Any]], monitor_key: str) -> dict[str, Any] | None:
    """The drop of the held-out monitor over the last epoch when it exceeds COLLAPSE_DROP."""
    if len(history) < 2:
        return None
    before, now = history[-2].get(monitor_key), history[-1].get(monitor_key)
    if not (isinstance(before, float) and isinstance(now, float)) or not before - now > COLLAPSE_DROP:
        return None
    return {"epoch": history[-1]["epoch"], "from": before, "to": now, "rule": f"the monitor fell by more than "
            f"{COLLAPSE_DROP} in one epoch (Wong et al.'s early stopping)"}


def run_summary(run_dir: Path, store: Store, *, split: str, samples: int, device: torch.device, multilabel: bool,
                log: Log, checkpoint: str = CHECKPOINT_NAME) -> dict[str, Any]:
    """Evaluate the run's ``checkpoint`` (checkpoint.pt; best.pt after an early stop) with the
    strong protocol (sattrain.evaluation) into summary.json; returns metrics.json's "summary" entry.

    AutoAttack and PGD at 8/255 on ``samples`` samples of ``split`` (a
    seeded subset, seed 0, so every run of a store is summarised on the same images).
    Multi-label models get PGD alone (AutoAttack is defined for single-label classifiers).
    """
    from sattrain import evaluation as ev_mod

    attacks = ("pgd",) if multilabel else SUMMARY_ATTACKS
    with warnings.catch_warnings():
        # a subset is the point here, and the summary line states its size; a best.pt chosen on
        # this split (after --early-stop) gets the run's own "selection" note below
        warnings.simplefilter("ignore", ev_mod.PartialEvaluationWarning)
        warnings.simplefilter("ignore", ev_mod.SelectionBiasWarning)
        result = ev_mod.evaluate(run_dir / checkpoint, store, protocol="strong", split=split, samples=samples, seed=SUMMARY_SEED, device=str(device),
                                 attacks=attacks, eps=SUMMARY_EPS, out=run_dir / SUMMARY_JSON,
                                 progress=lambda line: log(f"summary: {line}"))
    return {
        "protocol": result.get("protocol"),
        "samples": int(result["samples"]),
        "split": split,
        **({"split_size": int(result["split_size"])} if result.get("split_size") is not None else {}),
        "complete": bool(result.get("complete", True)),
        "clean": result.get("clean"),
        "robust": dict(result.get("robust") or {}),
        "headline": result.get("headline"),
        "file": SUMMARY_JSON,
    }


def _fmt(v: Any) -> str:
    """A score with four decimals; anything else (None: not measured) as text."""
    return f"{v:.4f}" if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


def _finish_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any, cfg: TrainConfig, *,
                  epoch: int, stats: dict[str, Any], eval_data: EvalSplit, device: torch.device, multilabel: bool,
                  map_name: str | None, p: float, uses_p: bool, monitor: dict[str, Any], monitor_key: str,
                  monitor_label: str, score: str, best: dict[str, Any] | None, history: list[dict[str, Any]],
                  metrics_path: Path, run_dir: Path, model_spec: dict[str, Any], digest: str,
                  arrays: dict[str, str | None], eval_split: str, t0: float, train_seconds: float,
                  replicas: dict[str, Any] | None, log: Log,
                  method_states: list[dict[str, Any]] | None = None) -> dict[str, Any] | None:
    """The end of an epoch (rank 0's): the held-out monitor, the metrics line, checkpoint.pt and
    best.pt, the log line; returns the best record so far."""
    ev = evaluate_heldout(model, eval_data, eps_list=(cfg.eps,), steps=cfg.eval_steps, step_size=cfg.monitor_step_size,
                          multilabel=multilabel, generator=make_generator(device, derive_seed(cfg.seed, epoch, "eval")))
    rec = {
        "epoch": epoch,
        "map": map_name,
        "p_t": p if uses_p else None,
        "loss": stats["loss"],
        "train_acc": stats["train_acc"],
        "lr": stats["lr"],
        "lr_last": stats["lr_last"],
        "clean_acc": ev["clean"],
        monitor_key: ev[f"pgd@{format_eps(cfg.eps)}"],
        "monitor": monitor,
        "metric": "mAP" if multilabel else "accuracy",
        "attack_share": stats["attack_share"],
        "samples": stats["samples"],
        **({"replicas": replicas} if replicas is not None else {}),
        **({"replays": cfg.replays_per_batch} if cfg.replays_per_batch > 1 else {}),
        "seconds": round(time.perf_counter() - t0, 3),
        # training images per second; with Free-AT's replays each replay is one more image
        # trained on (a forward-backward pass), so the number compares with other methods'
        "images_per_s": round(stats["samples"] * cfg.replays_per_batch / train_seconds, 1),
    }
    value = rec[monitor_key]
    new_best = math.isfinite(value) and (best is None or value > best[monitor_key])
    if new_best:  # strictly better: a tie keeps the earlier epoch
        best = {"epoch": epoch, monitor_key: value, "clean_acc": rec["clean_acc"], "checkpoint": BEST_NAME}
    history.append(rec)
    append_line(metrics_path, json.dumps(rec) + "\n")
    # metrics line, then checkpoint.pt, then best.pt: a kill before checkpoint.pt redoes
    # this epoch on resume; a kill between the two is repaired on resume (_sync_best).
    ckpt = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": epoch + 1,
        "best": best,
        "model_spec": model_spec,
        "config": cfg.to_json(),
        "rng": _rng_state(device),
        "extra": {"store_digest": digest, "arrays": arrays, "method": cfg.method, "eval_split": eval_split},
        **({"method_state": method_states} if method_states and any(method_states) else {}),
    }
    save_checkpoint(run_dir / CHECKPOINT_NAME, ckpt)
    if new_best:
        assert best is not None
        save_checkpoint(run_dir / BEST_NAME, _best_state(ckpt, best, run_dir))
    log(f"epoch {epoch + 1}/{cfg.passes}: loss {rec['loss']:.4f}, train {score} {rec['train_acc']:.4f}, "
        f"lr {rec['lr']:.4g}" + (f"..{rec['lr_last']:.4g}" if rec["lr_last"] != rec["lr"] else "")
        + (f", p_t {p:.3f}" if uses_p else "")
        + f"; held-out clean {score} {rec['clean_acc']:.4f}, monitor {monitor_label} {value:.4f}"
        + (" (best)" if new_best else "")
        + f" ({rec['seconds']:.1f} s, {rec['images_per_s']:,.0f} img/s)")
    return best


def _holdout_record(cfg: TrainConfig, holdout_idx: np.ndarray) -> dict[str, Any] | None:
    """The record of --holdout in config.json (None without it): how many, the seed, which samples."""
    if not cfg.holdout:
        return None
    return {"split": "train", "samples": int(len(holdout_idx)), "seed": HOLDOUT_SEED,
            "indices_blake2b": _indices_digest(holdout_idx),
            "note": "taken out of training; the per-epoch monitor (and so best.pt) uses them, the summary --eval-split"}


def _selection_note(cfg: TrainConfig, eval_split: str) -> str:
    """The "selection" of the monitor in metrics.json: on what best.pt (and the "best" numbers) were chosen."""
    if cfg.holdout:
        return (f"best.pt and \"best\" were chosen on {cfg.holdout} samples held out of the train split (--holdout), "
                f"not on the {eval_split} split the summary evaluates")
    if eval_split == "test":
        return ("best.pt and \"best\" were chosen on the test split: their numbers on test are selection-biased "
                "(optimistic); rerun with --holdout N to choose on samples held out of training")
    if eval_split == "train":
        return ("best.pt and \"best\" were chosen on samples of the train split (--eval-split train), which may be "
                "trained on; --holdout N holds samples out of training for the monitor")
    return f"best.pt and \"best\" were chosen on the {eval_split} split; evaluate best.pt on test for a number not used to choose it"


def _same_split_note(split: str) -> str:
    """The summary's note after --early-stop without --holdout: it evaluates best.pt on the split it was chosen on."""
    return (f"the summary evaluates best.pt, which the monitor chose on this same {split} split: the number is "
            "selection-biased (optimistic); --holdout N chooses it on samples held out of training")


def _silent(msg: str) -> None:
    """The log of a process other than rank 0: rank 0 alone logs."""


def _to_cpu(obj: Any) -> Any:
    """``obj`` (dicts, lists, tuples of tensors and plain values) with every tensor on the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _indices_digest(indices: np.ndarray) -> str:
    import hashlib

    return hashlib.blake2b(np.ascontiguousarray(indices, dtype=np.int64).tobytes(), digest_size=16).hexdigest()


def _check_parts(loaded: list[dict[str, Any]], train_idx: np.ndarray, world_size: int, seed: int) -> dict[str, Any]:
    """What config.json records of the processes' parts of the training samples, after checking
    that the parts they loaded are the seeded partition: disjoint, together every sample."""
    if any(p.get("placement") == "stream" for p in loaded):
        return {"placement": "stream", "parts": "per epoch: each process reads its run of the epoch's shared "
                                                 "chunk order (sattrain.data.StreamingSplit)"}
    want = [partition(train_idx, world_size, r, seed) for r in range(world_size)]
    for r, (got, part) in enumerate(zip(loaded, want)):
        if got.get("indices_blake2b") != _indices_digest(part):
            raise SatkitError(f"process {r} of {world_size} loaded other training samples than its part "
                              f"({got.get('samples')} samples, expected {len(part)}); the processes disagree")
    union = np.sort(np.concatenate(want))
    if not np.array_equal(union, np.sort(np.asarray(train_idx, dtype=np.int64))):
        raise SatkitError("the processes' parts of the training samples overlap or miss samples")  # a bug if ever
    return {"placement": loaded[0].get("placement"), "checked": "disjoint; together every training sample once",
            "parts": [{"samples": int(p["samples"]), "indices_blake2b": p["indices_blake2b"]} for p in loaded]}


def train(cfg: TrainConfig, log: Log | None = None, *, storage_options: dict[str, Any] | None = None) -> Path:
    """Train per ``cfg``; returns the run directory (see the module docstring for its files).

    Raises SatkitError (one line, naming the option or file) for bad options, a store the
    method cannot use, an existing run without --resume, or a non-finite loss.

    Under torchrun (WORLD_SIZE > 1) every process calls this ("Many processes" in the
    module docstring); ``cfg.world_size`` is set from the environment. A process other than
    rank 0 logs nothing, writes nothing, and raises ``sattrain.distributed.PeerFailed``
    when another process failed and says why.
    """
    from tqdm.auto import tqdm

    log = log or tqdm.write
    world = world_from_env()
    if not world.main:
        log = _silent
    given = cfg  # the options as the user gave them (None where defaulted)
    if cfg.world_size not in (1, world.size):
        raise SatkitError(f"world size {cfg.world_size}: this process is one of {world.size} (torchrun's WORLD_SIZE); "
                          "train() records the launch's own")
    try:
        cfg = replace(cfg, world_size=world.size).resolved()
    except SatkitError as e:
        if world.main:
            raise
        # every process has the same options: rank 0 alone says what is wrong with them
        raise PeerFailed(f"{world.who()}: {e}") from None
    method = get_method(cfg.method)
    short = short_attack_warning(given)
    if short:
        log(short)
    if cfg.beta is not None and not method.uses_beta and cfg.beta != 0:
        log(f"note: --beta is not used by --method {cfg.method}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = rank_device(resolve_device(cfg.device), world)
    precision = cfg.precision
    if cfg.amp:  # the older flag: fp16 on CUDA
        if device.type == "cuda":
            precision = "fp16"
        elif world.main:
            log("note: --amp has no effect on the CPU (float32 is used; CPU autocast to bfloat16 "
                "is rarely faster and would change the numbers)")
    acc = accel.resolve(device, precision=precision, channels_last=cfg.channels_last, compile=cfg.compile)
    comm = start_processes(world, device)
    held: list[int] = []  # the run directory's lock (rank 0), released when the run ends
    try:
        return _train(cfg, method, acc, comm, log, storage_options, held, step_size_given=given.step_size is not None)
    finally:
        for fd in held:
            os.close(fd)
        comm.close()


def _train(cfg: TrainConfig, method: Method, acc: accel.Accel, comm: Comm, log: Log,
           storage_options: dict[str, Any] | None, held: list[int], *, step_size_given: bool = True) -> Path:
    """train() from the store on, in this process of ``comm`` (for one process, all of it).
    ``step_size_given``: whether the user gave --step-size (else a resume may keep the run's
    old default step, ``_resumed_step``)."""
    device = acc.device
    world = comm.world
    show = cfg.progress and world.main  # progress bars: rank 0's alone
    with comm.stage("opening the store and the run directory"):
        # storage_options (endpoint, credentials of a store at a URL) are not saved with the run:
        # they may hold secrets; a resume is given them again.
        store = open_store(cfg.store, storage_options=storage_options)
        info = store.info
        # Hold the store's reader lock for the run: `satdata gc` leaves a replaced map's old
        # arrays alone meanwhile (docs/store-format.md, "Readers and writers together").
        store.hold_reader_lock()
        if "train" not in info.splits:
            raise SatkitError(f"{store.path}: no train split (splits: {', '.join(info.splits)})")
        multilabel = info.label_kind == "multi"
        maps = choose_maps(store, cfg.maps, cfg.method, method.needs_map)
        codecs = {m: map_codec(store, m) for m in maps}
        # What the run actually uses is what it records: the maps, and --augment auto resolved
        # against the store (no flip for images a mirror changes, e.g. digits).
        cfg = replace(cfg, maps=maps, augment=resolve_augment(str(cfg.augment), bool(getattr(info, "hflip", True))))
        eval_split = _pick_eval_split(store, cfg.eval_split)
        digest = store_digest(info)
        arrays = run_arrays(store, maps, eval_split)
        num_classes = len(info.classes)
        model_spec = {"name": cfg.model, "num_classes": num_classes, "label_kind": info.label_kind,
                      "image_size": list(info.image_size), "classes": list(info.classes)}
        # --holdout: samples of the train split taken out for the monitor (HOLDOUT_SEED: the same in
        # every process and every run); --train-samples draws from the rest (without --holdout the
        # pool is the whole split, pool[i] == i, and the subset is what it always was)
        pool, holdout_idx = split_holdout(info.splits["train"], cfg.holdout, HOLDOUT_SEED)
        train_idx = pool[select_indices(len(pool), cfg.train_samples, derive_seed(cfg.seed, "train-subset"))]
        # each process trains on epoch_samples of its part in batches of its share of --batch-size
        local_batch = cfg.batch_size // world.size
        steps_per_epoch = num_batches(epoch_samples(len(train_idx), world.size), local_batch)
        if len(train_idx) < 2:
            raise SatkitError(f"{store.path}: the train split has {len(train_idx)} sample(s); training needs at least "
                              "two (batch norm)")
        if world.distributed and steps_per_epoch == 0:
            raise SatkitError(f"--train-samples: {len(train_idx)} training samples over {world.size} processes leave "
                              "fewer than two per process (batch norm needs two); train on more or in fewer processes")
        # Build the model first: an unknown --model fails before any data is read.
        torch.manual_seed(derive_seed(cfg.seed, "init"))
        # channels_last (sattrain.accel) re-lays the weights in place: the optimizer, the
        # checkpoints and the evaluation use this same module
        accel.configure_backends(device)
        model = accel.prepare_model(create_model(cfg.model, num_classes).to(device), channels_last=acc.channels_last)
        optimizer = _make_optimizer(cfg, model)
        assert cfg.schedule is not None
        # per-step schedules count optimizer steps: Free-AT takes --replays of them per batch
        scheduler = make_scheduler(cfg.schedule, optimizer, epochs=cfg.passes,
                                   steps_per_epoch=steps_per_epoch * cfg.replays_per_batch)
        per_step = step_per_step(cfg.schedule)
        scaler = acc.grad_scaler()  # fp16 only

        run_dir = Path(cfg.out) if cfg.out else default_run_dir(cfg.method, cfg.model, cfg.seed, info.dataset)
        start_epoch, best, history = 0, None, []
        # what the method keeps for the run (Free-AT's perturbation), per process: checkpointed
        # with the run so that --resume continues it exactly
        method_states: list[dict[str, Any]] = [{} for _ in range(world.size)]
        if world.main:  # rank 0 alone reads and writes the run directory
            check_run_dir(run_dir)
            lock_run_dir(run_dir, held)
            start_epoch, best, history, cfg = _restore(
                run_dir, cfg, digest, store.path, model, optimizer, scheduler, scaler, device, log,
                model_spec=model_spec, steps_per_epoch=steps_per_epoch * cfg.replays_per_batch, arrays=arrays,
                method_states=method_states, step_size_given=step_size_given)
            if start_epoch:
                log(f"resuming {run_dir} after epoch {start_epoch} of {cfg.passes}")
            make_run_dir(run_dir)
            lock_run_dir(run_dir, held)
    metrics_path = run_dir / METRICS_JSONL

    if world.distributed:
        # a resumed run's step size is rank 0's (_resumed_step: it may keep the run's old default)
        cfg = replace(cfg, step_size=comm.broadcast(cfg.step_size, "sharing the run's step size"))
        # the processes must train the same run from the same data (on several machines, each
        # opened its own copy of the store: its contents must match)
        comm.same({"options": {k: v for k, v in cfg.to_json().items()
                               if k not in ("store", "out", "progress", "threads", "memory_budget", "device")},
                   "arrays": arrays, "train_samples": len(train_idx), "train_indices": _indices_digest(train_idx)},
                  "the run's options and store")
        # --resume: rank 0 restored the checkpoint; the others take its state (the model's
        # weights are also broadcast by DistributedDataParallel when it wraps the model). RNG
        # states need no sharing: every stream is seeded from (seed, epoch, stream, rank).
        state = None
        if world.main and start_epoch:
            state = _to_cpu({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                             "scheduler": scheduler.state_dict(),
                             "scaler": scaler.state_dict() if scaler is not None else None})
        shared = comm.broadcast({"start_epoch": start_epoch, "state": state, "method_states": method_states},
                                "sharing the checkpoint's state")
        method_states = shared["method_states"]
        if not world.main:
            start_epoch = int(shared["start_epoch"])
            if shared["state"] is not None:
                st = shared["state"]
                model.load_state_dict(st["model"])
                optimizer.load_state_dict(st["optimizer"])
                scheduler.load_state_dict(st["scheduler"])
                if scaler is not None and st["scaler"]:
                    scaler.load_state_dict(st["scaler"])

    # Data: the training split (or a seeded subset of it; this process's part of it) and, on
    # rank 0, the monitor's fixed held-out subset: of --holdout's samples of the train split,
    # else of the evaluation split.
    partition_seed = derive_seed(cfg.seed, "partition")
    monitor_split = "train" if cfg.holdout else eval_split  # the split the monitor's samples are read from
    with comm.stage("loading the data"):
        if world.main:
            if cfg.holdout:
                eval_idx = holdout_idx[select_indices(len(holdout_idx), cfg.eval_samples or None, EVAL_SUBSET_SEED)]
            else:
                eval_idx = select_indices(info.splits[eval_split], cfg.eval_samples or None, EVAL_SUBSET_SEED)
            if len(eval_idx) * sample_bytes(store, monitor_split, ()) > cfg.memory_budget:
                raise SatkitError(f"--eval-samples: {len(eval_idx):,} held-out samples exceed --memory-budget; "
                                  "ask for fewer")
        train_data = open_train_split(store, "train", maps, train_idx, device, cfg.memory_budget, progress=show,
                                      rank=world.rank, world_size=world.size, seed=partition_seed)
        if world.main:
            eval_data = EvalSplit(load_split(store, monitor_split, (), eval_idx, progress=show), device)
    processes: dict[str, Any] = comm.describe()
    if world.distributed:
        mine = ({"placement": "stream"} if isinstance(train_data, StreamingSplit) else
                {"placement": train_data.placement, "samples": int(train_data.part),
                 "indices_blake2b": _indices_digest(train_data.indices)})
        loaded = comm.gather(mine, "recording the processes' parts of the data")
        with comm.stage("checking the processes' parts of the data"):
            if world.main:
                processes.update({"batch_size_per_process": local_batch,
                                  "samples_per_process_per_epoch": epoch_samples(len(train_idx), world.size),
                                  "padding": "a part one sample short repeats one of its samples each epoch",
                                  **_check_parts(loaded, train_idx, world.size, partition_seed)})

    uses_p = method.needs_map
    score = "mAP" if multilabel else "acc"
    monitor_key = f"pgd{cfg.eval_steps}_monitor"
    monitor_label = f"pgd{cfg.eval_steps}@{format_eps(cfg.eps)}"
    monitor: dict[str, Any] = {}
    with comm.stage("writing the run's configuration"):
        if world.main:
            per = (f" in {world.size} processes ({train_data.n:,} samples and batches of {local_batch} each)"
                   if world.distributed else "")
            held_out = (f"monitor on {eval_data.n:,} of {cfg.holdout:,} held out of train (--holdout), summary on "
                        f"{eval_split}" if cfg.holdout else f"held-out {eval_split} {eval_data.n:,}")
            log(f"{store.path}: train {len(train_idx):,} samples ({train_data.placement}){per}, "
                f"{held_out}; {cfg.method} on {cfg.model}, {device}"
                + (f", maps {', '.join(maps)}" if maps else "")
                + f"; recipe {cfg.recipe}: {cfg.optimizer} lr {cfg.lr:g}, {cfg.schedule} schedule, "
                  f"attacks in BN {cfg.attack_bn} mode, augment {cfg.augment}")
            if monitor_split == "test":
                why = "--eval-split test" if cfg.eval_split == "test" else "the store has no val split"
                log(f"note: best.pt is chosen on the test split ({why}), the split the summary evaluates: best.pt's "
                    "numbers on test (and metrics.json's \"best\") are selection-biased, optimistic; pass --holdout N "
                    "to choose it on N samples held out of training")
            write_json_atomic(run_dir / CONFIG_JSON, {
                "options": cfg.to_json(),
                "resumed_after_epoch": start_epoch if start_epoch else None,
                "store": {"path": store.path, "dataset": info.dataset, "digest": digest, "arrays": arrays,
                          "label_kind": info.label_kind,
                          "image_size": list(info.image_size), "classes": list(info.classes),
                          "hflip": bool(getattr(info, "hflip", True)),
                          "maps": {m: {"kind": c.kind, "encoding": c.encoding} for m, c in codecs.items()}},
                "data": {"train_split": "train", "train_samples": len(train_idx), "placement": train_data.placement,
                         "eval_split": eval_split, "eval_samples": eval_data.n, "steps_per_epoch": steps_per_epoch,
                         "monitor_split": "holdout" if cfg.holdout else eval_split,
                         "holdout": _holdout_record(cfg, holdout_idx)},
                "processes": processes,
                "method": {"name": method.name, "summary": method.summary, "needs_map": method.needs_map},
                "model_spec": model_spec,
                "accel": acc.describe(),
                "amp_active": acc.precision != "fp32",  # mixed precision (older readers)
                "environment": environment(device),
                "git": git_revision(),
                "command": sys.argv,
                "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            })

            write_text_atomic(metrics_path, "".join(json.dumps(r) + "\n" for r in history))
            if start_epoch < cfg.passes:
                # a resumed run with epochs left: the end-of-run files of its earlier end no longer
                # describe checkpoint.pt (and must not say the run is finished if it now stops early);
                # they are written again when this run ends
                for name in (METRICS_JSON, SUMMARY_JSON):
                    (run_dir / name).unlink(missing_ok=True)
            monitor = {"key": monitor_key, "attack": "pgd", "eps": format_eps(cfg.eps), "steps": cfg.eval_steps,
                       "step_size": format_eps(cfg.monitor_step_size), "random_start": True, "restarts": 1,
                       "loss": "bce" if multilabel else "ce", "split": "holdout" if cfg.holdout else eval_split,
                       "samples": eval_data.n, "subset_seed": EVAL_SUBSET_SEED,
                       **({"holdout": {"of": "train", "samples": cfg.holdout, "seed": HOLDOUT_SEED}}
                          if cfg.holdout else {})}
    autocast: Callable[[], ContextManager[Any]] = acc.autocast
    net = comm.wrap(model)  # DistributedDataParallel under torchrun; the model itself in one process
    # torch.compile (when asked) around DDP, as torch recommends; the training steps only
    net = accel.prepare_model(net, channels_last=False, compile_mode=acc.compile)

    epoch = start_epoch
    stopped: dict[str, Any] | None = None
    method_state = {k: v.to(device) for k, v in method_states[world.rank].items()}
    try:
        for epoch in range(start_epoch, cfg.passes):
            t0 = time.perf_counter()
            # per process: the global stream, perturbations, shuffling, augmentation (comm.seed
            # adds the rank); shared: the map of the epoch and the per-batch coin
            torch.manual_seed(comm.seed(cfg.seed, epoch, "global"))
            map_name = maps[random.Random(derive_seed(cfg.seed, epoch, "map")).randrange(len(maps))] if maps else None
            p = curriculum_p(epoch, cfg.alpha)
            ctx = StepContext(epoch=epoch, p=p, eps0=cfg.eps0, eps=cfg.eps, step_size=cfg.step_size, steps=cfg.steps,
                              beta=cfg.beta, multilabel=multilabel,
                              generator=make_generator(device, comm.seed(cfg.seed, epoch, "perturb")),
                              coin=make_generator("cpu", derive_seed(cfg.seed, epoch, "coin")),
                              attack_bn=str(cfg.attack_bn), state=method_state)
            if isinstance(train_data, StreamingSplit):
                train_data.set_epoch(epoch)
            with comm.collective(f"training epoch {epoch + 1}"):
                stats = train_one_epoch(
                    net, train_data, method, ctx, optimizer, scaler,
                    batch_size=local_batch, codec=codecs.get(map_name) if map_name else None, map_name=map_name,
                    augment=str(cfg.augment), shuffle_gen=make_generator("cpu", comm.seed(cfg.seed, epoch, "shuffle")),
                    aug_gen=make_generator(device, comm.seed(cfg.seed, epoch, "augment")), autocast=autocast,
                    desc=f"epoch {epoch + 1}/{cfg.passes}", progress=show, scheduler=scheduler if per_step else None,
                    comm=comm, replays=cfg.replays_per_batch, channels_last=acc.channels_last,
                )
            if not per_step:
                scheduler.step()
            _check_finite_training(model, optimizer, stats, epoch)
            replicas = None
            if world.distributed:  # DistributedDataParallel keeps the replicas equal: checked, not assumed
                weights = params_digest(model)
                comm.same(weights, f"the model's weights after epoch {epoch + 1}")
                replicas = {"processes": world.size, "params_blake2b": weights, "equal": True}
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            train_seconds = time.perf_counter() - t0
            states = [_to_cpu(method_state)]
            if world.distributed and method_state:
                states = comm.gather(states[0], "gathering the methods' state")
            # rank 0 evaluates and writes; the others wait for it at the end of the stage
            with comm.stage(f"evaluating and saving epoch {epoch + 1}"):
                if world.main:
                    best = _finish_epoch(
                        model, optimizer, scheduler, scaler, cfg, epoch=epoch, stats=stats, eval_data=eval_data,
                        device=device, multilabel=multilabel, map_name=map_name, p=p, uses_p=uses_p,
                        monitor=monitor, monitor_key=monitor_key, monitor_label=monitor_label, score=score, best=best,
                        history=history, metrics_path=metrics_path, run_dir=run_dir, model_spec=model_spec,
                        digest=digest, arrays=arrays, eval_split=eval_split, t0=t0, train_seconds=train_seconds,
                        replicas=replicas, method_states=states, log=log)
                    stopped = _collapsed(history, monitor_key) if cfg.early_stop else None
            if cfg.early_stop:
                stopped = comm.broadcast(stopped, "deciding whether to stop early") if world.distributed else stopped
                if stopped is not None:
                    if world.main:
                        same = "" if cfg.holdout else (f" (best.pt was chosen on the {eval_split} split, the one the "
                                                       f"summary evaluates it on: an optimistic number)")
                        log(f"early stop after epoch {epoch + 1}: the monitor {monitor_label} fell from "
                            f"{stopped['from']:.4f} to {stopped['to']:.4f} in one epoch (catastrophic overfitting, "
                            f"Wong et al.); best.pt keeps epoch {best['epoch'] + 1 if best else '?'}, and the summary "
                            f"evaluates it{same}")
                    break
    except NonFiniteLoss as e:
        if not world.main:  # every process stops at the same step; rank 0 says so
            raise PeerFailed(f"{world.who()}: {e}") from None
        # nothing of the diverged epoch was written: checkpoint.pt (and best.pt) keep the last
        # finite epoch, and no metrics.json claims the run is finished
        kept = (f"{run_dir / CHECKPOINT_NAME} keeps epoch {epoch} (the last finite one)" if epoch > 0
                else f"no checkpoint was saved in {run_dir}")
        raise NonFiniteLoss(f"{e}; {kept}, and the run is not finished (start a new run with other options)") from None

    if not world.main:
        return run_dir
    comm.close()  # the training is over: the other processes may go; the summary is rank 0's alone

    last = history[-1] if history else {}
    final: dict[str, Any] = {
        "metric": "mAP" if multilabel else "accuracy",
        "summary": None,
        "best": best,
        "last": {"epoch": last.get("epoch"), monitor_key: last.get(monitor_key), "clean_acc": last.get("clean_acc"),
                 "checkpoint": CHECKPOINT_NAME},
        "monitor": {**monitor, "note": "cheap per-epoch monitoring for watching the run and choosing best.pt, "
                                       "not the model's robustness (that is the summary, or sattrain eval)",
                    "selection": _selection_note(cfg, eval_split)},
        "epochs": cfg.epochs,
        "method": cfg.method,
        "model": cfg.model,
        "maps": list(maps),
        "recipe": cfg.recipe,
        "optimizer": cfg.optimizer,
        "lr": cfg.lr,
        "schedule": cfg.schedule,
        "attack_bn": cfg.attack_bn,
        "augment": cfg.augment,
        "final_loss": last.get("loss"),
        **({"stopped_early": {**stopped, "summary_of": BEST_NAME,
                              **({} if cfg.holdout else {"selection": _same_split_note(eval_split)})}}
           if stopped else {}),
        "train_seconds": round(sum(r["seconds"] for r in history), 3),
    }
    if best is not None:
        log(f"best epoch {best['epoch'] + 1}: monitor {monitor_label} {best[monitor_key]:.4f}, "
            f"held-out clean {score} {best['clean_acc']:.4f} -> {run_dir / BEST_NAME}")
    if not cfg.summary_samples:
        final["summary_skipped"] = "--summary-samples 0"
        write_json_atomic(run_dir / METRICS_JSON, final)
        log(f"wrote {run_dir}; robustness not measured (--summary-samples 0): the monitor is not a robustness "
            f"number; measure it with `sattrain eval {run_dir}`")
        return run_dir

    # metrics.json first without the summary: a run stopped during the evaluation keeps
    # its training record, and --resume (nothing left to train) redoes only the summary.
    final["summary_pending"] = True
    write_json_atomic(run_dir / METRICS_JSON, final)
    log(f"summary: evaluating {run_dir / (BEST_NAME if stopped else CHECKPOINT_NAME)} with the strong protocol on "
        f"{cfg.summary_samples} {eval_split} samples ({', '.join(('pgd',) if multilabel else SUMMARY_ATTACKS)})")
    try:
        # evaluate() checks the split it loads is the version this run opened, before any attack
        summary = run_summary(run_dir, store, split=eval_split, samples=cfg.summary_samples, device=device,
                              multilabel=multilabel, log=log, checkpoint=BEST_NAME if stopped else CHECKPOINT_NAME)
    except SatkitError as e:
        # e.g. a missing optional attack package: the training is done and saved; say so
        del final["summary_pending"]
        final["summary_error"] = str(e)
        write_json_atomic(run_dir / METRICS_JSON, final)
        raise SatkitError(f"the end-of-run summary failed ({e}); the training is complete in {run_dir} "
                          "(checkpoint.pt, best.pt, metrics.json): redo only the summary with --resume, or "
                          "pass --resume --summary-samples 0 and evaluate with `sattrain eval`") from None
    del final["summary_pending"]
    if stopped and not cfg.holdout:  # best.pt, chosen on the split it was just evaluated on
        summary = {**summary, "selection": _same_split_note(eval_split)}
    final["summary"] = summary
    write_json_atomic(run_dir / METRICS_JSON, final)
    head = summary.get("headline") or {}
    log(f"summary: clean {score} {_fmt(summary['clean'])}, "
        + ", ".join(f"{k} {_fmt(v)}" for k, v in summary["robust"].items()) + f" ({run_dir / SUMMARY_JSON})")
    of = f" of {summary['split_size']}" if not summary["complete"] and "split_size" in summary else ""
    log(f"robust ({head.get('name')}, {summary['samples']}{of} samples): {_fmt(head.get('value'))}")
    return run_dir
