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

and it is always read with ``torch.load(weights_only=True)``, so opening a checkpoint
from someone else cannot run code. Writes go to a temporary file then ``os.replace``, so
a run killed mid-save keeps the previous checkpoint.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from satdata.errors import SatkitError

CHECKPOINT_NAME = "checkpoint.pt"
BEST_NAME = "best.pt"
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


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Atomically write a checkpoint dict (tensors and plain values only)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save({"format": FORMAT, "version": VERSION, **state}, tmp)
    os.replace(tmp, path)


def write_json_atomic(path: str | Path, obj: Any, *, allow_nan: bool = True) -> None:
    """Write a run directory's JSON file aside, then rename it into place (no torn files)."""
    import json

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, allow_nan=allow_nan) + "\n")
    os.replace(tmp, path)


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
    from sattrain.models import create_model

    p = resolve_checkpoint(path)
    ckpt = load_checkpoint(p, map_location="cpu")
    spec = dict(ckpt["model_spec"])
    try:
        model = create_model(spec["name"], int(spec["num_classes"]))
    except SatkitError as e:
        raise SatkitError(f"{p}: checkpoint names a model this satkit cannot build ({str(e).split(': ', 1)[-1]})") from None
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise SatkitError(f"{p}: weights do not fit the {spec['name']} network with {spec['num_classes']} classes "
                          f"that the checkpoint names ({_state_dict_mismatch(model, ckpt['model'])})") from None
    model.to(device).eval()
    return model, spec


def _state_dict_mismatch(model: nn.Module, state: dict[str, Any]) -> str:
    """A short account of why ``state`` does not fit ``model``: missing, unexpected, misshapen tensors."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    parts = []
    for what, keys in (("missing", missing), ("unexpected", extra), ("other shape", shapes)):
        if keys:
            parts.append(f"{len(keys)} {what}, e.g. {keys[0]}")
    return "; ".join(parts) or "incompatible tensors"
