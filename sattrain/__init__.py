"""sattrain: Saliency-based Adversarial Training (SAT) and robustness evaluation from a store.

The public API (docs/api.md has a runnable example); these names are a promise, the
modules behind them may move:

- ``StoreDataset(store, split, maps=..., transform=...)``: a split as a torch Dataset of
  (image, label[, S]).
- ``StoreLoader(store, split, batch_size, device, maps=..., augment=...)``: satkit's fast
  path, an iterable of batches on the device (``Batch(x, y, S)``).
- ``SATPerturbation(eps0=8/255, alpha=0.6)``: ``x_tilde = sat(x, S, epoch, generator)``.
- ``evaluate(model, store_or_loader, attacks=..., eps=..., normalize=None)``: any
  ``nn.Module`` of [0, 1] images (or a run directory) under the strong protocol; returns
  the dict of eval.json.
- ``train(TrainConfig(...))``: what ``sattrain run`` does; ``TrainConfig`` its options.
- ``sat_perturb``, ``curriculum_p``: the perturbation as functions; ``pgd``, ``trades_adv``:
  the training-time attacks; ``method_names``, ``get_method``; ``create_model``,
  ``model_names``, ``load_model`` (a run's trained model).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it (imported on first use: `import sattrain` stays cheap)
_PUBLIC = {
    "StoreDataset": "sattrain.loader",
    "StoreLoader": "sattrain.loader",
    "Batch": "sattrain.data",
    "SATPerturbation": "sattrain.perturb",
    "sat_perturb": "sattrain.perturb",
    "curriculum_p": "sattrain.perturb",
    "evaluate": "sattrain.evaluation",
    "format_table": "sattrain.evaluation",
    "train": "sattrain.trainer",
    "TrainConfig": "sattrain.config",
    "pgd": "sattrain.attacks",
    "trades_adv": "sattrain.attacks",
    "method_names": "sattrain.methods",
    "get_method": "sattrain.methods",
    "create_model": "sattrain.models",
    "model_names": "sattrain.models",
    "load_model": "sattrain.checkpoint",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'sattrain' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
