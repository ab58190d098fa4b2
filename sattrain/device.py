"""The one rule for ``--device`` across satkit's commands (train, eval, saliency)."""

from __future__ import annotations

import torch

from satdata.errors import SatkitError


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; anything else must name a present device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise SatkitError(f"--device: {device!r} is not a device (auto, cpu, cuda, cuda:1, ...)") from None
    if dev.type not in ("cpu", "cuda"):  # meta, mps, xla, ...: torch knows them, satkit runs on neither
        raise SatkitError(f"--device: {device!r} is not a device satkit runs on (auto, cpu, cuda, cuda:1, ...)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SatkitError(f"--device {device}: CUDA is not available to this torch ({torch.__version__}), "
                          "so no CUDA device can be used; use --device cpu or auto")
    return dev
