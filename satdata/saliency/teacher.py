"""Load a frozen teacher for saliency maps: a sattrain run or checkpoint, or torchvision.

Two kinds of teacher:

* a sattrain run directory or checkpoint file (``sattrain.checkpoint.load_model``): the
  model takes images in [0, 1] as trained, and names its last conv stage;
* a torchvision classification architecture with a local weights file
  (``--arch resnet50 --weights resnet50.pth``), read with ``torch.load(weights_only=True)``
  so a foreign file cannot run code. The number of classes is read from the weights'
  classifier (e.g. ``fc.weight``). Store images are in [0, 1], and torchvision's weights
  expect ImageNet mean/std normalisation, so the network is wrapped in
  ``ImageNetNormalized``, which normalises inside the model. Nothing is downloaded.

The teacher is identified in a map's provenance by the sha256 of the file it was loaded
from, so a map can be traced back to the exact weights.

>>> teacher = load_teacher("runs/resnet34-adv")                        # doctest: +SKIP
>>> teacher = load_teacher(arch="resnet50", weights="resnet50.pth")     # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn

from satdata.errors import SatkitError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Teacher:
    """A loaded teacher: the model (eval mode, parameters frozen) and where it came from."""

    model: nn.Module
    kind: str  # "sattrain" or "torchvision"
    arch: str
    path: str  # the file the weights came from (resolved)
    sha256: str
    num_classes: int
    classes: list[str] | None = None
    image_size: tuple[int, int] | None = None
    label_kind: str | None = None
    spec: dict[str, Any] = field(default_factory=dict)

    def provenance(self) -> dict[str, Any]:
        """What identifies this teacher in a map's provenance."""
        d: dict[str, Any] = {"kind": self.kind, "arch": self.arch, "path": self.path,
                             "sha256": self.sha256, "num_classes": self.num_classes}
        if self.kind == "torchvision":
            d["normalisation"] = {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
        if self.image_size is not None:
            d["image_size"] = list(self.image_size)
        if self.classes is not None:
            d["classes"] = list(self.classes)
        return d


class ImageNetNormalized(nn.Module):
    """A torchvision classifier that takes images in [0, 1]: (x - mean) / std, then net.

    ``features_out`` is the network's last conv stage where torchvision names one
    (``layer4`` of ResNets, ``features`` of VGG/DenseNet/MobileNet/EfficientNet/...), so
    Grad-CAM finds it; the CAM layer search falls back to an earlier stage when that one
    is too small for the store's image size.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        stage = getattr(net, "layer4", None)
        if stage is None:
            stage = getattr(net, "features", None)
        if isinstance(stage, nn.Module):
            self.features_out = stage

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _freeze(model: nn.Module) -> nn.Module:
    # Our own freshly loaded copy: freezing it saves the parameter-gradient graph.
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _state_dict_of(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """A state dict from what a weights file holds: the dict itself, or under 'state_dict'/'model'."""
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "model_state_dict"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise SatkitError(f"{path}: not a state dict of tensors (nor one under 'state_dict' or 'model')")
    sd = {str(k): v for k, v in obj.items()}
    if all(k.startswith("module.") for k in sd):  # saved from DataParallel / DDP
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _num_classes(sd: Mapping[str, torch.Tensor], path: Path) -> int:
    for key in ("fc.weight", "classifier.weight", "head.weight", "heads.head.weight"):
        if key in sd and sd[key].ndim == 2:
            return int(sd[key].shape[0])
    linear = [k for k, v in sd.items() if k.endswith(".weight") and v.ndim == 2]
    if not linear:
        raise SatkitError(f"{path}: cannot tell the number of classes (no 2-D classifier weight)")
    return int(sd[linear[-1]].shape[0])


def load_torchvision(arch: str, weights: str | Path, device: str | torch.device = "cpu") -> Teacher:
    """A torchvision classifier with weights from a local file, wrapped to take [0, 1] images."""
    import torchvision.models as tvm

    known = tvm.list_models(module=tvm)
    if arch not in known:
        raise SatkitError(f"--arch: {arch!r} is not a torchvision classification model "
                          f"(e.g. {', '.join(k for k in known if k.startswith('resnet'))})")
    path = Path(weights)
    if not path.is_file():
        raise SatkitError(f"--weights {weights}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SatkitError(f"{path}: not a weights file torch.load(weights_only=True) can read "
                          f"({type(e).__name__}: {e})") from None
    sd = _state_dict_of(obj, path)
    nc = _num_classes(sd, path)
    try:
        net = tvm.get_model(arch, weights=None, num_classes=nc)
    except Exception as e:
        raise SatkitError(f"--arch {arch}: cannot build it with {nc} classes ({type(e).__name__}: {e})") from None
    try:
        net.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise SatkitError(f"{path}: weights do not fit torchvision {arch} ({first})") from None
    model = _freeze(ImageNetNormalized(net)).to(device)
    return Teacher(model=model, kind="torchvision", arch=arch, path=str(path.resolve()),
                   sha256=file_sha256(path), num_classes=nc)


def load_sattrain(run_or_ckpt: str | Path, device: str | torch.device = "cpu") -> Teacher:
    """The model of a sattrain run directory or checkpoint file."""
    from sattrain.checkpoint import load_model, resolve_checkpoint

    path = resolve_checkpoint(run_or_ckpt)
    model, spec = load_model(path, device)
    size = spec.get("image_size")
    image_size = None
    if size is not None:
        image_size = (int(size[0]), int(size[1])) if isinstance(size, (list, tuple)) else (int(size), int(size))
    classes = spec.get("classes")
    return Teacher(model=_freeze(model), kind="sattrain", arch=str(spec["name"]), path=str(path.resolve()),
                   sha256=file_sha256(path), num_classes=int(spec["num_classes"]),
                   classes=[str(c) for c in classes] if classes else None, image_size=image_size,
                   label_kind=spec.get("label_kind"), spec=dict(spec))


def load_teacher(teacher: str | Path | None = None, *, arch: str | None = None,
                 weights: str | Path | None = None, device: str | torch.device = "cpu") -> Teacher:
    """A teacher from ``teacher`` (a sattrain run dir or checkpoint) or ``arch`` + ``weights``."""
    if teacher is not None and (arch or weights):
        raise SatkitError("--teacher: give a sattrain run/checkpoint, or --arch with --weights, not both")
    if teacher is not None:
        return load_sattrain(teacher, device)
    if arch and weights:
        return load_torchvision(arch, weights, device)
    if arch or weights:
        raise SatkitError("--arch and --weights go together (a torchvision architecture and its weights file)")
    raise SatkitError("--teacher: required (a sattrain run directory or checkpoint), or --arch with --weights")


__all__ = ["ImageNetNormalized", "Teacher", "file_sha256", "load_sattrain", "load_teacher", "load_torchvision"]
