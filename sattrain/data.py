"""Training data from a store: whole splits in (device) memory, batches, augmentation, S.

A split is read once, in slabs of whole chunks with a progress bar, and kept as the
stored integers (uint8 images NHWC, uint8/int8 maps): a quarter of the memory of floats.
Where it goes is decided from its size (``plan_placement``):

* ``device``: it fits the device (on CUDA: half of the free memory), so every batch is
  an index into device tensors: no host work and no transfer per step;
* ``host``: CUDA, but it does not fit the device: batches are indexed on the host and
  copied;
* ``stream``: larger than ``--memory-budget``: the split is streamed from the store in
  blocks of whole chunks, in a shuffled chunk order, with a background thread that reads
  the next block (and on CUDA moves it to the device) while the current one trains;
  samples are shuffled within each block. The two blocks, each held once, fit the budget
  (``STREAM_BLOCKS_ALIVE``). Per-sample store reads never happen in the loop: random
  reads from zarr run about 1,000x slower than indexing memory (docs/design.md).

Per batch, on the batch's device: the same random crop (zero padding 4) and, unless the
run's ``--augment`` is ``crop`` (the default for stores whose images must not be
mirrored, ``StoreInfo.hflip`` False, e.g. digits), the same horizontal flip for the image
and its map (``crop_flip``), conversion to floats in [0, 1], and the
saliency ``S = scale * q + offset`` from the map's encoding
(``satdata.store.MapInfo.affine``). Single-channel maps stay (B, 1, H, W) and are
broadcast over RGB by the perturbation.

All randomness comes from generators the caller seeds (``derive_seed``), so a run is
reproducible and a resumed run draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

import mmap
import queue
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from satdata.errors import SatkitError
from satdata.store import (Store, StoreChangedError, chunk_rows, decode_map, is_local, iter_chunks, read_rows_into,
                           take_rows, write_unit)

CROP_PADDING = 4
# Reads go in slabs of whole chunks of about this many bytes: large enough that zarr reads
# the chunks of a slab concurrently, small enough for a progress bar that moves.
SLAB_BYTES = 64 * 1024**2
# Share of the free CUDA memory a split may take; the rest is for the model and activations.
DEVICE_SHARE = 0.5
# A streamed split has at most this many blocks in memory at once, each held once (one
# array per field, filled in place): the one training and the one read ahead. Blocks are
# at most 1/STREAM_BLOCKS_ALIVE of --memory-budget, so all of them together fit it.
STREAM_BLOCKS_ALIVE = 2
# What a streamed epoch holds beyond --memory-budget, the model and one batch's own work
# (prepare_batch, the step): a chunk per array being decoded, the partial batch carried
# from one block to the next, the labels and orders, allocator slack (bench/stream_memory.py
# measures it). Over a network add satdata.chunkio's window of chunks in flight.
STREAM_CONSTANT_BYTES = 64 * 1024**2
# A file of which a block needs only some samples is read in pieces of about this size.
STREAM_PIECE_BYTES = 8 * 1024**2


def derive_seed(seed: int, *keys: int | str) -> int:
    """A 63-bit seed from the run seed and keys such as (epoch, "shuffle").

    Every random stream of a run is seeded this way, from (seed, epoch, stream) alone, so
    epoch e draws the same numbers whether or not the run was interrupted before it.
    """
    ints = [int(seed) & 0xFFFFFFFF, (int(seed) >> 32) & 0xFFFFFFFF]
    for k in keys:
        ints.append(zlib.crc32(k.encode()) if isinstance(k, str) else int(k) & 0xFFFFFFFF)
    state = np.random.SeedSequence(ints).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & 0x7FFF_FFFF_FFFF_FFFF


def make_generator(device: torch.device | str, seed: int) -> torch.Generator:
    """A torch.Generator on ``device`` seeded with ``seed``."""
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


# --------------------------------------------------------------------------- maps


@dataclass(frozen=True)
class MapCodec:
    """How to turn one stored map into S: S = scale * q + offset."""

    name: str
    kind: str
    encoding: str
    scale: float
    offset: float
    channels: int


def map_codec(store: Store, name: str) -> MapCodec:
    """The codec of a named map; SatkitError listing the store's maps if it has no such map."""
    info = store.info.maps.get(name)
    if info is None:
        known = ", ".join(store.info.maps) or "none"
        raise SatkitError(f"--map: {store.path} has no map {name!r} (maps in the store: {known})")
    scale, offset = info.affine()
    return MapCodec(name, info.kind, info.encoding, float(scale), float(offset), int(info.channels))


def choose_maps(store: Store, requested: Sequence[str], method: str, needs_map: bool) -> tuple[str, ...]:
    """The maps a run uses: the requested ones (checked), else the store's first map.

    Methods that do not use a map load none (requested names are still checked, so a
    typo is not silently ignored). A method that needs a map, on a store without maps,
    is an error naming the store.
    """
    for name in requested:
        map_codec(store, name)
    if len(set(requested)) != len(requested):
        raise SatkitError(f"--map: a map is named twice ({', '.join(requested)})")
    if not needs_map:
        return ()
    if requested:
        return tuple(requested)
    if not store.info.maps:
        raise SatkitError(
            f"--method {method}: needs a saliency map, and {store.path} has none (maps in the store: none); "
            "add one with `satdata saliency`, or train standard, noise, pgd or trades"
        )
    return (next(iter(store.info.maps)),)


def saliency_from_stored(q: torch.Tensor, codec: MapCodec) -> torch.Tensor:
    """S = scale * q + offset as float32 (``satdata.store.decode_map``), (B, H, W[, C]) stored
    layout -> (B, C, H, W)."""
    if q.dim() == 3:
        q = q.unsqueeze(-1)
    return decode_map(q.permute(0, 3, 1, 2), codec)


def images_to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float32 (B, 3, H, W) in [0, 1]."""
    return images.permute(0, 3, 1, 2).to(torch.float32).div_(255.0).contiguous()


# --------------------------------------------------------------------------- augmentation


def crop_flip(
    images: torch.Tensor,
    maps: torch.Tensor | None,
    *,
    generator: torch.Generator | None = None,
    padding: int = CROP_PADDING,
    flip: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Random crop after zero padding, and a random horizontal flip, per sample.

    ``images``: (B, H, W, C) and ``maps``: (B, H, W) or (B, H, W, C') in stored layout
    (any dtype). Both get the *same* crop offset and flip for a sample, so the map stays
    on its object. Padding is 0 in both: black in the image, and the stored value 0 in
    the map (background for a binary mask: S = -1; zero saliency for unit and signed).
    One gather per tensor, on the tensors' device, no host synchronisation.
    """
    b, h, w = images.shape[:3]
    dev = images.device
    if generator is not None and generator.device.type != dev.type:
        raise SatkitError(f"augmentation: generator is on {generator.device}, the batch on {dev}")
    if maps is not None and tuple(maps.shape[:3]) != (b, h, w):
        raise SatkitError(f"augmentation: maps of shape {tuple(maps.shape)} do not fit images of shape {tuple(images.shape)}")
    oy = torch.randint(0, 2 * padding + 1, (b, 1), generator=generator, device=dev)
    ox = torch.randint(0, 2 * padding + 1, (b, 1), generator=generator, device=dev)
    ar_h = torch.arange(h, device=dev)
    ar_w = torch.arange(w, device=dev)
    if flip:
        flips = torch.randint(0, 2, (b, 1), generator=generator, device=dev).bool()
        col_base = torch.where(flips, (w - 1) - ar_w, ar_w)
    else:
        col_base = ar_w.expand(b, w)
    hp, wp = h + 2 * padding, w + 2 * padding
    rows = (oy + ar_h)[:, :, None]  # (B, H, 1), indices into the padded image
    cols = (ox + col_base)[:, None, :]  # (B, 1, W)
    bidx = torch.arange(b, device=dev)[:, None, None]
    # One flat row index per output pixel: a single index_select per tensor (several times
    # faster than advanced indexing padded[bidx, rows, cols] for uint8 on the CPU).
    flat = ((bidx * hp + rows) * wp + cols).reshape(-1)

    def apply(t: torch.Tensor) -> torch.Tensor:
        squeeze = t.dim() == 3
        t4 = t.unsqueeze(-1) if squeeze else t
        padded = F.pad(t4, (0, 0, padding, padding, padding, padding))
        out = padded.reshape(b * hp * wp, t4.shape[-1]).index_select(0, flat).reshape(b, h, w, t4.shape[-1])
        return out.squeeze(-1) if squeeze else out

    return apply(images), (apply(maps) if maps is not None else None)


# --------------------------------------------------------------------------- reading


def select_indices(n: int, count: int | None, seed: int) -> np.ndarray:
    """Sorted indices of a random subset of ``count`` of ``n`` samples (all when None or >= n)."""
    if count is None or count >= n:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=count, replace=False)).astype(np.int64)


def split_holdout(n: int, holdout: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(the training pool, the held-out samples): ``holdout`` seeded samples of a split of
    ``n`` taken out of training (--holdout), both sorted and disjoint, together all ``n``.
    ``holdout`` None (or 0): the whole split is the pool and nothing is held out. The same on
    every process for the same arguments (a seeded permutation).

    Raises SatkitError naming --holdout when fewer than two samples would be left to train on
    (batch norm needs two).

    >>> pool, held = split_holdout(10, 3, seed=0)
    >>> len(pool), len(held), sorted(np.concatenate([pool, held]).tolist()) == list(range(10))
    (7, 3, True)
    >>> split_holdout(4, None, seed=0)[0].tolist(), split_holdout(4, None, seed=0)[1].tolist()
    ([0, 1, 2, 3], [])
    """
    if not holdout:
        return np.arange(n, dtype=np.int64), np.zeros(0, dtype=np.int64)
    if n - holdout < 2:
        raise SatkitError(f"--holdout {holdout}: the train split has {n:,} samples, and holding {holdout:,} of them "
                          f"out leaves {max(0, n - holdout)} to train on (at least 2 are needed); give a smaller "
                          f"--holdout (the monitor's samples are taken out of training)")
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[holdout:]).astype(np.int64), np.sort(order[:holdout]).astype(np.int64)


def partition(indices: np.ndarray, world_size: int, rank: int, seed: int) -> np.ndarray:
    """Process ``rank``'s part of ``indices`` among ``world_size`` processes (torchrun), sorted.

    A seeded permutation of ``indices`` dealt round-robin: the parts are disjoint, cover
    ``indices``, mix the store's order (no part is a run of it) and differ in size by at
    most one sample. The same for every epoch (each process loads only its part); all of
    ``indices`` for one process.

    >>> parts = [partition(np.arange(5), 2, r, seed=0) for r in (0, 1)]
    >>> [len(p) for p in parts], sorted(np.concatenate(parts).tolist())
    ([3, 2], [0, 1, 2, 3, 4])
    """
    indices = np.asarray(indices, dtype=np.int64)
    if world_size == 1:
        return indices
    if not 0 <= rank < world_size:
        raise SatkitError(f"rank {rank}: not one of {world_size} processes")
    order = np.random.default_rng(seed).permutation(len(indices))
    return np.sort(indices[order[rank::world_size]])


def epoch_samples(n: int, world_size: int) -> int:
    """Samples each of ``world_size`` processes trains on per epoch when they share ``n``:
    ceil(n / world_size). A part one sample shorter repeats one of its own samples (drawn
    anew each epoch, as torch's DistributedSampler pads), so that every process takes the
    same number of steps, which DistributedDataParallel needs; nothing is dropped but a
    lone last sample, as in one process (``num_batches``).

    >>> epoch_samples(1442, 1), epoch_samples(1442, 2), epoch_samples(1443, 2)
    (1442, 721, 722)
    """
    return -(-n // world_size)


def _slabs(arr: Any) -> list[tuple[int, int]]:
    """Whole-chunk ranges grouped into slabs of about SLAB_BYTES."""
    row_bytes = int(np.prod(arr.shape[1:], dtype=np.int64)) * arr.dtype.itemsize if arr.ndim > 1 else arr.dtype.itemsize
    chunk = write_unit(arr)  # samples per file: a chunk, or a shard
    per_slab = max(1, SLAB_BYTES // max(1, row_bytes * chunk)) * chunk
    return [(a, min(arr.shape[0], a + per_slab)) for a in range(0, arr.shape[0], per_slab)]


def read_rows(arr: Any, indices: np.ndarray, bar: Any = None) -> np.ndarray:
    """Rows ``indices`` (sorted) of a zarr array, read in slabs of whole chunks.

    Slabs holding no wanted row are not read at all. ``bar`` (a tqdm) advances by the
    bytes of each slab read.
    """
    out = np.empty((len(indices),) + tuple(arr.shape[1:]), dtype=arr.dtype)
    row_bytes = out[:1].nbytes if len(out) else 0
    pos = 0
    for a, b in _slabs(arr):
        lo, hi = np.searchsorted(indices, [a, b])
        if hi > lo:
            if hi - lo == b - a:  # every row of the slab is wanted: read straight into out
                read_rows_into(arr, a, b, out[pos : pos + (hi - lo)])
            else:
                slab = np.asarray(arr[a:b])
                np.take(slab, indices[lo:hi] - a, axis=0, out=out[pos : pos + (hi - lo)])
            pos += hi - lo
        if bar is not None:
            bar.update((b - a) * row_bytes)
    return out


def sample_bytes(store: Store, split: str, maps: Sequence[str]) -> int:
    """Bytes one sample takes in memory: image, label and the given maps, as stored."""
    total = 0
    for field_name, m in [("images", None), ("labels", None)] + [("saliency", name) for name in maps]:
        arr = store.array(split, field_name, m)
        total += int(np.prod(arr.shape[1:], dtype=np.int64)) * arr.dtype.itemsize
    return total


def check_map_sizes(store: Store, split: str, maps: Sequence[str]) -> None:
    """Every map must have its images' height and width (the store validator also checks)."""
    ih, iw = store.array(split, "images").shape[1:3]
    for name in maps:
        mh, mw = store.array(split, "saliency", name).shape[1:3]
        if (mh, mw) != (ih, iw):
            raise SatkitError(
                f"{store.path}: map {name!r} of split {split} is {mh}x{mw}, its images are {ih}x{iw}; "
                "rebuild the map at the store's image size"
            )


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from satdata.clikit import progress_bar

    return progress_bar(total, desc, "B", enabled=enabled, unit_scale=True)


@dataclass
class HostSplit:
    """A split (or subset) read into host memory, as stored."""

    split: str
    indices: np.ndarray  # the store's sample indices, sorted
    images: np.ndarray  # uint8 (N, H, W, 3)
    labels: np.ndarray  # int64 (N,) or uint8 (N, K)
    maps: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return self.images.nbytes + self.labels.nbytes + sum(m.nbytes for m in self.maps.values())


def load_split(store: Store, split: str, maps: Sequence[str], indices: np.ndarray, *, progress: bool = True) -> HostSplit:
    """Read rows ``indices`` of a split's images, labels and maps into memory, with a progress bar."""
    check_map_sizes(store, split, maps)
    arrays = [("images", None), ("labels", None)] + [("saliency", m) for m in maps]
    zarrs = [store.array(split, f, m) for f, m in arrays]
    total = sum(int(np.prod(a.shape, dtype=np.int64)) * a.dtype.itemsize for a in zarrs)
    with _progress(total, f"load {split}", progress) as bar:
        # One thread per array: images are disk/memory bound, compressed maps are
        # decompressed by codecs that release the GIL, so the two overlap.
        lock = threading.Lock()

        class _Bar:
            def update(self, n: int) -> None:
                with lock:
                    bar.update(n)

        with ThreadPoolExecutor(max_workers=len(zarrs), thread_name_prefix="sattrain-load") as pool:
            data = list(pool.map(lambda a: read_rows(a, indices, _Bar()), zarrs))
    # What was read is the version the store had when it was opened, and every chunk read
    # that the digests say was written still has its file, or this stops with one line
    # naming the array (docs/store-format.md, "Readers and writers together").
    store.check_unchanged([store.array_key(split, f, m) for f, m in arrays],
                          chunks=[(a, chunks_of(a, indices)) for a in zarrs])
    return HostSplit(split, indices, data[0], data[1], {m: d for m, d in zip(maps, data[2:])})


def chunks_of(arr: Any, indices: np.ndarray) -> list[int]:
    """The chunks along N of ``arr`` that hold rows ``indices``."""
    return np.unique(np.asarray(indices, dtype=np.int64) // write_unit(arr)).tolist() if len(indices) else []


# --------------------------------------------------------------------------- placement


def plan_placement(nbytes: int, device: torch.device, memory_budget: int) -> str:
    """Where a split of ``nbytes`` lives: "device", "host" or "stream" (module docstring)."""
    if nbytes > memory_budget:
        return "stream"
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return "device" if nbytes <= DEVICE_SHARE * free else "host"
    return "device"


class RawBatch(NamedTuple):
    """One batch as stored, on the training device: uint8 images NHWC, labels, map or None."""

    images: torch.Tensor
    labels: torch.Tensor
    maps: torch.Tensor | None


class Batch(NamedTuple):
    """One batch ready for a model: x (B, 3, H, W) in [0, 1], y, S (B, C, H, W) or None.

    y is int64 class indices (single-label) or float multi-hot (multi-label).
    """

    x: torch.Tensor
    y: torch.Tensor
    S: torch.Tensor | None


def num_batches(n: int, batch_size: int) -> int:
    """Batches per epoch: a final batch of a single sample is dropped (batch norm needs two)."""
    return n // batch_size + (1 if n % batch_size >= 2 else 0)


# prepare_batch's augmentations: --augment's resolved values (sattrain.config.AUGMENTS
# less "auto", which the trainer resolves against the store first).
BATCH_AUGMENTS = ("crop+flip", "crop", "none")


def prepare_batch(
    raw: RawBatch,
    codec: MapCodec | None,
    *,
    multilabel: bool,
    augment: str | bool,
    generator: torch.Generator | None,
) -> Batch:
    """Augment (image and map together), convert to floats, and derive S on the device.

    ``augment``: "crop+flip" (random crop after zero padding and a random horizontal
    flip), "crop" (the crop only: for images a mirror changes, such as digits) or "none".
    ``True`` and ``False`` are accepted as "crop+flip" and "none" for older callers.
    """
    images, maps = raw.images, raw.maps
    mode = ("crop+flip" if augment else "none") if isinstance(augment, bool) else augment
    if mode not in BATCH_AUGMENTS:
        raise SatkitError(f"--augment: unknown augmentation {augment!r} (known: {', '.join(BATCH_AUGMENTS)})")
    if mode != "none":
        images, maps = crop_flip(images, maps, generator=generator, flip=mode == "crop+flip")
    x = images_to_float(images)
    y = raw.labels.to(torch.float32) if multilabel else raw.labels
    S = saliency_from_stored(maps, codec) if (maps is not None and codec is not None) else None
    return Batch(x, y, S)


class InMemorySplit:
    """A split held on the device (or on the host, copied per batch); shuffled batches."""

    def __init__(self, host: HostSplit, device: torch.device, placement: str, *,
                 epoch_samples: int | None = None) -> None:
        # n: samples per epoch; more than the part held (by one at most) when this process's
        # part of a distributed run is the shorter one (sattrain.data.epoch_samples)
        self.indices = host.indices  # the store's indices of the samples held (sorted)
        self.part = len(host.indices)
        self.n = self.part if epoch_samples is None else max(self.part, int(epoch_samples))
        self.device = device
        self.placement = placement
        where = device if placement == "device" else torch.device("cpu")
        self.storage = where
        self.images = torch.from_numpy(host.images).to(where)
        self.labels = torch.from_numpy(host.labels).to(where)
        self.maps = {k: torch.from_numpy(v).to(where) for k, v in host.maps.items()}

    def batches(self, batch_size: int, generator: torch.Generator | None, map_name: str | None) -> Iterator[RawBatch]:
        """Shuffled batches for one epoch; ``generator`` is a seeded CPU generator (None: the
        samples in order)."""
        perm = torch.randperm(self.part, generator=generator) if generator is not None else torch.arange(self.part)
        if self.n > self.part:  # a short part of a distributed run: repeat the start of this epoch's order
            perm = perm[torch.arange(self.n) % max(1, self.part)]
        perm = perm.to(self.storage)
        m = self.maps[map_name] if map_name is not None else None
        for start in range(0, self.n, batch_size):
            idx = perm[start : start + batch_size]
            if idx.shape[0] < 2:
                break
            # index_select, not t[idx]: torch's advanced-indexing kernel is several times
            # slower for uint8 rows on the CPU (bench/read.py).
            raw = RawBatch(self.images.index_select(0, idx), self.labels.index_select(0, idx),
                           m.index_select(0, idx) if m is not None else None)
            if self.storage != self.device:
                raw = RawBatch(*(t.to(self.device, non_blocking=True) if t is not None else None for t in raw))
            yield raw


def _read_selected(arr: Any, a: int, b: int, sel: np.ndarray, dst: np.ndarray) -> None:
    """Rows ``sel`` (sorted, in [a, b): one stored file of ``arr``) into ``dst``, in order.

    A whole file is read straight into ``dst``; a partly selected one in pieces of whole
    chunks of about STREAM_PIECE_BYTES, each read into a temporary and the selected rows
    taken from it, so the temporary is a piece, never the file (a shard of 224x224 images
    is 77 MB). Pieces holding no selected row are not read.
    """
    if len(sel) == b - a:
        read_rows_into(arr, a, b, dst)
        return
    inner = int(arr.chunks[0])  # a chunk, or a shard's inner chunk
    row_bytes = max(1, int(np.prod(arr.shape[1:], dtype=np.int64)) * arr.dtype.itemsize)
    rows = max(inner, STREAM_PIECE_BYTES // row_bytes // inner * inner)
    for p in range(a, b, rows):
        q = min(b, p + rows)
        lo, hi = (int(i) for i in np.searchsorted(sel, [p, q]))
        if hi == lo:
            continue
        if hi - lo == q - p:
            read_rows_into(arr, p, q, dst[lo:hi])
            continue
        tmp = np.empty((q - p,) + tuple(arr.shape[1:]), dtype=arr.dtype)
        read_rows_into(arr, p, q, tmp)
        np.take(tmp, sel[lo:hi] - p, axis=0, out=dst[lo:hi], mode="clip")  # in range; "raise" would buffer


class StreamingSplit:
    """A split too large for the memory budget: shuffled blocks of whole chunks, prefetched.

    Per epoch, the chunks are put in a random order and grouped into blocks of at most
    half the budget, and of at least one chunk (one block trains while the next is read);
    each block's samples are shuffled and cut into batches, a partial batch carrying over
    into the next block. Every selected sample is seen exactly once per epoch. Labels
    (small) stay in memory.

    The run keeps reading the version of the store it opened, or stops: the store's reader
    lock is held (so `satdata gc` leaves a replaced map's old arrays in place), and after
    each block is read, before it is handed to training, ``Store.check_unchanged`` checks that the
    arrays read still have the digests recorded at open (a rebuilt or replaced store
    stops the run with one line naming the array) and that the chunks read still exist.

    Several processes (torchrun; ``world_size`` > 1, this one ``rank``): every process
    draws the same chunk order for the epoch (seeded by ``seed`` and the epoch given to
    ``set_epoch``), the selected samples in that order are cut into ``world_size`` runs of
    sizes differing by at most one, and each process reads only the chunks of its run (a
    chunk at a run's edge is read by the two processes that share it, each taking its own
    rows), grouped into its own blocks and shuffled with the ``generator`` it is given
    (``plan``). The run one sample short repeats one of its samples (``epoch_samples``),
    so every process has the same samples per epoch, ``n``, and takes the same steps.
    """

    def __init__(self, store: Store, split: str, maps: Sequence[str], indices: np.ndarray,
                 device: torch.device, memory_budget: int, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0) -> None:
        check_map_sizes(store, split, maps)
        if not 0 <= rank < world_size:
            raise SatkitError(f"rank {rank}: not one of {world_size} processes")
        self.rank, self.world_size, self.seed, self.epoch = rank, world_size, seed, 0
        self.store = store
        self.split = split
        self.device = device
        self.placement = "stream"
        self.indices = indices
        self.n = epoch_samples(len(indices), world_size)  # this process's samples per epoch
        store.hold_reader_lock()
        self.images_arr = store.array(split, "images")
        self.map_arrs = {m: store.array(split, "saliency", m) for m in maps}
        labels_arr = store.array(split, "labels")
        self.labels = torch.from_numpy(read_rows(labels_arr, indices))
        # the arrays a block reads, pinned to the version opened (docs/store-format.md)
        self.pins = {"images": store.array_key(split, "images"), "labels": store.array_key(split, "labels"),
                     **{m: store.array_key(split, "saliency", m) for m in maps}}
        store.check_unchanged([self.pins["images"], self.pins["labels"]],
                              chunks=[(labels_arr, chunks_of(labels_arr, indices))])
        self.chunks = []  # (start, stop, selected store indices, their positions in `indices`)
        for a, b in iter_chunks(self.images_arr):
            lo, hi = np.searchsorted(indices, [a, b])
            if hi > lo:
                self.chunks.append((a, b, indices[lo:hi], np.arange(lo, hi)))
        # the whole chunks; a distributed run appends the pieces of chunks it reads in part
        # (``_piece``), so that a block stays a list of entries of self.chunks
        self.whole_chunks = len(self.chunks)
        self._pieces: dict[tuple[int, int, int], int] = {}
        # one map is read per epoch (an ensemble picks one): budget for the largest
        per_sample = max([sample_bytes(store, split, [m]) for m in maps] or [sample_bytes(store, split, [])])
        self.block_samples = max(1, (memory_budget // 2) // max(1, per_sample))

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose plan ``plan`` draws (several processes: their shared chunk order)."""
        self.epoch = int(epoch)

    def _piece(self, c: int, lo: int, hi: int) -> int:
        """The entry of self.chunks for rows [lo, hi) of entry ``c``'s selected rows (added once)."""
        key = (c, lo, hi)
        if key not in self._pieces:
            a, b, sel, p = self.chunks[c]
            self.chunks.append((a, b, sel[lo:hi], p[lo:hi]))
            self._pieces[key] = len(self.chunks) - 1
        return self._pieces[key]

    def _my_entries(self, generator: torch.Generator) -> list[int]:
        """This process's entries of self.chunks this epoch, in a random order (class docstring)."""
        if self.world_size == 1:
            return torch.randperm(self.whole_chunks, generator=generator).tolist()
        shared = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, "stream-partition"))
        order = torch.randperm(self.whole_chunks, generator=shared).tolist()
        total = len(self.indices)
        lo, hi = self.rank * total // self.world_size, (self.rank + 1) * total // self.world_size
        mine: list[int] = []
        pos = 0
        for c in order:
            k = len(self.chunks[c][2])
            s, e = max(lo, pos), min(hi, pos + k)
            if s < e:
                mine.append(c if (s, e) == (pos, pos + k) else self._piece(c, s - pos, e - pos))
            pos += k
        if mine and self.n > hi - lo:  # one sample short of the others: repeat the first
            mine.append(self._piece(mine[0], 0, self.n - (hi - lo)))
        # this process's own order of its entries (the shared one only decided who reads what)
        return [mine[i] for i in torch.randperm(len(mine), generator=generator).tolist()]

    def plan(self, generator: torch.Generator) -> list[list[int]]:
        """Entries of self.chunks per block, in this epoch's random order (drawn from ``generator``).

        One process: every chunk, once. Several: this process's share (class docstring).
        """
        order = self._my_entries(generator)
        blocks: list[list[int]] = []
        cur: list[int] = []
        size = 0
        for c in order:
            k = len(self.chunks[c][2])
            if cur and size + k > self.block_samples:
                blocks.append(cur)
                cur, size = [], 0
            cur.append(c)
            size += k
        if cur:
            blocks.append(cur)
        return blocks

    def _missing_chunk(self, arr: Any, i: int) -> None:
        """A chunk without a file that the digests say was written: the store lost it or changed."""
        want = self.store._chunk_digests(arr) or []
        if i < len(want) and want[i] != "absent":
            a, b = chunk_rows(arr, i)
            raise StoreChangedError(f"{self.store.path}: array {arr.path} chunk {i} (samples [{a}, {b})) is missing "
                                    "on the server; stopping rather than reading fill values (`satdata verify` "
                                    "lists every damaged chunk)")

    @staticmethod
    def _block_buffer(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """An empty array for one field of a block, in its own anonymous memory map.

        Unmapped, so returned to the OS, the moment the block's last reference goes; a
        malloc'd array of a few MiB to 32 MiB (glibc's largest dynamic mmap threshold) may
        instead stay in the reader thread's heap, resident, while blocks of another size are
        read (at 224x224 and --memory-budget 64M, a streamed epoch peaked a budget's worth
        higher with np.empty blocks). Pages become resident as they are written.
        """
        count = int(np.prod(shape, dtype=np.int64))
        nbytes = count * np.dtype(dtype).itemsize
        if nbytes == 0 or not hasattr(mmap, "MAP_PRIVATE"):  # no mmap flags (Windows): the heap
            return np.empty(shape, dtype=dtype)
        return np.frombuffer(mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE), dtype=dtype, count=count).reshape(shape)

    def _block_arrays(self, map_name: str | None) -> list[Any]:
        """The arrays a block reads: the images, and the map when one is used."""
        return [self.images_arr] + ([self.map_arrs[map_name]] if map_name is not None else [])

    def block_nbytes(self, block: list[int], map_name: str | None) -> int:
        """Bytes ``block`` takes in memory once read: its images and map, as stored, held once.

        At most STREAM_BLOCKS_ALIVE blocks are in memory at a time (``batches``), so a
        streamed epoch holds at most that many times the largest block's bytes of data.
        """
        n = sum(len(self.chunks[c][2]) for c in block)
        return n * sum(int(np.prod(x.shape[1:], dtype=np.int64)) * x.dtype.itemsize for x in self._block_arrays(map_name))

    def _read_block(self, block: list[int], map_name: str | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The block's images, the positions of its samples in ``indices``, and its map.

        Each array is allocated once, at the block's size (``_block_buffer``), and every
        chunk is read straight into its place: no list of chunks to concatenate, so the block
        exists once in memory (plus, while it is read, what ``_read_selected`` and the
        store's readers decode through: a piece or a chunk at a time).
        """
        arrs = self._block_arrays(map_name)
        n = sum(len(self.chunks[c][2]) for c in block)
        outs = [self._block_buffer((n,) + tuple(x.shape[1:]), x.dtype) for x in arrs]
        step = write_unit(self.images_arr)  # samples per file: a chunk, or a shard
        start = 0
        if not is_local(self.images_arr) and all(write_unit(x) == step for x in arrs):
            # over a network: every chunk of the block (images and map) requested at once, a
            # bounded number in flight, each copied into place as it arrives (satdata/chunkio.py)
            jobs = []
            for c in block:
                a, b, sel, _ = self.chunks[c]
                jobs += [(x, a // step, sel - a, o[start : start + len(sel)]) for x, o in zip(arrs, outs)]
                start += len(sel)
            take_rows(jobs, missing=self._missing_chunk)
        else:  # a local disk: one chunk after another is as fast
            for c in block:
                a, b, sel, _ = self.chunks[c]
                for x, o in zip(arrs, outs):
                    _read_selected(x, a, b, sel, o[start : start + len(sel)])
                start += len(sel)
        positions = torch.from_numpy(np.concatenate([self.chunks[c][3] for c in block]))
        return torch.from_numpy(outs[0]), positions, (torch.from_numpy(outs[1]) if len(outs) > 1 else None)

    def check_block(self, block: list[int], map_name: str | None) -> None:
        """After reading ``block`` and before training on it: the version opened, or StoreChangedError."""
        def ids(arr: Any) -> list[int]:  # the chunks of arr that the block's sample ranges cover
            step = write_unit(arr)
            return sorted({i for c in block for i in range(self.chunks[c][0] // step, (self.chunks[c][1] - 1) // step + 1)})

        paths = [self.pins["images"], self.pins["labels"]]
        chunks: list[tuple[Any, Sequence[int]]] = [(self.images_arr, ids(self.images_arr))]
        if map_name is not None:
            paths.append(self.pins[map_name])
            chunks.append((self.map_arrs[map_name], ids(self.map_arrs[map_name])))
        self.store.check_unchanged(paths, chunks=chunks)

    def batches(self, batch_size: int, generator: torch.Generator, map_name: str | None) -> Iterator[RawBatch]:
        """Shuffled batches for one epoch; the random draws all happen before reading starts.

        The samples come in the order of the blocks, each block's in the order of its
        permutation, cut into batches of ``batch_size`` (a batch may span two blocks).
        Memory: at most STREAM_BLOCKS_ALIVE blocks exist at a time, the reader takes a
        slot before it allocates a block and training gives it back once it holds no
        reference to the block; a batch is gathered from its block (index_select), never
        a permuted copy of the block; the few samples left at a block's end are copied out
        (less than a batch) before the block is released. On CUDA the reader moves each
        block to the device once read and checked, so the host holds only the one being read.
        """
        blocks = self.plan(generator)
        perms = [torch.randperm(sum(len(self.chunks[c][2]) for c in blk), generator=generator) for blk in blocks]
        device = self.device
        if device.type == "cuda" and device.index is None:  # the reader thread's current device may differ
            device = torch.device("cuda", torch.cuda.current_device())
        q: queue.Queue = queue.Queue()  # at most STREAM_BLOCKS_ALIVE blocks, by the slots
        slots = threading.Semaphore(STREAM_BLOCKS_ALIVE)
        stop = threading.Event()

        def reader() -> None:
            try:
                for blk in blocks:
                    while not slots.acquire(timeout=0.1):
                        if stop.is_set():
                            return
                    if stop.is_set():
                        return
                    item: Any = self._read_block(blk, map_name)
                    self.check_block(blk, map_name)  # before the block is handed over
                    if device.type == "cuda":  # on the device from here: the host copy goes now
                        images, positions, maps = item
                        item = (images.to(device), positions, maps.to(device) if maps is not None else None)
                        del images, maps
                    q.put(item)
                    del item  # the queue and then training hold it, not this frame
            except BaseException as e:  # handed to the consumer, which re-raises it
                q.put(e)

        thread = threading.Thread(target=reader, name=f"sattrain-prefetch-{self.split}", daemon=True)
        thread.start()
        carry: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None  # < batch_size samples, copied

        def take(t: torch.Tensor | None, idx: torch.Tensor) -> torch.Tensor | None:
            # index_select, not t[idx]: torch's advanced-indexing kernel is several times
            # slower for uint8 rows on the CPU (bench/read.py)
            return t.index_select(0, idx) if t is not None else None

        def join(c: torch.Tensor | None, t: torch.Tensor | None) -> torch.Tensor | None:
            return torch.cat([c, t]) if c is not None and t is not None else None

        try:
            for perm in perms:
                item = q.get()
                if isinstance(item, StoreChangedError):  # already one line naming the store and the change
                    raise StoreChangedError(str(item)) from None
                if isinstance(item, BaseException):
                    raise SatkitError(f"{self.store.path}: reading split {self.split} failed ({type(item).__name__}: {item})")
                images, positions, maps = item
                del item
                images = images.to(device, non_blocking=True)
                maps = maps.to(device, non_blocking=True) if maps is not None else None
                dperm = perm.to(device)
                labels = self.labels.index_select(0, positions.index_select(0, perm)).to(device, non_blocking=True)
                n, s = int(perm.shape[0]), 0
                if carry is not None:  # complete the batch the previous block began
                    k = min(batch_size - int(carry[0].shape[0]), n)
                    idx = dperm[:k]
                    carry = (torch.cat([carry[0], images.index_select(0, idx)]), torch.cat([carry[1], labels[:k]]),
                             join(carry[2], take(maps, idx)))
                    s = k
                    if carry[0].shape[0] == batch_size:
                        yield RawBatch(*carry)
                        carry = None
                while s + batch_size <= n:
                    idx = dperm[s : s + batch_size]
                    yield RawBatch(images.index_select(0, idx), labels[s : s + batch_size], take(maps, idx))
                    s += batch_size
                if s < n:  # copied out: the block itself is released below
                    idx = dperm[s:]
                    carry = (images.index_select(0, idx), labels[s:].clone(), take(maps, idx))
                del images, maps, positions, labels, dperm
                slots.release()  # this block is gone: the reader may allocate the one after the next
            if carry is not None and carry[0].shape[0] >= 2:
                yield RawBatch(*carry)
        finally:
            stop.set()
            thread.join(timeout=10)


class EvalSplit:
    """A fixed held-out subset on the device, iterated in order (no augmentation)."""

    def __init__(self, host: HostSplit, device: torch.device) -> None:
        self.split = host.split
        self.indices = host.indices
        self.n = len(host.indices)
        self.images = torch.from_numpy(host.images).to(device)
        self.labels = torch.from_numpy(host.labels).to(device)

    def batches(self, batch_size: int, multilabel: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for s in range(0, self.n, batch_size):
            y = self.labels[s : s + batch_size]
            yield images_to_float(self.images[s : s + batch_size]), (y.to(torch.float32) if multilabel else y)


def open_train_split(
    store: Store,
    split: str,
    maps: Sequence[str],
    indices: np.ndarray,
    device: torch.device,
    memory_budget: int,
    *,
    progress: bool = True,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
) -> InMemorySplit | StreamingSplit:
    """The training split, in memory (device or host) or streamed, per ``plan_placement``.

    Several processes (torchrun; this one ``rank`` of ``world_size``): whether to stream is
    decided on the whole of ``indices`` against ``memory_budget``, so every process decides
    alike. In memory, this process loads only its ``partition`` (seeded by ``seed``) and
    pads its epochs to ``epoch_samples``; streamed, it reads only its share of each epoch's
    chunks (StreamingSplit), in blocks sized for ``memory_budget / world_size`` (the
    processes of one machine stream side by side; conservative on several machines).
    """
    nbytes = len(indices) * sample_bytes(store, split, maps)
    placement = plan_placement(nbytes, device, memory_budget)
    if placement == "stream":
        return StreamingSplit(store, split, maps, indices, device, memory_budget // world_size, rank=rank,
                              world_size=world_size, seed=seed)
    if world_size == 1:
        return InMemorySplit(load_split(store, split, maps, indices, progress=progress), device, placement)
    part = partition(indices, world_size, rank, seed)
    placement = plan_placement(len(part) * sample_bytes(store, split, maps), device, memory_budget)
    return InMemorySplit(load_split(store, split, maps, part, progress=progress), device, placement,
                         epoch_samples=epoch_samples(len(indices), world_size))
