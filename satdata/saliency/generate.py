"""``satdata saliency``: a teacher's maps for a store's splits, added to it atomically.

``generate_maps(SaliencyConfig(...))`` loads the teacher (satdata/saliency/teacher.py),
scores it on the store's held-out split first (``check_teacher_accuracy``), then computes
the chosen algorithm's maps (satdata/saliency/methods.py) batch by batch on the device,
one class per image (``choose_target``: the teacher's prediction, or the label), with the
noise of each batch seeded by its position (``noise_seed``), quantises them to the map's
encoding (``to_stored``: ``satdata.store.encode_map``) and writes them through
``satdata.addmap.add_map``, whose write-aside-then-commit leaves the store as it was on any
failure. ``--dask`` computes the batches on Dask workers (satdata/saliency/dask.py).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn as nn

from satdata.errors import SatkitError
from satdata.saliency.methods import (Algorithm, AlgorithmOptions, CamLayer, algorithm_parameters, compute,
                                      find_cam_layer, frozen, get_algorithm, predict)
from satdata.store import encode_map
from sattrain.device import resolve_device

TARGET_RULES = ("predicted", "label")


def choose_target(logits: torch.Tensor, labels: torch.Tensor | None, rule: str) -> torch.Tensor:
    """The class each map is computed for.

    ``predicted``: the teacher's argmax. ``label``: the true label; with multi-hot labels
    (B, K), the labelled class the teacher scores highest (an image with no label falls
    back to the prediction).
    """
    if rule == "predicted":
        return logits.argmax(1)
    if rule != "label":
        raise SatkitError(f"--target: unknown rule {rule!r} (one of {', '.join(TARGET_RULES)})")
    if labels is None:
        raise SatkitError("--target label: no labels given")
    if labels.ndim == 1:
        return labels.long()
    if labels.shape[1] != logits.shape[1]:
        raise SatkitError(f"--target label: labels have {labels.shape[1]} classes, the teacher {logits.shape[1]}")
    masked = torch.where(labels.bool(), logits, torch.full_like(logits, float("-inf")))
    return torch.where(labels.bool().any(1), masked.argmax(1), logits.argmax(1))

def to_stored(s: torch.Tensor, encoding: str) -> torch.Tensor:
    """Quantise maps in S units to a store's integers, channels last (``satdata.store.encode_map``).

    unit: uint8 round(255 s), s in [0, 1]; signed: int8 round(127 s), s in [-1, 1];
    binary: uint8 (s > 0). (B, C, H, W) becomes (B, H, W, C); (B, H, W) stays.
    """
    if s.ndim == 4:
        s = s.permute(0, 2, 3, 1)
    return encode_map(s, encoding)


# --------------------------------------------------------------------------- teacher check

HELDOUT_SPLITS = ("test", "val")  # the held-out split the teacher is scored on, in preference
HELDOUT_MAX_SAMPLES = 1000  # a seeded subset keeps the check to a few seconds
HELDOUT_SEED = 0


def low_accuracy_threshold(num_classes: int) -> float:
    """The accuracy below which a teacher's maps are not worth having: (1 + 1/K) / 2.

    Halfway between chance (1/K) and perfect: a teacher below it is closer to guessing
    than to knowing, and its gradients explain its guesses, not the classes (0.55 for 10
    classes, 0.75 for 2, just above 0.5 for many). A teacher at 0.19 on digits makes
    maps that are noise.
    """
    return (1.0 + 1.0 / max(1, num_classes)) / 2.0


@dataclass(frozen=True)
class TeacherCheck:
    """The teacher's top-1 accuracy on a held-out split, as the maps will see it.

    ``accuracy`` is measured in eval mode (BatchNorm with its running statistics), the
    mode every map is computed in. ``batch_stats_accuracy`` is filled only for a low
    teacher with BatchNorm layers: its accuracy with each batch's own statistics, which
    tells a teacher whose running statistics lag its weights (far higher) from one that
    has not learnt the task (as low).
    """

    split: str
    n: int  # samples scored
    of: int  # samples in the split
    seed: int
    accuracy: float
    num_classes: int
    threshold: float
    batch_stats_accuracy: float | None = None

    @property
    def chance(self) -> float:
        return 1.0 / self.num_classes

    @property
    def low(self) -> bool:
        return self.accuracy < self.threshold

    def summary(self) -> str:
        subset = (f"{self.n:,} of {self.n:,} samples" if self.n == self.of
                  else f"a random {self.n:,} of {self.of:,} samples, seed {self.seed}")
        return f"teacher accuracy on {self.split}: {self.accuracy:.3f} ({subset}, eval mode)"

    def warning(self) -> str | None:
        """A one-paragraph warning when the teacher is low, else None."""
        if not self.low:
            return None
        msg = (f"warning: the teacher's accuracy on {self.split} is {self.accuracy:.3f}, below "
               f"{self.threshold:.3f} (halfway between chance, {self.chance:.3f}, and 1), so its maps "
               "will be mostly noise. Train the teacher longer")
        if self.batch_stats_accuracy is not None and self.batch_stats_accuracy >= self.threshold:
            msg += (f": with batch statistics it scores {self.batch_stats_accuracy:.3f}, so its BatchNorm "
                    "running statistics lag its weights (maps use eval mode, i.e. the running statistics)")
        elif self.batch_stats_accuracy is not None:
            msg += f" (with batch statistics it scores {self.batch_stats_accuracy:.3f} too)"
        return msg + "."

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"split": self.split, "samples": self.n, "of": self.of, "seed": self.seed,
                             "accuracy": round(self.accuracy, 6), "mode": "eval",
                             "chance": round(self.chance, 6), "threshold": round(self.threshold, 6),
                             "low": self.low, "rule": "low when accuracy < (1 + 1/K) / 2"}
        if self.batch_stats_accuracy is not None:
            d["batch_stats_accuracy"] = round(self.batch_stats_accuracy, 6)
        return d


def _accuracy(model: nn.Module, images: Any, labels: Any, device: torch.device | str, batch_size: int) -> float:
    """Top-1 accuracy of ``model`` as it is (no mode change) on uint8 (N, H, W, 3) images."""
    correct = 0
    with torch.no_grad():
        for a in range(0, len(images), batch_size):
            x = batch_images(images[a:a + batch_size], device)
            y = torch.from_numpy(labels[a:a + batch_size]).to(device)
            correct += int((model(x).argmax(1) == y).sum())
    return correct / max(1, len(images))


def check_teacher_accuracy(model: nn.Module, store: Any, *, device: torch.device | str = "cpu",
                           batch_size: int = 256, max_samples: int = HELDOUT_MAX_SAMPLES,
                           seed: int = HELDOUT_SEED) -> TeacherCheck:
    """Score a teacher on the store's held-out split before it makes maps.

    The split is ``test``, else ``val``, else (a store without held-out data) ``train``;
    at most ``max_samples`` of it, picked with ``seed`` (sorted, so reads stay in order).
    The accuracy is taken in eval mode, as the maps are; for a low teacher with BatchNorm
    a copy of it is scored again with batch statistics to say why (see TeacherCheck).
    The model is left exactly as it was. The store must be single-label, with the
    teacher's classes in the store's order (the caller checks).
    """
    import numpy as np

    info = store.info
    split = next((s for s in HELDOUT_SPLITS if s in info.splits), next(iter(info.splits)))
    total = info.splits[split]
    k = min(total, max_samples)
    if k < total:
        idx = np.sort(np.random.default_rng(seed).choice(total, size=k, replace=False))
        images = np.asarray(store.array(split, "images").oindex[idx])
        labels = np.asarray(store.array(split, "labels").oindex[idx])
    else:
        images, labels = store.load(split, "images"), store.load(split, "labels")
    with frozen(model):
        acc = _accuracy(model, images, labels, device, batch_size)
    threshold = low_accuracy_threshold(len(info.classes))
    batch_acc = None
    if acc < threshold and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        import copy

        probe = copy.deepcopy(model).eval()  # a copy: batch-statistics passes update running stats
        for m in probe.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.train()
        batch_acc = _accuracy(probe, images, labels, device, max(batch_size, 64))
    return TeacherCheck(split=split, n=k, of=total, seed=seed, accuracy=acc, num_classes=len(info.classes),
                        threshold=threshold, batch_stats_accuracy=batch_acc)


# --------------------------------------------------------------------------- store driver


@dataclass(frozen=True)
class SaliencyConfig:
    """Everything that decides what ``satdata saliency`` adds to a store."""

    store: str
    method: str
    name: str | None = None  # None: the method's name
    teacher: str | None = None  # sattrain run dir or checkpoint
    arch: str | None = None  # or a torchvision architecture ...
    weights: str | None = None  # ... with its local weights file
    splits: tuple[str, ...] | None = None  # None: every split
    target: str = "predicted"
    batch_size: int = 256
    device: str = "auto"
    overwrite: bool = False
    layer: str | None = None
    seed: int = 0
    progress: bool = True
    dask: str | None = None  # compute on Dask workers: "local:N" or a scheduler address


@dataclass
class SaliencyResult:
    path: str
    name: str
    method: str
    info: Any  # the committed StoreInfo
    device: str
    cam_layer: CamLayer | None
    seconds: float
    teacher_accuracy: dict[str, float]  # per computed split, over all its samples
    teacher_check: TeacherCheck | None = None  # the held-out check made before any map


def _comparable(teacher: Any, info: Any) -> str | None:
    """Why the teacher's accuracy cannot be measured on this store, or None when it can."""
    if info.label_kind != "single":
        return "the store is multi-label"
    if teacher.num_classes != len(info.classes):
        return f"the teacher has {teacher.num_classes} classes, the store {len(info.classes)}"
    if teacher.classes is not None and list(teacher.classes) != list(info.classes):
        return "the teacher's classes are not the store's"
    return None


def _check_teacher(teacher: Any, info: Any, rule: str, where: str, log: Callable[[str], None]) -> None:
    n_classes = len(info.classes)
    if teacher.image_size is not None and tuple(teacher.image_size) != tuple(info.image_size):
        log(f"note: the teacher was trained at {teacher.image_size[0]}x{teacher.image_size[1]}, "
            f"the store's images are {info.image_size[0]}x{info.image_size[1]}")
    if rule != "label":
        if teacher.classes is not None and list(teacher.classes) != list(info.classes):
            log("note: the teacher's classes differ from the store's; maps are for its predicted class")
        return
    if teacher.num_classes != n_classes:
        raise SatkitError(f"--target label: the teacher has {teacher.num_classes} classes, {where} has "
                          f"{n_classes}, so labels do not name the teacher's classes")
    if teacher.classes is not None and list(teacher.classes) != list(info.classes):
        raise SatkitError(f"--target label: the teacher's classes are not {where}'s (same count, "
                          "other names or order), so labels do not name the teacher's classes")


def _versions() -> dict[str, str]:
    import platform

    import numpy
    import zarr

    v = {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
         "zarr": zarr.__version__}
    from importlib.metadata import PackageNotFoundError, version

    try:  # from the metadata: importing torchvision costs seconds
        v["torchvision"] = version("torchvision")
    except PackageNotFoundError:  # pragma: no cover
        pass
    return v


def noise_seed(seed: int, split: str, start: int) -> int:
    """The seed of the noise for the batch of ``split`` starting at sample ``start``: a
    batch's noise does not depend on which process computes it, or in what order."""
    import hashlib

    h = hashlib.sha256(f"satkit-noise/{seed}/{split}/{start}".encode()).digest()
    return int.from_bytes(h[:8], "little") & (2**63 - 1)


def batch_images(images: Any, device: torch.device | str) -> torch.Tensor:
    """uint8 (B, H, W, 3) images as float (B, 3, H, W) in [0, 1] on ``device``."""
    import numpy as np

    x = torch.from_numpy(np.ascontiguousarray(images)).to(device)
    return x.permute(0, 3, 1, 2).float().div_(255.0)


def map_batches(model: nn.Module, method: Algorithm, images: Any, labels: Any, *, split: str, start: int,
                batch_size: int, device: torch.device | str, cam_layer: CamLayer | None,
                options: AlgorithmOptions, target_rule: str) -> Iterator[tuple[Any, Any, int]]:
    """Maps for ``images`` (samples ``start``... of ``split``) in batches of ``batch_size``:
    (stored maps, the class each was computed for, how many the teacher got right).
    ``start`` must be a multiple of ``batch_size``: every caller then forms the same
    batches, so a range computed by a Dask worker equals the one-process result."""
    generator = torch.Generator(device=device) if method.uses_noise else None
    for a in range(0, len(images), batch_size):
        b = min(len(images), a + batch_size)
        x = batch_images(images[a:b], device)
        y = torch.from_numpy(labels[a:b]).to(device)
        logits = predict(model, x)
        target = choose_target(logits, y, target_rule)
        right = int((logits.argmax(1) == y).sum()) if y.ndim == 1 else 0
        if generator is not None:
            generator.manual_seed(noise_seed(options.seed, split, start + a))
        s = compute(method, model, x, target, cam_layer=cam_layer, options=options, generator=generator)
        yield to_stored(s, method.encoding).cpu().numpy(), target.cpu().numpy(), right


@contextmanager
def _maps_on_dask(cfg: "SaliencyConfig", store: Any, splits: Sequence[str], cam_layer: CamLayer | None,
                  bar: Any, accuracy: dict[str, float]) -> Iterator[Any]:
    """A ``produce`` for add_map that gathers maps computed on Dask workers
    (satdata/saliency/dask.py), or None without --dask."""
    if not cfg.dask:
        yield None
        return
    from satdata.saliency.dask import maps_on_dask

    with maps_on_dask(cfg, store, splits, cam_layer, bar, accuracy) as produce:
        yield produce


def generate_maps(cfg: SaliencyConfig, log: Callable[[str], None] = lambda m: None) -> SaliencyResult:
    """Compute a method's maps with a frozen teacher for a store's splits and add them.

    Images are read a split at a time into memory and sent to the device in batches of
    ``batch_size``; the maps are quantised on the device and written by
    ``satdata.addmap.add_map`` (atomic: a failure or kill leaves the store as it was).
    The map's provenance records the teacher (file sha256, path, arch), the method and
    its parameters (e.g. the CAM layer actually used), the target rule, the device,
    the teacher's accuracy on each split's labels, versions and the creation time.

    Before any map is computed, the teacher is scored on the store's held-out split
    (``check_teacher_accuracy``): the result is logged, recorded as the provenance's
    ``teacher_heldout``, and a low teacher gets a logged warning (the maps are still
    made). Each map is stored with the class it was computed for (``NewMap.targets``).
    """
    import time
    from datetime import datetime, timezone

    import numpy as np

    from satdata import __version__
    from satdata.addmap import NewMap, add_map, check_can_add, check_map_name
    from satdata.saliency.teacher import load_teacher

    from satdata.remote import is_url, is_zip, redact

    if is_url(str(cfg.store)) or is_zip(str(cfg.store)):
        where = "at a URL" if is_url(str(cfg.store)) else "packed in a .zip"
        raise SatkitError(f"{redact(str(cfg.store))}: satdata saliency adds maps to a local store directory, and this "
                          f"store is {where} (read-only); copy it here first (`satdata fetch URL --out NAME.zarr`)")
    t0 = time.time()
    method = get_algorithm(cfg.method)
    name = check_map_name(cfg.name or method.name)
    if cfg.target not in TARGET_RULES:
        raise SatkitError(f"--target: unknown rule {cfg.target!r} (one of {', '.join(TARGET_RULES)})")
    if cfg.dask:
        from satdata.dask_build import check_address

        check_address(cfg.dask)
    if cfg.batch_size < 1:
        raise SatkitError(f"--batch-size: must be at least 1, got {cfg.batch_size}")
    if cfg.layer and not method.uses_cam_layer:
        raise SatkitError(f"--layer: method {method.name} uses no CAM layer")
    new = NewMap(name=name, encoding=method.encoding, kind=method.name, channels=method.channels)
    store, compute_splits = check_can_add(cfg.store, name, splits=cfg.splits, overwrite=cfg.overwrite, new=new)
    info = store.info
    device = resolve_device(cfg.device)
    teacher = load_teacher(cfg.teacher, arch=cfg.arch, weights=cfg.weights, device=device)
    _check_teacher(teacher, info, cfg.target, cfg.store, log)
    model = teacher.model
    options = AlgorithmOptions(layer=cfg.layer, seed=cfg.seed)
    check: TeacherCheck | None = None
    why_not = _comparable(teacher, info)
    if why_not is None:
        check = check_teacher_accuracy(model, store, device=device, batch_size=cfg.batch_size)
        log(check.summary())
        warning = check.warning()
        if warning:
            log(warning)
    else:
        log(f"teacher accuracy: not measured ({why_not})")

    cam_layer = None
    if method.uses_cam_layer:
        first = store.array(compute_splits[0], "images")[:1]
        cam_layer = find_cam_layer(model, batch_images(first, device), cfg.layer)
        stage = getattr(model, "features_out", None)
        stage_name = {id(m): n for n, m in model.named_modules()}.get(id(stage))
        if not cfg.layer and stage_name and stage_name != cam_layer.name:
            log(f"Grad-CAM layer: {cam_layer.name} ({cam_layer.hw[0]}x{cam_layer.hw[1]}), because the last "
                f"conv stage {stage_name} is smaller than 2x2 at {info.image_size[0]}x{info.image_size[1]}")
    accuracy: dict[str, float] = {}
    provenance: dict[str, Any] = {
        "teacher": teacher.provenance(),
        "method": method.name,
        "parameters": algorithm_parameters(method, options, cam_layer),
        "target": cfg.target,
        "device": str(device) + (f" on Dask workers ({cfg.dask})" if cfg.dask else ""),
        "batch_size": cfg.batch_size,
        "tool": f"satkit {__version__}",
        "versions": _versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "teacher_accuracy": accuracy,
        "teacher_heldout": check.to_json() if check is not None else {"not_measured": why_not},
    }
    new = NewMap(name=name, encoding=method.encoding, kind=method.name, channels=method.channels,
                 provenance=provenance, targets=True)
    from tqdm.auto import tqdm

    total = sum(info.splits[s] for s in compute_splits)
    bar = tqdm(total=total, desc=f"{method.name}", unit="img", disable=not cfg.progress, dynamic_ncols=True,
               leave=False)

    def produce_here(split: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        images = store.load(split, "images")
        labels_np = store.load(split, "labels")
        correct = 0
        bar.set_description(f"{method.name} {split}")
        for stored, target, right in map_batches(model, method, images, labels_np, split=split, start=0,
                                                 batch_size=cfg.batch_size, device=device, cam_layer=cam_layer,
                                                 options=options, target_rule=cfg.target):
            correct += right
            yield stored, target
            bar.update(len(stored))
        if labels_np.ndim == 1 and len(images):
            accuracy[split] = round(correct / len(images), 6)

    from satdata.atomic import sigterm_as_interrupt

    try:
        with sigterm_as_interrupt(), _maps_on_dask(cfg, store, compute_splits, cam_layer, bar, accuracy) as remote:
            committed = add_map(cfg.store, new, remote or produce_here, splits=compute_splits,
                                overwrite=cfg.overwrite, log=log)
    finally:
        bar.close()
    return SaliencyResult(path=cfg.store, name=name, method=method.name, info=committed, device=str(device),
                          cam_layer=cam_layer, seconds=time.time() - t0, teacher_accuracy=dict(accuracy),
                          teacher_check=check)


__all__ = [
    "HELDOUT_MAX_SAMPLES", "SaliencyConfig", "SaliencyResult", "TARGET_RULES", "TeacherCheck", "batch_images",
    "check_teacher_accuracy", "choose_target", "generate_maps", "low_accuracy_threshold", "map_batches",
    "noise_seed", "resolve_device", "to_stored",
]
