"""``satdata saliency --dask``: a teacher's maps computed on Dask workers.

Each task computes the maps of one range of a split, a whole number of batches of
``--batch-size`` starting at a multiple of it, with the teacher loaded once per worker
process and the noise of each batch seeded by its position (satdata.saliency.generate.map_batches):
the maps equal a one-process run's. Tasks read the images from the store (which every
worker must see at the same path, like the teacher file) and send their maps back; this
process writes them in order through ``satdata.addmap.add_map``, whose write-aside-then-
commit keeps the store as it was on any failure. Maps are at most a third of the images'
bytes and the teacher's forward and backward passes dominate, so one writer keeps up.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from satdata.dask_build import wait_stopped, client_for, worker_threads
from satdata.errors import SatkitError

# A task holds at least this many samples (whole batches), fewer only to give every worker
# about four tasks.
TASK_MIN_SAMPLES = 1024

_TEACHERS: dict[tuple[Any, ...], Any] = {}


def _task(store_path: str, split: str, start: int, stop: int, spec: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, int]:
    """Maps of samples [start, stop) of ``split``: (stored maps, targets, teacher correct)."""
    import torch

    from satdata.saliency.generate import batch_images, map_batches
    from satdata.saliency.methods import AlgorithmOptions, find_cam_layer, get_algorithm
    from satdata.saliency.teacher import load_teacher
    from satdata.store import open_store
    from sattrain.device import resolve_device

    device = resolve_device(spec["device"])
    if device.type == "cpu":
        torch.set_num_threads(1)  # parallelism comes from the workers
    key = (spec["teacher"], spec["arch"], spec["weights"], str(device))
    if key not in _TEACHERS:
        _TEACHERS.clear()
        _TEACHERS[key] = load_teacher(spec["teacher"], arch=spec["arch"], weights=spec["weights"], device=device)
    model = _TEACHERS[key].model
    st = open_store(store_path)
    images = np.asarray(st.array(split, "images")[start:stop])
    labels = np.asarray(st.array(split, "labels")[start:stop])
    method = get_algorithm(spec["method"])
    cam_layer = find_cam_layer(model, batch_images(images[:1], device), spec["cam_layer"]) if spec["cam_layer"] else None
    options = AlgorithmOptions(layer=spec["layer"], seed=spec["seed"])
    maps, targets, right = [], [], 0
    for m, t, r in map_batches(model, method, images, labels, split=split, start=start, batch_size=spec["batch_size"],
                               device=device, cam_layer=cam_layer, options=options, target_rule=spec["target"]):
        maps.append(m)
        targets.append(t)
        right += r
    return np.concatenate(maps), np.concatenate(targets), right


@contextmanager
def maps_on_dask(cfg: Any, store: Any, splits: Sequence[str], cam_layer: Any, bar: Any,
                 accuracy: dict[str, float]) -> Iterator[Callable[[str], Iterator[tuple[np.ndarray, np.ndarray]]]]:
    """Submit every split's tasks at once (the workers never wait between splits) and give
    add_map a ``produce(split)`` that yields their maps in order."""
    from pathlib import Path

    path = str(Path(cfg.store).resolve())
    spec = {"teacher": str(Path(cfg.teacher).resolve()) if cfg.teacher else None, "arch": cfg.arch,
            "weights": str(Path(cfg.weights).resolve()) if cfg.weights else None, "device": cfg.device,
            "method": cfg.method, "layer": cfg.layer, "cam_layer": cam_layer.name if cam_layer else None,
            "seed": cfg.seed, "target": cfg.target, "batch_size": cfg.batch_size}
    with client_for(cfg.dask) as client:
        b = cfg.batch_size
        total = sum(store.info.splits[s] for s in splits)
        per = max(1, min(-(-TASK_MIN_SAMPLES // b), total // (4 * worker_threads(client) * b)))
        step = b * per
        futures: dict[str, list[tuple[int, int, Any]]] = {}
        for split in splits:
            n = store.info.splits[split]
            futures[split] = [(a, min(n, a + step),
                               client.submit(_task, path, split, a, min(n, a + step), spec, pure=False))
                              for a in range(0, n, step)]

        consumed: set[str] = set()

        def produce(split: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
            bar.set_description(f"{cfg.method} {split} (dask)")
            right = 0
            for a, z, fut in futures[split]:
                try:
                    maps, targets, r = fut.result()
                except SatkitError as e:
                    raise SatkitError(str(e)) from None
                except Exception as e:
                    raise SatkitError(f"--dask: the task computing {split} samples [{a}, {z}) failed "
                                      f"({type(e).__name__}: {e})") from None
                consumed.add(fut.key)
                fut.release()  # its result leaves the worker's memory
                right += r
                yield maps, targets
                bar.update(z - a)
            if store.info.label_kind == "single" and store.info.splits[split]:
                accuracy[split] = round(right / store.info.splits[split], 6)

        try:
            yield produce
        finally:
            pending = [f for fs in futures.values() for _, _, f in fs if f.key not in consumed and not f.done()]
            if pending:
                client.cancel(pending)
                wait_stopped(client, [f.key for f in pending])


__all__ = ["TASK_MIN_SAMPLES", "maps_on_dask"]
