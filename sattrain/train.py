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
    summary.json    the end-of-run evaluation with the strong protocol (sattrain.evaluate:
                    AutoAttack and PGD at 8/255 on --summary-samples held-out
                    samples) of checkpoint.pt; absent with --summary-samples 0
    metrics.json    at the end: "summary" (that evaluation's protocol, samples, split,
                    clean, robust {"autoattack@8/255", "pgd@1/255", ...} and headline),
                    "best" and "last" (monitor numbers of the best and the last epoch),
                    "monitor" (what the monitor measures), run facts

The monitor. After every epoch the model is scored on a fixed held-out subset
(--eval-samples, 256) clean and under a cheap PGD (--eval-steps 5 steps of --step-size
2/255 at --eps, one random start). That is for watching a run and choosing best.pt, and
its key says so: ``pgd5_monitor`` (``pgd<N>_monitor`` with --eval-steps N). A few weak
PGD steps overestimate robustness, so it is never reported as the model's robustness:
that is the summary's job (or ``sattrain eval``).

best.pt (robust overfitting, Rice et al. 2020: the held-out robust accuracy of
adversarial training often peaks and then falls while the training loss keeps falling).
An epoch replaces the best only with a strictly higher monitor score, so a tie keeps
the earlier epoch (the one that got there with less training). Multi-label runs compare
the monitor's mAP under attack. A NaN score never becomes the best.

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
every LOG_EVERY steps for the progress bar; a non-finite loss stops the run with an
error naming the epoch and step.
"""

from __future__ import annotations

import json
import math
import platform
import random
import subprocess
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, ContextManager

import numpy as np
import torch
import torch.nn as nn

from satdata.errors import SatkitError
from satdata.store import Store, open_store, store_digest
from sattrain import __version__
from sattrain.checkpoint import BEST_NAME, CHECKPOINT_NAME, load_checkpoint, save_checkpoint, write_json_atomic
from sattrain.config import TrainConfig, format_eps, resolve_augment, resume_mismatches
from sattrain.device import resolve_device
from sattrain.metrics import mean_average_precision
from sattrain.data import (
    EvalSplit,
    InMemorySplit,
    MapCodec,
    StreamingSplit,
    choose_maps,
    derive_seed,
    load_split,
    make_generator,
    map_codec,
    num_batches,
    open_train_split,
    prepare_batch,
    sample_bytes,
    select_indices,
)
from sattrain.methods import Method, StepContext, get_method
from sattrain.models import create_model
from sattrain.perturb import curriculum_p
from sattrain.schedule import make_scheduler, step_per_step

CONFIG_JSON = "config.json"
METRICS_JSONL = "metrics.jsonl"
METRICS_JSON = "metrics.json"
SUMMARY_JSON = "summary.json"
# The end-of-run summary (sattrain.evaluate, strong protocol): AutoAttack (the headline) and
# the strong PGD at 8/255, its cross-check; the eps sweep, CW, distortions and the sanity
# checks are `sattrain eval` (a sweep of strong PGD costs minutes on a CPU, and a summary
# runs after every training run).
SUMMARY_ATTACKS = ("autoattack", "pgd")
SUMMARY_EPS = (8 / 255,)
SUMMARY_SEED = 0
EVAL_BATCH = 256
LOG_EVERY = 20  # steps between host reads of the running loss (progress bar, NaN check)
# Fixed seed of the held-out subset: the same samples for every run, whatever its --seed,
# so runs with different seeds and methods are compared on the same images.
EVAL_SUBSET_SEED = 20200607


class NonFiniteLoss(SatkitError):
    """The training loss became NaN or infinite."""


Log = Callable[[str], None]


# --------------------------------------------------------------------------- environment


def git_revision() -> dict[str, Any] | None:
    """The satkit source's git commit and whether it had uncommitted changes (None outside git)."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5)
        return {"commit": rev.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device) -> dict[str, Any]:
    """Versions of what computed the run, and the device it ran on."""
    import zarr

    env: dict[str, Any] = {
        "satkit": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "zarr": zarr.__version__,
        "platform": platform.platform(),
        "device": str(device),
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


def default_run_dir(cfg: TrainConfig, dataset: str) -> Path:
    """runs/<dataset>-<method>-<model>-s<seed>, always one plain directory under runs/.

    The dataset name comes from the store: each part is reduced to letters, digits and
    ``._-`` (anything else becomes '_', no leading dot, no '..', at most 64 characters),
    so that no store can send a run's files elsewhere. Plain names are kept as they are.
    """
    import re

    def plain(text: str) -> str:
        t = re.sub(r"[^A-Za-z0-9._-]+", "_", text)
        t = re.sub(r"\.{2,}", ".", t).lstrip("._-")[:64]
        return t or "unnamed"

    return Path("runs") / f"{plain(dataset)}-{plain(cfg.method.replace('+', '_'))}-{plain(cfg.model)}-s{int(cfg.seed)}"


# --------------------------------------------------------------------------- metrics


def evaluate_heldout(
    model: nn.Module,
    data: EvalSplit,
    *,
    eps_list: tuple[float, ...],
    steps: int,
    step_size: float,
    multilabel: bool,
    generator: torch.Generator,
) -> dict[str, float]:
    """Clean and PGD scores on the held-out subset: {"clean": s, "pgd@8/255": s, ...}.

    Single-label: accuracy, where a sample is robust if it is classified correctly both
    clean and under attack. Multi-label: mAP on the clean and on the attacked images.

    Runs in eval mode and float32 (no autocast: the reported numbers should not depend
    on --amp), and restores the model's mode.
    """
    from sattrain.attacks import pgd

    was = model.training
    model.eval()
    keys = ["clean"] + [f"pgd@{format_eps(e)}" for e in eps_list]
    logits: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
    ys = []
    try:
        for x, y in data.batches(EVAL_BATCH, multilabel):
            ys.append(y)
            with torch.no_grad():
                logits["clean"].append(model(x).float())
            for e, k in zip(eps_list, keys[1:]):
                x_adv = pgd(model, x, y, eps=e, step_size=step_size, steps=steps, random_start=True,
                            loss="bce" if multilabel else "ce", generator=generator)
                with torch.no_grad():
                    logits[k].append(model(x_adv).float())
    finally:
        model.train(was)
    y_all = torch.cat(ys)
    if multilabel:
        return {k: mean_average_precision(torch.cat(v), y_all) for k, v in logits.items()}
    clean_ok = torch.cat(logits["clean"]).argmax(dim=1) == y_all
    # A sample counts as robust only if it is also classified correctly when clean (the
    # RobustBench convention, and what `sattrain eval` reports).
    return {k: float(((torch.cat(v).argmax(dim=1) == y_all) & clean_ok).float().mean()) for k, v in logits.items()}


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
) -> dict[str, Any]:
    """One pass over the training split; returns loss, train score, attack share, samples,
    steps, and the learning rate of the first and of the last step (lr, lr_last).

    ``augment``: "crop+flip", "crop" or "none" (sattrain.data.prepare_batch).
    ``scheduler``: a per-step learning-rate scheduler (one-cycle), stepped after every
    optimizer step; per-epoch schedulers are the caller's to step.
    """
    from tqdm.auto import tqdm

    model.train()
    device = next(model.parameters()).device
    total = num_batches(data.n, batch_size)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device)
    first_bad = torch.full((), -1, dtype=torch.long, device=device)
    all_logits: list[torch.Tensor] = []
    all_y: list[torch.Tensor] = []
    seen = 0
    attacked = 0
    steps = 0
    lr_first = lr_last = float(optimizer.param_groups[0]["lr"])
    bar = tqdm(total=total, desc=desc, disable=not progress, leave=False, dynamic_ncols=True, unit="batch")

    def check(step: int) -> None:
        bad = int(first_bad)  # the one host sync per LOG_EVERY steps
        if bad >= 0:
            raise NonFiniteLoss(
                f"epoch {ctx.epoch + 1} (t = {ctx.epoch}), step {bad + 1} of {total}: the training loss is not finite "
                f"(nan or inf); try a lower --lr{', or drop --amp' if scaler is not None else ''}"
            )
        if progress:
            post = {"loss": f"{float(loss_sum) / max(1, seen):.4f}"}
            if not ctx.multilabel:
                post["acc"] = f"{float(correct) / max(1, seen):.3f}"
            bar.set_postfix(post)

    try:
        for step, raw in enumerate(data.batches(batch_size, shuffle_gen, map_name)):
            batch = prepare_batch(raw, codec, multilabel=ctx.multilabel, augment=augment, generator=aug_gen)
            with autocast():
                res = method.fn(model, batch, ctx)
            optimizer.zero_grad(set_to_none=True)
            lr_last = float(optimizer.param_groups[0]["lr"])  # a Python float: no device sync
            if scaler is not None:
                scaler.scale(res.loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                res.loss.backward()
                optimizer.step()
            if scheduler is not None:
                if scaler is not None:
                    # a step the scaler skipped (inf/nan gradients while it calibrates) still
                    # advances the schedule, as it must to stay on its total; torch warns about it
                    with warnings.catch_warnings():
                        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
                        scheduler.step()
                else:
                    scheduler.step()
            b = batch.x.shape[0]
            loss_d = res.loss.detach().float()
            first_bad = torch.where(~torch.isfinite(loss_d) & (first_bad < 0), step, first_bad)
            loss_sum += loss_d * b
            if ctx.multilabel:
                all_logits.append(res.logits.float())
                all_y.append(batch.y)
            else:
                correct += (res.logits.argmax(dim=1) == batch.y).sum()
            seen += b
            attacked += int(res.attacked)
            steps += 1
            bar.update(1)
            if steps % LOG_EVERY == 0:
                check(step)
        check(steps - 1)
    finally:
        bar.close()
    if seen == 0:
        raise SatkitError(f"epoch {ctx.epoch}: no training batch (fewer than 2 samples?)")
    train_score = (mean_average_precision(torch.cat(all_logits), torch.cat(all_y)) if ctx.multilabel
                   else float(correct) / seen)
    return {"loss": float(loss_sum) / seen, "train_acc": train_score, "attack_share": attacked / steps,
            "samples": seen, "steps": steps, "lr": lr_first, "lr_last": lr_last}


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


def _read_metrics_lines(path: Path, keep_below: int) -> list[dict[str, Any]]:
    """metrics.jsonl lines of epochs < keep_below (a killed run may have written one more)."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            break  # a line cut by a kill: everything after it is redone
        if int(rec.get("epoch", -1)) < keep_below:
            out.append(rec)
    return out


def _pick_eval_split(store: Store, requested: str | None) -> str:
    if requested is not None:
        if requested not in store.info.splits:
            raise SatkitError(f"--eval-split: {store.path} has no split {requested!r} "
                              f"(splits: {', '.join(store.info.splits)})")
        return requested
    for s in ("val", "test"):
        if s in store.info.splits:
            return s
    raise SatkitError(f"{store.path}: no val or test split for the held-out evaluation; "
                      "pass --eval-split train to evaluate on (a subset of) training samples")


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
    if have == best:
        return
    if int(best["epoch"]) == int(ckpt["epoch"]) - 1:
        save_checkpoint(path, _best_state(ckpt, best, run_dir))
        log(f"note: rewrote {path} for epoch {int(best['epoch']) + 1} (the run stopped before it was written)")
    else:
        log(f"note: {path} does not hold the run's best epoch ({int(best['epoch']) + 1}), and its weights are "
            "not in checkpoint.pt; best.pt will follow the next better epoch")


def _restore(run_dir: Path, cfg: TrainConfig, digest: str, store_path: str, model: nn.Module,
             optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: Any,
             device: torch.device, log: Log) -> tuple[int, dict[str, Any] | None]:
    """(epochs already done in run_dir, best record so far): (0, None) for a new run;
    otherwise the model, optimizer, scheduler and scaler are restored and best.pt checked.

    A directory that holds a run needs --resume; resuming checks that the options (except
    those in RESUMABLE_CHANGES) and the store's contents are the run's, and that --epochs
    changes only under the constant schedule (the others are scaled to the epochs).
    """
    ckpt_path = run_dir / CHECKPOINT_NAME
    if (ckpt_path.is_file() or (run_dir / CONFIG_JSON).is_file()) and not cfg.resume:
        raise SatkitError(f"{run_dir}: already holds a run; pass --resume to continue it, or choose another --out")
    if not cfg.resume:
        return 0, None
    if not ckpt_path.is_file():
        log(f"note: {run_dir} has no checkpoint yet; starting from scratch")
        return 0, None
    ckpt = load_checkpoint(ckpt_path, map_location=device)
    saved = ckpt.get("config", {})
    diffs = resume_mismatches(saved, cfg.to_json())
    if diffs:
        raise SatkitError(f"{run_dir}: --resume with options other than the run's: " + "; ".join(diffs))
    saved_epochs = int(saved.get("epochs", cfg.epochs))
    if cfg.schedule != "constant" and saved_epochs != cfg.epochs:
        raise SatkitError(f"--epochs {cfg.epochs}: the run in {run_dir} has a {cfg.schedule} schedule over "
                          f"{saved_epochs} epochs, and changing the epochs would change the learning rates of epochs "
                          f"already done; resume with --epochs {saved_epochs} or start a new run")
    saved_digest = ckpt.get("extra", {}).get("store_digest")
    if saved_digest != digest:
        raise SatkitError(f"{run_dir}: --resume with a store whose contents differ from the run's "
                          f"({store_path} digest {digest[:12]}, the run's {str(saved_digest)[:12]})")
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt.get("scheduler"):
        scheduler.load_state_dict(ckpt["scheduler"])
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    done = int(ckpt["epoch"])
    if done > cfg.epochs:
        raise SatkitError(f"--epochs {cfg.epochs}: the run in {run_dir} has already done {done} epochs")
    _sync_best(run_dir, ckpt, log)
    log(f"resuming {run_dir} after epoch {done} of {cfg.epochs}")
    return done, ckpt.get("best")


def run_summary(run_dir: Path, store: Store, *, split: str, samples: int, device: torch.device, multilabel: bool,
                log: Log) -> dict[str, Any]:
    """Evaluate the run's checkpoint.pt with the strong protocol (sattrain.evaluate) into
    summary.json; returns metrics.json's "summary" entry.

    AutoAttack and PGD at 8/255 on ``samples`` samples of ``split`` (a
    seeded subset, seed 0, so every run of a store is summarised on the same images).
    Multi-label models get PGD alone (AutoAttack is defined for single-label classifiers).
    """
    from sattrain import evaluate as ev_mod

    attacks = ("pgd",) if multilabel else SUMMARY_ATTACKS
    partial = getattr(ev_mod, "PartialEvaluationWarning", None)
    with warnings.catch_warnings():
        # a subset is the point here, and the summary line states its size
        if partial is not None:
            warnings.simplefilter("ignore", partial)
        result = ev_mod.evaluate(run_dir, store, protocol="strong", split=split, samples=samples, seed=SUMMARY_SEED, device=str(device),
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


def train(cfg: TrainConfig, log: Log | None = None) -> Path:
    """Train per ``cfg``; returns the run directory (see the module docstring for its files).

    Raises SatkitError (one line, naming the option or file) for bad options, a store the
    method cannot use, an existing run without --resume, or a non-finite loss.
    """
    from tqdm.auto import tqdm

    log = log or tqdm.write
    cfg = cfg.resolved()
    method = get_method(cfg.method)
    if cfg.beta is not None and not method.uses_beta and cfg.beta != 0:
        log(f"note: --beta is not used by --method {cfg.method}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    amp_active = cfg.amp and device.type == "cuda"
    if cfg.amp and not amp_active:
        log("note: --amp has no effect on the CPU (float32 is used; CPU autocast to bfloat16 "
            "is rarely faster and would change the numbers)")

    store = open_store(cfg.store)
    info = store.info
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
    num_classes = len(info.classes)
    model_spec = {"name": cfg.model, "num_classes": num_classes, "label_kind": info.label_kind,
                  "image_size": list(info.image_size), "classes": list(info.classes)}
    train_idx = select_indices(info.splits["train"], cfg.train_samples, derive_seed(cfg.seed, "train-subset"))
    steps_per_epoch = num_batches(len(train_idx), cfg.batch_size)
    # Build the model first: an unknown --model fails before any data is read.
    torch.manual_seed(derive_seed(cfg.seed, "init"))
    model = create_model(cfg.model, num_classes).to(device)
    optimizer = _make_optimizer(cfg, model)
    assert cfg.schedule is not None
    scheduler = make_scheduler(cfg.schedule, optimizer, epochs=cfg.epochs, steps_per_epoch=steps_per_epoch)
    per_step = step_per_step(cfg.schedule)
    scaler = torch.amp.GradScaler("cuda") if amp_active else None

    run_dir = Path(cfg.out) if cfg.out else default_run_dir(cfg, info.dataset)
    start_epoch, best = _restore(run_dir, cfg, digest, store.path, model, optimizer, scheduler, scaler, device, log)
    run_dir.mkdir(parents=True, exist_ok=True)

    # Data: the training split (or a seeded subset of it) and a fixed held-out subset.
    n_eval = info.splits[eval_split]
    eval_idx = select_indices(n_eval, cfg.eval_samples or None, EVAL_SUBSET_SEED)
    if len(eval_idx) * sample_bytes(store, eval_split, ()) > cfg.memory_budget:
        raise SatkitError(f"--eval-samples: {len(eval_idx):,} held-out samples exceed --memory-budget; ask for fewer")
    train_data = open_train_split(store, "train", maps, train_idx, device, cfg.memory_budget, progress=cfg.progress)
    eval_data = EvalSplit(load_split(store, eval_split, (), eval_idx, progress=cfg.progress), device)
    log(f"{store.path}: train {train_data.n:,} samples ({train_data.placement}), "
        f"held-out {eval_split} {eval_data.n:,}; {cfg.method} on {cfg.model}, {device}"
        + (f", maps {', '.join(maps)}" if maps else "")
        + f"; recipe {cfg.recipe}: {cfg.optimizer} lr {cfg.lr:g}, {cfg.schedule} schedule, "
          f"attacks in BN {cfg.attack_bn} mode, augment {cfg.augment}")

    write_json_atomic(run_dir / CONFIG_JSON, {
        "options": cfg.to_json(),
        "resumed_after_epoch": start_epoch if start_epoch else None,
        "store": {"path": store.path, "dataset": info.dataset, "digest": digest, "label_kind": info.label_kind,
                  "image_size": list(info.image_size), "classes": list(info.classes),
                  "hflip": bool(getattr(info, "hflip", True)),
                  "maps": {m: {"kind": c.kind, "encoding": c.encoding} for m, c in codecs.items()}},
        "data": {"train_split": "train", "train_samples": train_data.n, "placement": train_data.placement,
                 "eval_split": eval_split, "eval_samples": eval_data.n, "steps_per_epoch": steps_per_epoch},
        "method": {"name": method.name, "summary": method.summary, "needs_map": method.needs_map},
        "model_spec": model_spec,
        "amp_active": amp_active,
        "environment": environment(device),
        "git": git_revision(),
        "command": sys.argv,
        "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })

    metrics_path = run_dir / METRICS_JSONL
    history = _read_metrics_lines(metrics_path, start_epoch)
    metrics_path.write_text("".join(json.dumps(r) + "\n" for r in history))
    autocast: Callable[[], ContextManager[Any]] = (
        (lambda: torch.autocast("cuda", dtype=torch.float16)) if amp_active else nullcontext
    )
    uses_p = method.needs_map
    score = "mAP" if multilabel else "acc"
    monitor_key = f"pgd{cfg.eval_steps}_monitor"
    monitor_label = f"pgd{cfg.eval_steps}@{format_eps(cfg.eps)}"
    monitor = {"key": monitor_key, "attack": "pgd", "eps": format_eps(cfg.eps), "steps": cfg.eval_steps,
               "step_size": format_eps(cfg.step_size), "random_start": True, "restarts": 1,
               "loss": "bce" if multilabel else "ce", "split": eval_split, "samples": eval_data.n,
               "subset_seed": EVAL_SUBSET_SEED}

    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        torch.manual_seed(derive_seed(cfg.seed, epoch, "global"))
        map_name = maps[random.Random(derive_seed(cfg.seed, epoch, "map")).randrange(len(maps))] if maps else None
        p = curriculum_p(epoch, cfg.alpha)
        ctx = StepContext(epoch=epoch, p=p, eps0=cfg.eps0, eps=cfg.eps, step_size=cfg.step_size, steps=cfg.steps,
                          beta=cfg.beta, multilabel=multilabel,
                          generator=make_generator(device, derive_seed(cfg.seed, epoch, "perturb")),
                          coin=make_generator("cpu", derive_seed(cfg.seed, epoch, "coin")),
                          attack_bn=str(cfg.attack_bn))
        stats = train_one_epoch(
            model, train_data, method, ctx, optimizer, scaler,
            batch_size=cfg.batch_size, codec=codecs.get(map_name) if map_name else None, map_name=map_name,
            augment=str(cfg.augment), shuffle_gen=make_generator("cpu", derive_seed(cfg.seed, epoch, "shuffle")),
            aug_gen=make_generator(device, derive_seed(cfg.seed, epoch, "augment")), autocast=autocast,
            desc=f"epoch {epoch + 1}/{cfg.epochs}", progress=cfg.progress, scheduler=scheduler if per_step else None,
        )
        if not per_step:
            scheduler.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_seconds = time.perf_counter() - t0
        ev = evaluate_heldout(model, eval_data, eps_list=(cfg.eps,), steps=cfg.eval_steps, step_size=cfg.step_size,
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
            "seconds": round(time.perf_counter() - t0, 3),
            "images_per_s": round(stats["samples"] / train_seconds, 1),
        }
        value = rec[monitor_key]
        new_best = math.isfinite(value) and (best is None or value > best[monitor_key])
        if new_best:  # strictly better: a tie keeps the earlier epoch
            best = {"epoch": epoch, monitor_key: value, "clean_acc": rec["clean_acc"], "checkpoint": BEST_NAME}
        history.append(rec)
        with metrics_path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
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
            "extra": {"store_digest": digest, "method": cfg.method, "eval_split": eval_split},
        }
        save_checkpoint(run_dir / CHECKPOINT_NAME, ckpt)
        if new_best:
            assert best is not None
            save_checkpoint(run_dir / BEST_NAME, _best_state(ckpt, best, run_dir))
        log(f"epoch {epoch + 1}/{cfg.epochs}: loss {rec['loss']:.4f}, train {score} {rec['train_acc']:.4f}, "
            f"lr {rec['lr']:.4g}" + (f"..{rec['lr_last']:.4g}" if rec["lr_last"] != rec["lr"] else "")
            + (f", p_t {p:.3f}" if uses_p else "")
            + f"; held-out clean {score} {rec['clean_acc']:.4f}, monitor {monitor_label} {value:.4f}"
            + (" (best)" if new_best else "")
            + f" ({rec['seconds']:.1f} s, {rec['images_per_s']:,.0f} img/s)")

    last = history[-1] if history else {}
    final: dict[str, Any] = {
        "metric": "mAP" if multilabel else "accuracy",
        "summary": None,
        "best": best,
        "last": {"epoch": last.get("epoch"), monitor_key: last.get(monitor_key), "clean_acc": last.get("clean_acc"),
                 "checkpoint": CHECKPOINT_NAME},
        "monitor": {**monitor, "note": "cheap per-epoch monitoring for watching the run and choosing best.pt, "
                                       "not the model's robustness (that is the summary, or sattrain eval)"},
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
    log(f"summary: evaluating {run_dir / CHECKPOINT_NAME} with the strong protocol on "
        f"{cfg.summary_samples} {eval_split} samples ({', '.join(('pgd',) if multilabel else SUMMARY_ATTACKS)})")
    try:
        summary = run_summary(run_dir, store, split=eval_split, samples=cfg.summary_samples, device=device,
                              multilabel=multilabel, log=log)
    except SatkitError as e:
        # e.g. a missing optional attack package: the training is done and saved; say so
        del final["summary_pending"]
        final["summary_error"] = str(e)
        write_json_atomic(run_dir / METRICS_JSON, final)
        raise SatkitError(f"the end-of-run summary failed ({e}); the training is complete in {run_dir} "
                          "(checkpoint.pt, best.pt, metrics.json): redo only the summary with --resume, or "
                          "pass --resume --summary-samples 0 and evaluate with `sattrain eval`") from None
    del final["summary_pending"]
    final["summary"] = summary
    write_json_atomic(run_dir / METRICS_JSON, final)
    head = summary.get("headline") or {}
    log(f"summary: clean {score} {_fmt(summary['clean'])}, "
        + ", ".join(f"{k} {_fmt(v)}" for k, v in summary["robust"].items()) + f" ({run_dir / SUMMARY_JSON})")
    of = f" of {summary['split_size']}" if not summary["complete"] and "split_size" in summary else ""
    log(f"robust ({head.get('name')}, {summary['samples']}{of} samples): {_fmt(head.get('value'))}")
    return run_dir
