"""A store for one's own training script: a torch Dataset, and satkit's fast batch iterator.

``StoreDataset(store, split, maps=..., transform=...)`` is a ``torch.utils.data.Dataset`` of
``(image, label)`` or ``(image, label, S)``: image float32 (3, H, W) in [0, 1]; label an
int64 class index (a float multi-hot vector for multi-label stores); S the saliency map as
float32 (C, H, W) in [-1, 1] (C = 1 for masks, boxes and CAMs: broadcast it over the
channels), decoded from its stored integers exactly as ``sattrain run`` does. Use it with
any DataLoader, sampler and transform.

``StoreLoader(store, split, batch_size, device, maps=..., augment=...)`` is what ``sattrain
run`` trains from: the split read once into (device) memory in whole chunks, or streamed in
shuffled blocks when it is larger than ``memory_budget``; each batch indexed, augmented
(image and map together) and converted on the device. Iterating it gives one epoch of
``sattrain.data.Batch(x, y, S)`` on ``device``, reshuffled each epoch from ``seed``. It is
several times faster than a per-sample Dataset with DataLoader workers (BENCHMARKS.md,
section 1): prefer it when the data fit the machine.

Both take a store path, an ``http(s)://`` or ``s3://`` URL (with ``storage_options``), or an
open ``satdata.store.Store``.
"""

from __future__ import annotations

import random
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch

from satdata.errors import SatkitError
from satdata.store import Store, open_store
from sattrain.config import DEFAULT_MEMORY_BUDGET, resolve_augment
from sattrain.data import (Batch, InMemorySplit, MapCodec, StreamingSplit, derive_seed, images_to_float,
                           load_split, make_generator, map_codec, num_batches, open_train_split, prepare_batch,
                           sample_bytes, saliency_from_stored)

__all__ = ["StoreDataset", "StoreLoader"]


def _open(store: str | Store, storage_options: Mapping[str, Any] | None) -> Store:
    if isinstance(store, Store):
        return store
    return open_store(str(store), storage_options=storage_options)


def _maps(store: Store, maps: str | Sequence[str] | None) -> tuple[str, ...]:
    names = (maps,) if isinstance(maps, str) else tuple(maps or ())
    if len(set(names)) != len(names):
        raise SatkitError(f"maps: a map is named twice ({', '.join(names)})")
    for name in names:
        map_codec(store, name)  # SatkitError listing the store's maps
    return names


def _split(store: Store, split: str) -> int:
    if split not in store.info.splits:
        raise SatkitError(f"split: {store.path} has no split {split!r} (splits: {', '.join(store.info.splits)})")
    return int(store.info.splits[split])


class StoreDataset(torch.utils.data.Dataset):
    """A split of a store as a map-style torch Dataset (see the module docstring).

    ``maps``: None (items are ``(image, label)``), one map name (``(image, label, S)``) or
    several (``(image, label, {name: S})``). ``transform``: called as ``transform(image)``
    or ``transform(image, S)`` (``transform(image, *maps)`` for several) and returning the
    same arguments, so a joint transform moves the image and its maps together, e.g.
    ``torchvision.transforms.v2`` with the maps wrapped as ``tv_tensors.Mask``.

    The split is read into host memory once, in whole chunks, when it fits
    ``memory_budget`` (8 GiB by default); larger splits are read per sample from the store
    (correct, but slow on chunked stores: use StoreLoader). DataLoader worker processes
    share the loaded arrays (fork) or receive a copy (spawn).
    """

    def __init__(self, store: str | Store, split: str = "train", maps: str | Sequence[str] | None = None,
                 transform: Callable[..., Any] | None = None, *, storage_options: Mapping[str, Any] | None = None,
                 memory_budget: int = DEFAULT_MEMORY_BUDGET, progress: bool = False) -> None:
        st = _open(store, storage_options)
        self.store_path = st.path
        self.split = split
        self.n = _split(st, split)
        self.map_names = _maps(st, maps)
        self.codecs: dict[str, MapCodec] = {m: map_codec(st, m) for m in self.map_names}
        self.classes = list(st.info.classes)
        self.multilabel = st.info.label_kind == "multi"
        self.transform = transform
        self._storage_options = dict(storage_options or {})
        self._store: Store | None = st
        if self.n * sample_bytes(st, split, self.map_names) <= memory_budget:
            host = load_split(st, split, self.map_names, np.arange(self.n), progress=progress)
            self._images, self._labels, self._held = host.images, host.labels, host.maps
        else:
            self._images = self._labels = None
            self._held = {}

    def __len__(self) -> int:
        return self.n

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers (spawn) reopen the store themselves
        state = dict(self.__dict__)
        state["_store"] = None
        return state

    def _row(self, field_name: str, i: int, map_name: str | None = None) -> np.ndarray:
        if self._store is None:
            self._store = open_store(self.store_path, storage_options=self._storage_options or None)
        return np.asarray(self._store.array(self.split, field_name, map_name)[i:i + 1])

    def __getitem__(self, i: int) -> tuple[Any, ...]:
        if not -self.n <= i < self.n:
            raise IndexError(f"index {i} is out of range for {self.n} samples of {self.split}")
        i = int(i) % self.n
        if self._images is not None:
            img, lab = self._images[i:i + 1], self._labels[i:i + 1]
            maps = {m: self._held[m][i:i + 1] for m in self.map_names}
        else:
            img, lab = self._row("images", i), self._row("labels", i)
            maps = {m: self._row("saliency", i, m) for m in self.map_names}
        x = images_to_float(torch.from_numpy(np.ascontiguousarray(img)))[0]
        y = torch.from_numpy(lab.astype(np.float32 if self.multilabel else np.int64))[0]
        S = [saliency_from_stored(torch.from_numpy(np.ascontiguousarray(maps[m])), self.codecs[m])[0]
             for m in self.map_names]
        if self.transform is not None:
            out = self.transform(x, *S)
            x, S = (out[0], list(out[1:])) if S else (out, [])
        if not self.map_names:
            return x, y
        if len(self.map_names) == 1:
            return x, y, S[0]
        return x, y, dict(zip(self.map_names, S))


class StoreLoader:
    """satkit's batch iterator over a split (see the module docstring).

    ``maps``: None, one name, or several (each epoch then uses one of them, drawn from
    ``seed``, as ``sattrain run`` does with a map ensemble; ``map_name`` says which).
    ``augment``: "auto" (random crop with padding 4, plus a horizontal flip when the
    store says mirrored images keep their class), "crop+flip", "crop" or "none".
    ``shuffle=False`` gives the samples in order and no augmentation draws change that
    order (it needs the split in memory). Batches of a single sample are dropped (batch
    norm needs two).
    """

    def __init__(self, store: str | Store, split: str = "train", batch_size: int = 128,
                 device: str | torch.device = "cpu", maps: str | Sequence[str] | None = None, *,
                 augment: str = "auto", shuffle: bool = True, seed: int = 0,
                 memory_budget: int = DEFAULT_MEMORY_BUDGET, storage_options: Mapping[str, Any] | None = None,
                 progress: bool = False) -> None:
        if not (isinstance(batch_size, int) and batch_size >= 2):
            raise SatkitError(f"batch_size: must be an integer >= 2 (batch norm needs two samples), got {batch_size!r}")
        st = _open(store, storage_options)
        self.store = st
        self.split = split
        n = _split(st, split)
        self.map_names = _maps(st, maps)
        self.codecs = {m: map_codec(st, m) for m in self.map_names}
        self.multilabel = st.info.label_kind == "multi"
        self.augment = resolve_augment(augment, bool(getattr(st.info, "hflip", True)))
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.epoch = 0
        self.map_name: str | None = self.map_names[0] if self.map_names else None
        self.data = open_train_split(st, split, self.map_names, np.arange(n), self.device, memory_budget,
                                     progress=progress, seed=self.seed)
        if not shuffle and not isinstance(self.data, InMemorySplit):
            raise SatkitError(f"shuffle=False: {split} of {st.path} is larger than memory_budget and is streamed in "
                              "shuffled blocks; raise memory_budget or iterate it shuffled")

    @property
    def placement(self) -> str:
        """Where the split lives: "device", "host" (copied per batch) or "stream"."""
        return str(self.data.placement)

    def __len__(self) -> int:
        return num_batches(self.data.n, self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration epoch ``epoch`` (shuffling, augmentation and map choice are
        seeded from (seed, epoch), so an epoch is the same however it is reached)."""
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[Batch]:
        epoch = self.epoch
        self.epoch += 1
        if self.map_names:
            self.map_name = self.map_names[random.Random(derive_seed(self.seed, epoch, "map")).randrange(len(self.map_names))]
        if isinstance(self.data, StreamingSplit):
            self.data.set_epoch(epoch)
        codec = self.codecs.get(self.map_name) if self.map_name else None
        aug_gen = make_generator(self.device, derive_seed(self.seed, epoch, "augment"))
        shuffle = make_generator("cpu", derive_seed(self.seed, epoch, "shuffle")) if self.shuffle else None
        for raw in self.data.batches(self.batch_size, shuffle, self.map_name):
            yield prepare_batch(raw, codec, multilabel=self.multilabel, augment=self.augment, generator=aug_gen)
