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
  the next block (into pinned memory on CUDA) while the current one trains; samples are
  shuffled within each block. Per-sample store reads never happen in the loop: random
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

import queue
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from satdata import chunkio
from satdata.errors import SatkitError
from satdata.store import Store, StoreChangedError, iter_chunks, read_rows_into

CROP_PADDING = 4
# Reads go in slabs of whole chunks of about this many bytes: large enough that zarr reads
# the chunks of a slab concurrently, small enough for a progress bar that moves.
SLAB_BYTES = 64 * 1024**2
# Share of the free CUDA memory a split may take; the rest is for the model and activations.
DEVICE_SHARE = 0.5


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
    """S = scale * q + offset as float32, (B, H, W[, C]) stored layout -> (B, C, H, W)."""
    if q.dim() == 3:
        q = q.unsqueeze(-1)
    return q.permute(0, 3, 1, 2).to(torch.float32).mul_(codec.scale).add_(codec.offset)


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


def _slabs(arr: Any) -> list[tuple[int, int]]:
    """Whole-chunk ranges grouped into slabs of about SLAB_BYTES."""
    row_bytes = int(np.prod(arr.shape[1:], dtype=np.int64)) * arr.dtype.itemsize if arr.ndim > 1 else arr.dtype.itemsize
    chunk = int(arr.chunks[0])
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
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                disable=not enabled, leave=False, dynamic_ncols=True)


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
    return np.unique(np.asarray(indices, dtype=np.int64) // int(arr.chunks[0])).tolist() if len(indices) else []


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

    def __init__(self, host: HostSplit, device: torch.device, placement: str) -> None:
        self.n = len(host.indices)
        self.device = device
        self.placement = placement
        where = device if placement == "device" else torch.device("cpu")
        self.storage = where
        self.images = torch.from_numpy(host.images).to(where)
        self.labels = torch.from_numpy(host.labels).to(where)
        self.maps = {k: torch.from_numpy(v).to(where) for k, v in host.maps.items()}

    def batches(self, batch_size: int, generator: torch.Generator, map_name: str | None) -> Iterator[RawBatch]:
        """Shuffled batches for one epoch; ``generator`` is a seeded CPU generator."""
        perm = torch.randperm(self.n, generator=generator).to(self.storage)
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
    """

    def __init__(self, store: Store, split: str, maps: Sequence[str], indices: np.ndarray,
                 device: torch.device, memory_budget: int) -> None:
        check_map_sizes(store, split, maps)
        self.store = store
        self.split = split
        self.device = device
        self.placement = "stream"
        self.indices = indices
        self.n = len(indices)
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
        # one map is read per epoch (an ensemble picks one): budget for the largest
        per_sample = max([sample_bytes(store, split, [m]) for m in maps] or [sample_bytes(store, split, [])])
        self.block_samples = max(1, (memory_budget // 2) // max(1, per_sample))

    def plan(self, generator: torch.Generator) -> list[list[int]]:
        """Chunk ids per block, in this epoch's random order (drawn from ``generator``)."""
        order = torch.randperm(len(self.chunks), generator=generator).tolist()
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
            a, b = chunkio.chunk_rows(arr, i)
            raise StoreChangedError(f"{self.store.path}: array {arr.path} chunk {i} (samples [{a}, {b})) is missing "
                                    "on the server; stopping rather than reading fill values (`satdata verify` "
                                    "lists every damaged chunk)")

    def _read_block(self, block: list[int], map_name: str | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        imgs, qs, pos = [], [], []
        arrs = [self.images_arr] + ([self.map_arrs[map_name]] if map_name is not None else [])
        step = int(self.images_arr.chunks[0])
        if not chunkio.is_local(self.images_arr) and all(int(x.chunks[0]) == step for x in arrs):
            # over a network: every chunk of the block (images and map) requested at once, a
            # bounded number in flight, each copied into place as it arrives (satdata/chunkio.py)
            n = sum(len(self.chunks[c][2]) for c in block)
            outs = [np.empty((n,) + tuple(x.shape[1:]), dtype=x.dtype) for x in arrs]
            jobs, start = [], 0
            for c in block:
                a, b, sel, p = self.chunks[c]
                jobs += [(x, a // step, sel - a, o[start : start + len(sel)]) for x, o in zip(arrs, outs)]
                pos.append(p)
                start += len(sel)
            chunkio.take_rows(jobs, missing=self._missing_chunk)
            imgs, qs = outs[:1], outs[1:]
        else:  # a local disk: one chunk after another is as fast
            for c in block:
                a, b, sel, p = self.chunks[c]
                imgs.append(np.asarray(self.images_arr[a:b])[sel - a])
                if map_name is not None:
                    qs.append(np.asarray(self.map_arrs[map_name][a:b])[sel - a])
                pos.append(p)
        images = torch.from_numpy(imgs[0] if len(imgs) == 1 else np.concatenate(imgs))
        maps = torch.from_numpy(qs[0] if len(qs) == 1 else np.concatenate(qs)) if qs else None
        positions = torch.from_numpy(np.concatenate(pos))
        if self.device.type == "cuda":
            images = images.pin_memory()
            maps = maps.pin_memory() if maps is not None else None
        return images, positions, maps

    def check_block(self, block: list[int], map_name: str | None) -> None:
        """After reading ``block`` and before training on it: the version opened, or StoreChangedError."""
        def ids(arr: Any) -> list[int]:  # the chunks of arr that the block's sample ranges cover
            step = int(arr.chunks[0])
            return sorted({i for c in block for i in range(self.chunks[c][0] // step, (self.chunks[c][1] - 1) // step + 1)})

        paths = [self.pins["images"], self.pins["labels"]]
        chunks: list[tuple[Any, Sequence[int]]] = [(self.images_arr, ids(self.images_arr))]
        if map_name is not None:
            paths.append(self.pins[map_name])
            chunks.append((self.map_arrs[map_name], ids(self.map_arrs[map_name])))
        self.store.check_unchanged(paths, chunks=chunks)

    def batches(self, batch_size: int, generator: torch.Generator, map_name: str | None) -> Iterator[RawBatch]:
        """Shuffled batches for one epoch; the random draws all happen before reading starts."""
        blocks = self.plan(generator)
        perms = [torch.randperm(sum(len(self.chunks[c][2]) for c in blk), generator=generator) for blk in blocks]
        q: queue.Queue = queue.Queue(maxsize=1)
        stop = threading.Event()

        def reader() -> None:
            try:
                for blk in blocks:
                    item: Any = self._read_block(blk, map_name)
                    self.check_block(blk, map_name)  # before the block is handed over
                    while not stop.is_set():
                        try:
                            q.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
            except BaseException as e:  # handed to the consumer, which re-raises it
                q.put(e)

        thread = threading.Thread(target=reader, name=f"sattrain-prefetch-{self.split}", daemon=True)
        thread.start()
        carry: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None
        try:
            for perm in perms:
                item = q.get()
                if isinstance(item, StoreChangedError):  # already one line naming the store and the change
                    raise StoreChangedError(str(item)) from None
                if isinstance(item, BaseException):
                    raise SatkitError(f"{self.store.path}: reading split {self.split} failed ({type(item).__name__}: {item})")
                images, positions, maps = item
                dperm = perm.to(self.device)
                images = images.to(self.device, non_blocking=True).index_select(0, dperm)
                labels = self.labels.index_select(0, positions.index_select(0, perm)).to(self.device, non_blocking=True)
                maps = maps.to(self.device, non_blocking=True).index_select(0, dperm) if maps is not None else None
                if carry is not None:
                    images = torch.cat([carry[0], images])
                    labels = torch.cat([carry[1], labels])
                    maps = torch.cat([carry[2], maps]) if maps is not None and carry[2] is not None else maps
                full = (images.shape[0] // batch_size) * batch_size
                for s in range(0, full, batch_size):
                    yield RawBatch(images[s : s + batch_size], labels[s : s + batch_size],
                                   maps[s : s + batch_size] if maps is not None else None)
                carry = (images[full:], labels[full:], maps[full:] if maps is not None else None)
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
) -> InMemorySplit | StreamingSplit:
    """The training split, in memory (device or host) or streamed, per ``plan_placement``."""
    nbytes = len(indices) * sample_bytes(store, split, maps)
    placement = plan_placement(nbytes, device, memory_budget)
    if placement == "stream":
        return StreamingSplit(store, split, maps, indices, device, memory_budget)
    return InMemorySplit(load_split(store, split, maps, indices, progress=progress), device, placement)
