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


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint safely (weights_only=True); raises SatkitError naming the file."""
    p = resolve_checkpoint(path)
    try:
        ckpt = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as e:
        raise SatkitError(f"{p}: not a readable satkit checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise SatkitError(f"{p}: not a satkit checkpoint")
    if int(ckpt.get("version", 0)) > VERSION:
        raise SatkitError(f"{p}: checkpoint version {ckpt['version']} is newer than this satkit reads ({VERSION})")
    return ckpt


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model of a checkpoint or run dir, in eval mode: (model, model_spec)."""
    from sattrain.models import create_model

    ckpt = load_checkpoint(path, map_location="cpu")
    spec = dict(ckpt["model_spec"])
    model = create_model(spec["name"], int(spec["num_classes"]))
    model.load_state_dict(ckpt["model"])
    model.to(device).eval()
    return model, spec
