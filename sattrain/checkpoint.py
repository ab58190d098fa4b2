"""Checkpoints: one dict of tensors and JSON-able values, loaded without unpickling objects.

A checkpoint is what ``torch.save`` writes for::

    {"format": "satkit-checkpoint", "version": 1,
     "model": state_dict, "optimizer": state_dict or None, "epoch": int (epochs done),
     "scheduler": the learning-rate scheduler's state_dict or None,
     "best": {"epoch", "pgd<N>_monitor", "clean_acc", "checkpoint"} or None (the run's
             best epoch so far by the held-out monitor),
     "model_spec": {"name", "num_classes", "label_kind", "image_size", "classes"},
     "config": {...resolved options...}, "rng": {...generator states as uint8 tensors...},
     "extra": {...}}

A run directory holds ``checkpoint.pt`` (the last epoch: what ``--resume`` continues and
what ``sattrain eval RUN_DIR`` evaluates) and ``best.pt`` (the epoch with the highest
held-out monitor score, same format, no optimizer state).

It is always read with ``torch.load(weights_only=True)``, so opening a checkpoint from
someone else cannot run code, and every key a reader uses is type-checked once
(:func:`check_checkpoint`); weights must be finite and fit the network the checkpoint names
(:func:`check_model_state`). ``--resume`` also checks the optimizer, scheduler and RNG
states against the run being resumed before loading them (:func:`check_optimizer_state`,
:func:`check_scheduler_state`), so a damaged or crafted checkpoint ends in one line naming
the file, never in a failure deep inside the first training step.

Writes (``satdata.atomic.atomic_write``, used by :func:`save_checkpoint` and the run files)
go to a temporary file created exclusively (``O_CREAT | O_EXCL | O_NOFOLLOW``, a random
name) in the destination's directory, are flushed to disk, then renamed onto the
destination with ``os.replace``. So a run killed mid-save keeps the previous file, a
symbolic link planted at the destination or at a temporary name cannot redirect the write
elsewhere (the link itself is replaced), and a write that fails (disk full, Ctrl-C) leaves
no temporary file behind. :func:`save_checkpoint` refuses state holding NaN or infinite
tensors: a diverged model is never written as a checkpoint.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from satdata.atomic import atomic_write
from satdata.errors import SatkitError
from sattrain.rundir import CHECKPOINT_NAME

FORMAT = "satkit-checkpoint"
VERSION = 1


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory or a checkpoint file -> the checkpoint file."""
    p = Path(path)
    if p.is_dir():
        p = p / CHECKPOINT_NAME
    if not p.is_file():
        raise SatkitError(f"{path}: no checkpoint (expected a run directory with {CHECKPOINT_NAME}, or a .pt file)")
    return p


class NonFiniteState(SatkitError):
    """A state dict to be saved (or loaded) holds NaN or infinite values."""


def non_finite_tensors(obj: Any, prefix: str = "") -> list[str]:
    """Names of the floating-point tensors in ``obj`` (nested dicts, lists, tuples) holding NaN or inf."""
    found: list[tuple[str, torch.Tensor]] = []

    def walk(o: Any, name: str) -> None:
        if isinstance(o, torch.Tensor):
            if o.is_floating_point() or o.is_complex():
                found.append((name, o))
        elif isinstance(o, dict):
            for k, v in o.items():
                walk(v, f"{name}.{k}" if name else str(k))
        elif isinstance(o, (list, tuple)):
            for i, v in enumerate(o):
                walk(v, f"{name}[{i}]")

    walk(obj, prefix)
    if not found:
        return []
    ok = [True] * len(found)
    by_device: dict[torch.device, list[int]] = {}
    for i, (_, t) in enumerate(found):
        by_device.setdefault(t.device, []).append(i)
    with torch.no_grad():
        for dev, idx in by_device.items():  # one host transfer per device, not one per tensor
            flags = torch.stack([torch.isfinite(found[i][1]).all() if found[i][1].numel()
                                 else torch.ones((), dtype=torch.bool, device=dev) for i in idx]).tolist()
            for i, good in zip(idx, flags):
                ok[i] = bool(good)
    return [name for (name, _), good in zip(found, ok) if not good]


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Atomically write a checkpoint dict (tensors and plain values only).

    Raises NonFiniteState (and writes nothing) if the model or optimizer state holds NaN
    or infinite values: a diverged run must not leave such weights as its checkpoint.
    """
    path = Path(path)
    bad = non_finite_tensors({k: state.get(k) for k in ("model", "optimizer", "scaler")})
    if bad:
        raise NonFiniteState(f"{path}: not written: the state holds NaN or infinite values "
                             f"({len(bad)} tensor(s), e.g. {bad[0]})")
    atomic_write(path, lambda f: torch.save({"format": FORMAT, "version": VERSION, **state}, f))


# A checkpoint names at most this many classes: a crafted count must not allocate a
# multi-gigabyte final layer before the weights are even compared.
MAX_CLASSES = 1_000_000


def _load_failure(p: Path, e: BaseException) -> SatkitError:
    """The one-line refusal of a file torch.load could not read (never torch's advice to
    retry with weights_only=False: that would run whatever code the file carries)."""
    from satdata.clikit import one_line

    text = one_line(str(e)).split(". ")[0][:200]
    if "weights only load failed" in text.lower() or "unsupported global" in text.lower():
        return SatkitError(f"{p}: not a readable satkit checkpoint (refused: it holds Python objects other than "
                           "tensors and plain values, which satkit never unpickles)")
    if isinstance(e, EOFError) or "central directory" in text or "failed reading" in text.lower():
        return SatkitError(f"{p}: not a readable satkit checkpoint (truncated or not a torch file: "
                           f"{type(e).__name__}{': ' + text if text else ''})")
    return SatkitError(f"{p}: not a readable satkit checkpoint ({type(e).__name__}{': ' + text if text else ''})")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_checkpoint(ckpt: Any, p: Path) -> dict[str, Any]:
    """Type-check a loaded checkpoint dict; raises SatkitError naming the file and the key.

    Every key a reader of a checkpoint uses is checked here, once, so that a damaged or
    crafted file ends in one clear line instead of a KeyError or TypeError deep in
    training, evaluation or saliency.
    """
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise SatkitError(f"{p}: not a satkit checkpoint")
    version = ckpt.get("version", 0)
    if not _is_int(version) or version < 1:
        raise SatkitError(f"{p}: checkpoint has version {version!r}; expected an integer >= 1")
    if version > VERSION:
        raise SatkitError(f"{p}: checkpoint version {version} is newer than this satkit reads ({VERSION})")

    def bad(key: str, want: str) -> SatkitError:
        shown = repr(ckpt[key]) if key in ckpt else "missing"
        return SatkitError(f"{p}: damaged satkit checkpoint: '{key}' is {shown[:80]}; expected {want}")

    model = ckpt.get("model")
    if not isinstance(model, dict) or not model or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in model.items()):
        raise bad("model", "a dict of named tensors (a state_dict)")
    spec = ckpt.get("model_spec")
    if not isinstance(spec, dict):
        raise bad("model_spec", "a dict with name and num_classes")
    if not isinstance(spec.get("name"), str) or not spec["name"]:
        raise SatkitError(f"{p}: damaged satkit checkpoint: model_spec has no model name")
    nc = spec.get("num_classes")
    if not _is_int(nc) or not 1 <= nc <= MAX_CLASSES:
        raise SatkitError(f"{p}: damaged satkit checkpoint: model_spec num_classes is {nc!r}; "
                          f"expected an integer in [1, {MAX_CLASSES}]")
    if spec.get("label_kind", "single") not in ("single", "multi"):
        raise SatkitError(f"{p}: damaged satkit checkpoint: model_spec label_kind is {spec.get('label_kind')!r}")
    size = spec.get("image_size")
    if size is not None and not (isinstance(size, (list, tuple)) and len(size) == 2
                                 and all(_is_int(v) and v > 0 for v in size)):
        raise SatkitError(f"{p}: damaged satkit checkpoint: model_spec image_size is {size!r}; expected two positive integers")
    classes = spec.get("classes")
    if classes is not None and not (isinstance(classes, (list, tuple)) and len(classes) == nc
                                    and all(isinstance(c, str) for c in classes)):
        raise SatkitError(f"{p}: damaged satkit checkpoint: model_spec classes is not a list of {nc} names")
    epoch = ckpt.get("epoch")
    if not _is_int(epoch) or epoch < 0:
        raise bad("epoch", "a non-negative integer (epochs done)")
    for key in ("optimizer", "scheduler", "scaler", "best"):
        if ckpt.get(key) is not None and not isinstance(ckpt[key], dict):
            raise bad(key, "a dict or None")
    for key in ("config", "rng", "extra"):
        if key in ckpt and not isinstance(ckpt[key], dict):
            raise bad(key, "a dict")
    best = ckpt.get("best")
    if best and not _is_int(best.get("epoch")):
        raise SatkitError(f"{p}: damaged satkit checkpoint: best has epoch {best.get('epoch')!r}; expected an integer")
    for name, state in (ckpt.get("rng") or {}).items():
        if not (isinstance(state, torch.Tensor) and state.dtype == torch.uint8 and state.dim() == 1):
            shown = (f"a {state.dtype} tensor of shape {tuple(state.shape)}" if isinstance(state, torch.Tensor)
                     else repr(state)[:80])
            raise SatkitError(f"{p}: damaged satkit checkpoint: rng state {str(name)[:40]!r} is {shown}; "
                              "expected a 1-D uint8 tensor (a generator state)")
    return ckpt


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint safely (weights_only=True) and check its keys and types.

    Raises SatkitError naming the file: not a zip or pickle, truncated, refused for the
    objects it holds, or missing or mistyped keys.
    """
    p = resolve_checkpoint(path)
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols of foreign files: not the user's concern
            warnings.simplefilter("ignore")
            ckpt = torch.load(p, map_location=map_location, weights_only=True)
    except (PermissionError, FileNotFoundError, IsADirectoryError) as e:  # the file, not its contents
        if e.filename is None:
            e.filename = str(p)
        raise
    except MemoryError:
        raise SatkitError(f"{p}: not a readable satkit checkpoint (out of memory while reading it)") from None
    except Exception as e:  # torch raises many types for foreign, damaged and crafted files
        raise _load_failure(p, e) from None
    return check_checkpoint(ckpt, p)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model of a checkpoint or run dir, in eval mode: (model, model_spec).

    Weights that do not fit the network the checkpoint names (another architecture,
    missing or extra tensors, other shapes) end in a SatkitError naming the file.
    """
    p = resolve_checkpoint(path)
    return model_from_checkpoint(load_checkpoint(p, map_location="cpu"), p, device)


def model_from_checkpoint(ckpt: dict[str, Any], p: Path, device: str | torch.device = "cpu"
                          ) -> tuple[nn.Module, dict[str, Any]]:
    """:func:`load_model` of a checkpoint dict already loaded from ``p`` (errors name ``p``)."""
    from sattrain.models import create_model

    spec = dict(ckpt["model_spec"])
    try:
        model = create_model(spec["name"], int(spec["num_classes"]))
    except SatkitError as e:
        raise SatkitError(f"{p}: checkpoint names a model this satkit cannot build ({str(e).split(': ', 1)[-1]})") from None
    load_model_state(model, ckpt["model"], p, spec)
    model.to(device).eval()
    return model, spec


def check_model_state(model: nn.Module, state: dict[str, Any], p: Path, spec: dict[str, Any]) -> None:
    """Refuse weights that do not fit ``model`` (names, shapes, kinds of dtype) or hold NaN/inf."""
    own = model.state_dict()
    problem = _state_dict_mismatch(model, state, strict=False)
    if problem:
        raise SatkitError(f"{p}: weights do not fit the {spec.get('name')} network with {spec.get('num_classes')} "
                          f"classes that the checkpoint names ({problem})")
    kinds = [k for k in own if own[k].is_floating_point() != state[k].is_floating_point() or state[k].is_complex()]
    if kinds:
        raise SatkitError(f"{p}: weights do not fit the {spec.get('name')} network: {len(kinds)} tensor(s) of "
                          f"another kind of dtype, e.g. {kinds[0]} is {state[kinds[0]].dtype}, "
                          f"expected {own[kinds[0]].dtype}")
    bad = non_finite_tensors(state)
    if bad:
        raise NonFiniteState(f"{p}: the weights hold NaN or infinite values ({len(bad)} tensor(s), e.g. {bad[0]}): "
                             "the run that wrote them diverged")


def load_model_state(model: nn.Module, state: dict[str, Any], p: Path, spec: dict[str, Any]) -> None:
    """``model.load_state_dict(state)`` after :func:`check_model_state`; failures name the file."""
    check_model_state(model, state, p, spec)
    try:
        model.load_state_dict(state)
    except RuntimeError:
        raise SatkitError(f"{p}: weights do not fit the {spec.get('name')} network with {spec.get('num_classes')} "
                          f"classes that the checkpoint names ({_state_dict_mismatch(model, state)})") from None


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def same_value(a: Any, b: Any) -> bool:
    """Whether two loaded values are equal: tuples and lists alike, tensors only equal to
    tensors of the same dtype, shape and values (``==`` on a tensor is elementwise, and a
    crafted file can put a tensor anywhere)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and bool(torch.equal(a.cpu(), b.cpu())))
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b)
                and all(same_value(x, y) for x, y in zip(a, b)))
    if isinstance(a, dict) or isinstance(b, dict):
        return (isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys()
                and all(same_value(a[k], b[k]) for k in a))
    try:
        return bool(a == b) and type(a) is type(b) or (_number(a) and _number(b) and a == b)
    except Exception:  # noqa: BLE001 - an exotic value: not equal
        return False


def check_optimizer_state(state: Any, optimizer: torch.optim.Optimizer, p: Path,
                          last_lr: list[float] | None = None) -> None:
    """Refuse an optimizer state that does not belong to ``optimizer`` before it is loaded.

    Checks the parameter groups (their parameters, every hyperparameter the run's options
    fix, and a finite, non-negative learning rate equal to the scheduler's ``last_lr`` when
    given) and the per-parameter state: a finite ``step`` >= 0 and finite floating-point
    buffers of exactly the parameter's shape. torch's own ``load_state_dict`` checks only
    the group sizes; a buffer of another shape would fail in the first training step.
    """
    def bad(what: str) -> SatkitError:
        return SatkitError(f"{p}: damaged satkit checkpoint: optimizer state: {what}")

    if not isinstance(state, dict) or not {"state", "param_groups"} <= set(state) or len(state) > 2:
        raise bad(f"expected a dict with 'state' and 'param_groups', got {repr(state)[:80]}")
    own_groups = optimizer.state_dict()["param_groups"]
    groups = state["param_groups"]
    if not isinstance(groups, (list, tuple)) or len(groups) != len(own_groups):
        raise bad(f"'param_groups' is {repr(groups)[:80]}; expected a list of {len(own_groups)} group(s)")
    for i, (g, og) in enumerate(zip(groups, own_groups)):
        if not isinstance(g, dict):
            raise bad(f"param_groups[{i}] is {repr(g)[:80]}; expected a dict")
        if not same_value(g.get("params"), og["params"]):
            raise bad(f"param_groups[{i}] lists parameters {repr(g.get('params'))[:80]}; this network has "
                      f"{len(og['params'])} (another network's optimizer?)")
        lr = g.get("lr")
        if not (_number(lr) and lr >= 0):
            raise bad(f"param_groups[{i}] has lr {lr!r}; expected a finite number >= 0")
        if last_lr is not None and i < len(last_lr) and lr != last_lr[i]:
            raise bad(f"param_groups[{i}] has lr {lr!r}, but the scheduler's last lr is {last_lr[i]!r}")
        for key, want in og.items():
            if key in ("params", "lr"):
                continue
            if key not in g:
                if isinstance(want, (int, float, list, tuple)) and not isinstance(want, bool):
                    raise bad(f"param_groups[{i}] has no {key!r}")
                continue
            if not same_value(g[key], want):
                raise bad(f"param_groups[{i}] has {key} {repr(g[key])[:40]}; the run's options give {want!r}")
    params = [q for group in optimizer.param_groups for q in group["params"]]
    per = state["state"]
    if not isinstance(per, dict):
        raise bad(f"'state' is {repr(per)[:80]}; expected a dict")
    want_keys = _STATE_KEYS.get(type(optimizer).__name__)
    if want_keys is not None and any(g.get("amsgrad") for g in optimizer.param_groups):
        want_keys = want_keys | {"max_exp_avg_sq"}
    for key, entry in per.items():
        if not _is_int(key) or not 0 <= key < len(params):
            raise bad(f"state for parameter {key!r}; the network has parameters 0..{len(params) - 1}")
        if not isinstance(entry, dict):
            raise bad(f"state of parameter {key} is {repr(entry)[:80]}; expected a dict")
        if entry and want_keys is not None and set(entry) != want_keys:
            raise bad(f"parameter {key} has state {sorted(map(str, entry))[:5]}; "
                      f"{type(optimizer).__name__} keeps {sorted(want_keys)}")
        shape = tuple(params[key].shape)
        for name, v in entry.items():
            if name == "step":
                ok = (_number(v) or (isinstance(v, torch.Tensor) and v.numel() == 1 and not v.is_complex()
                                     and bool(torch.isfinite(v.float()).all())))
                if not ok or float(v) < 0:
                    raise bad(f"parameter {key} has step {repr(v)[:40]}; expected a finite number >= 0")
            elif isinstance(v, torch.Tensor):
                if not v.is_floating_point() or tuple(v.shape) != shape:
                    raise bad(f"parameter {key}: {str(name)[:40]} is a {v.dtype} tensor of shape {tuple(v.shape)}; "
                              f"expected a floating-point tensor of shape {shape}")
                if non_finite_tensors(v):
                    raise bad(f"parameter {key}: {str(name)[:40]} holds NaN or infinite values")
            elif v is not None or name != "momentum_buffer":  # SGD without momentum keeps None
                raise bad(f"parameter {key}: {str(name)[:40]} is {repr(v)[:40]}; expected a tensor")


# The per-parameter state each optimizer keeps (Adam adds max_exp_avg_sq with amsgrad).
_STATE_KEYS = {"Adam": frozenset({"step", "exp_avg", "exp_avg_sq"}), "SGD": frozenset({"momentum_buffer"})}


# Scheduler attributes that change as training advances; every other one is fixed by the
# run's options and must equal a freshly built scheduler's.
_SCHEDULER_PROGRESS = frozenset({"last_epoch", "_step_count", "_last_lr", "_get_lr_called_within_step", "_is_initial"})


def check_scheduler_state(state: Any, scheduler: torch.optim.lr_scheduler.LRScheduler, p: Path,
                          expected_last_epoch: int) -> None:
    """Refuse a learning-rate scheduler state that does not belong to ``scheduler`` at the
    checkpoint's point of training (``expected_last_epoch``: scheduler steps done).

    torch's ``load_state_dict`` copies every key onto the scheduler object, so unknown keys
    are refused, the progress counters must be integers consistent with the epochs done,
    and everything else (base learning rates, phases, total steps) must equal what the
    run's options build.
    """
    def bad(what: str) -> SatkitError:
        return SatkitError(f"{p}: damaged satkit checkpoint: scheduler state: {what}")

    own = scheduler.state_dict()
    if not isinstance(state, dict):
        raise bad(f"{repr(state)[:80]}; expected a dict")
    unknown = sorted(str(k) for k in state if k not in own)
    if unknown:
        raise bad(f"unknown key {unknown[0][:40]!r}")
    last = state.get("last_epoch")
    if not _is_int(last) or last != expected_last_epoch:
        raise bad(f"last_epoch is {repr(last)[:40]}; the checkpoint's epochs done give {expected_last_epoch}")
    count = state.get("_step_count", last + 1)
    if not _is_int(count) or count != last + 1:
        raise bad(f"_step_count is {repr(count)[:40]}; expected {last + 1}")
    n = len(own.get("base_lrs", []))
    last_lr = state.get("_last_lr", own.get("_last_lr"))
    if not (isinstance(last_lr, (list, tuple)) and len(last_lr) == n and all(_number(v) and v >= 0 for v in last_lr)):
        raise bad(f"_last_lr is {repr(last_lr)[:80]}; expected {n} finite learning rate(s) >= 0")
    lambdas = state.get("lr_lambdas", own.get("lr_lambdas"))
    if "lr_lambdas" in own and not (isinstance(lambdas, (list, tuple)) and len(lambdas) == len(own["lr_lambdas"])
                                    and all(v is None for v in lambdas)):
        raise bad(f"lr_lambdas is {repr(lambdas)[:80]}; expected {len(own['lr_lambdas'])} None value(s)")
    for key, want in own.items():
        if key in _SCHEDULER_PROGRESS or key == "lr_lambdas" or key not in state:
            continue
        if not same_value(state[key], want):
            raise bad(f"{key} is {repr(state[key])[:60]}; the run's options give {repr(want)[:60]}")
    for key in ("_get_lr_called_within_step", "_is_initial"):
        if key in state and not isinstance(state[key], bool):
            raise bad(f"{key} is {repr(state[key])[:40]}; expected true or false")


_SCALER_KEYS = ("scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker")


def check_scaler_state(state: Any, p: Path) -> None:
    """Refuse a gradient-scaler state (--amp) that is not a dict of finite numbers with a positive scale."""
    if not isinstance(state, dict) or any(k not in _SCALER_KEYS for k in state) or not all(
            _number(v) for v in state.values()) or not state.get("scale", 1.0) > 0:
        raise SatkitError(f"{p}: damaged satkit checkpoint: scaler state is {repr(state)[:80]}; expected finite "
                          f"numbers for {', '.join(_SCALER_KEYS)} and a scale > 0")


def _state_dict_mismatch(model: nn.Module, state: dict[str, Any], strict: bool = True) -> str:
    """A short account of why ``state`` does not fit ``model``: missing, unexpected, misshapen tensors
    ("" when they fit, unless ``strict``, which says "incompatible tensors" then)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    parts = []
    for what, keys in (("missing", missing), ("unexpected", extra), ("other shape", shapes)):
        if keys:
            parts.append(f"{len(keys)} {what}, e.g. {keys[0]}")
    return "; ".join(parts) or ("incompatible tensors" if strict else "")
