"""Export a store to one HDF5 file in satkit's h5 layout (see satdata.sources.h5).

``satdata build --source h5`` reads the file back; at the same image size the round trip
store -> h5 -> store keeps every array bit for bit (images, labels, ids, boxes, and maps
of every encoding and channel count).

The file is written beside its destination as ``.NAME.partial-PID`` and renamed onto it
only when complete, so an interrupted export never leaves a half-written file under the
requested name.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from satdata.errors import SatkitError
from satdata.atomic import (check_file_out, commit_path, identity, make_parents, output_lock, partial_path,
                             probe_writable, remove_empty, resolve_out)
from satdata.store import Store, iter_chunks, read_rows_into

H5_VERSION = 1  # the layout version satdata.sources.h5 documents
# Maps and labels compress many times; gzip is in every HDF5 build, so any reader opens them.
GZIP_LEVEL = 4


def export_h5(store: Store, out: str | Path, *, splits: Sequence[str] | None = None,
              maps: Sequence[str] | None = None, overwrite: bool = False, progress: bool = True) -> Path:
    """Write ``store`` (all splits and maps, or the ones named) to the h5 file ``out``."""
    from satdata.remote import refuse_remote_output

    refuse_remote_output(out, "--to", what="an HDF5 file")
    out = resolve_out(Path(out), overwrite=overwrite)  # --overwrite through a link: its target
    try:
        inside = out.resolve().is_relative_to(Path(store.path).resolve())
    except OSError:
        inside = False
    if inside:  # it would replace or add to a file of the store it reads (its zarr.json, a chunk)
        raise SatkitError(f"--out: {out} is inside the store {store.path}; write the file elsewhere")
    info = store.info
    check_file_out(out, overwrite)
    order = store.select_splits(splits)
    names = sorted(info.maps)
    if maps is not None:
        for m in maps:
            if m not in info.maps:
                raise SatkitError(f"--maps: {store.path} has no map {m!r} (maps: {', '.join(names) or 'none'})")
        names = [m for m in names if m in maps]
    made = make_parents(out.parent, "--to")
    try:
        probe_writable(out.parent, "--to")
        with output_lock(out):
            before = identity(out)  # the commit refuses if this changes meanwhile
            check_file_out(out, overwrite)
            _write(store, out, order, names, before, progress)
    finally:
        remove_empty(made)
    return out


def _write(store: Store, out: Path, order: Sequence[str], names: Sequence[str], before: Any,
           progress: bool) -> None:
    import h5py
    from satdata.clikit import progress_bar

    from satdata import __version__

    info = store.info
    tmp = partial_path(out)
    jobs = [(s, f) for s in order for f in ["images", "labels", "ids"] + (["boxes"] if store.has_boxes(s) else [])]
    jobs += [(s, f"saliency/{m}") for s in order for m in names]
    created = False
    try:
        # "w-": created exclusively (O_EXCL), so a planted file or link under the
        # temporary name is never written through or truncated
        try:
            f = h5py.File(tmp, "w-")
        except OSError as e:  # FileExistsError included
            why = "it is in the way; remove it" if os.path.lexists(tmp) else e
            raise SatkitError(f"{tmp}: cannot create it ({why})") from None
        created = True
        with f, progress_bar(len(jobs), "export", "array", enabled=progress) as bar:
            f.attrs["satkit_h5_version"] = H5_VERSION
            f.attrs["dataset"] = info.dataset
            f.attrs["classes"] = json.dumps(info.classes, ensure_ascii=False)
            f.attrs["label_kind"] = info.label_kind
            f.attrs["hflip"] = bool(info.hflip)
            f.attrs["store_provenance"] = json.dumps(info.provenance, ensure_ascii=False, default=str)
            f.attrs["exported_by"] = f"satkit {__version__}"
            f.attrs["exported"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            for split, field_name in jobs:
                g = f.require_group(split)
                if field_name == "ids":
                    ids = [str(x) for x in store.load(split, "ids").tolist()]
                    g.create_dataset("ids", data=np.array(ids, dtype=object),
                                     dtype=h5py.string_dtype("utf-8"))
                elif field_name.startswith("saliency/"):
                    name = field_name.split("/", 1)[1]
                    m = info.maps[name]
                    d = _copy(g, field_name, store.array(split, "saliency", name), compress=True)
                    d.attrs["encoding"] = m.encoding
                    d.attrs["kind"] = m.kind
                    d.attrs["channels"] = int(m.channels)
                    d.attrs["provenance"] = json.dumps(m.provenance, ensure_ascii=False, default=str)
                else:
                    _copy(g, field_name, store.array(split, field_name), compress=field_name != "images")
                bar.update(1)
        commit_path(tmp, out, before, remove_old=lambda p: p.unlink(missing_ok=True))
    except BaseException:
        if created:
            tmp.unlink(missing_ok=True)
        raise


def _copy(g: Any, name: str, arr: Any, compress: bool) -> Any:
    """Copy a zarr array into a new h5 dataset chunk by chunk (chunked along N like the store)."""
    shape = tuple(arr.shape)
    kwargs: dict[str, Any] = {}
    if shape[0] > 0:
        kwargs["chunks"] = (min(shape[0], int(arr.chunks[0])),) + shape[1:]
        if compress:
            kwargs.update(compression="gzip", compression_opts=GZIP_LEVEL, shuffle=True)
    d = g.create_dataset(name, shape=shape, dtype=arr.dtype, **kwargs)
    for a, b in iter_chunks(arr):
        block = np.empty((b - a,) + shape[1:], dtype=arr.dtype)
        read_rows_into(arr, a, b, block)  # a damaged file: a StoreError naming it
        d[a:b] = block
    return d


__all__ = ["export_h5"]
