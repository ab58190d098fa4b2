"""How well one saliency map of a store agrees with another (usually an annotation).

``compare_maps(store, "gradcampp", "ink")`` scores map A against map B's *object*, per
image, then averages per class and over all images of each split:

* B's object: pixels where B, mapped to [0, 1], is >= 0.5 (a binary mask's 1s, a box
  map's boxes; a unit map above one half; a signed map's S >= 0). A multi-channel map is
  first averaged over its channels.
* A in [0, 1]: unit maps as stored (q / 255), signed and binary maps as (S + 1) / 2,
  multi-channel maps averaged over channels.
* pointing game: 1 if A's maximum lies inside B's object, else 0. When several pixels
  tie for the maximum, the share of them inside the object (the expected hit of a random
  tie-break: a constant map scores the object's area share, i.e. chance).
* IoU: of {A >= threshold} with B's object.
* energy share: A's positive energy inside the object over A's positive energy in
  total, where the energy is the positive part of S summed over channels (for a unit map
  S itself; for a binary map its mask). Images where A has no positive energy are left
  out of this average (their count is reported).

Images whose B object is empty are left out of every score and counted as no_object.
A multi-label image counts for every class it is labelled with.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from satdata.errors import SatkitError
from satdata.store import MapInfo, Store, decode_map

BLOCK = 4096  # samples scored at a time (bounds float memory)


def to_unit(q: np.ndarray, m: MapInfo) -> np.ndarray:
    """A map's stored values as floats in [0, 1] (N, H, W), channels averaged."""
    s = decode_map(q, m)
    if m.encoding != "unit":
        s = (s + 1.0) / 2.0
    if s.ndim == 4:
        s = s.mean(axis=3)
    return s


def positive_energy(q: np.ndarray, m: MapInfo) -> np.ndarray:
    """sum over channels of max(S, 0): (N, H, W)."""
    s = np.maximum(decode_map(q, m), 0.0)
    return s.sum(axis=3) if s.ndim == 4 else s


def score_block(a: np.ndarray, a_info: MapInfo, b: np.ndarray, b_info: MapInfo,
                threshold: float) -> dict[str, np.ndarray]:
    """Per-image scores of stored maps a against b: arrays of length N (NaN where undefined)."""
    n = len(a)
    a01 = to_unit(a, a_info).reshape(n, -1)
    obj = (to_unit(b, b_info) >= 0.5).reshape(n, -1)
    energy = positive_energy(a, a_info).reshape(n, -1)
    has_obj = obj.any(axis=1)
    is_max = a01 == a01.max(axis=1, keepdims=True)
    pointing = (is_max & obj).sum(axis=1) / is_max.sum(axis=1)
    pred = a01 >= threshold
    inter = (pred & obj).sum(axis=1)
    union = (pred | obj).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, inter / np.maximum(union, 1), np.nan)
        total = energy.sum(axis=1)
        share = np.where(total > 0, (energy * obj).sum(axis=1) / np.where(total > 0, total, 1), np.nan)
    nan = np.full(n, np.nan)
    return {
        "has_object": has_obj,
        "pointing": np.where(has_obj, pointing, nan),
        "iou": np.where(has_obj, iou, nan),
        "energy": np.where(has_obj, share, nan),
    }


@dataclass
class Scores:
    """Averages over a set of images (those with an object in B)."""

    n: int = 0
    pointing: float = math.nan
    iou: float = math.nan
    energy: float = math.nan
    n_energy: int = 0  # images where A has positive energy (the energy share's count)

    def to_json(self) -> dict[str, Any]:
        def f(v: float) -> float | None:
            return None if math.isnan(v) else round(float(v), 6)

        return {"n": self.n, "pointing": f(self.pointing), "iou": f(self.iou), "energy": f(self.energy),
                "n_energy": self.n_energy}


def _average(per: dict[str, np.ndarray], sel: np.ndarray) -> Scores:
    sel = sel & per["has_object"]
    n = int(sel.sum())
    if n == 0:
        return Scores()
    e = per["energy"][sel]
    ok = ~np.isnan(e)
    return Scores(n=n, pointing=float(per["pointing"][sel].mean()), iou=float(per["iou"][sel].mean()),
                  energy=float(e[ok].mean()) if ok.any() else math.nan, n_energy=int(ok.sum()))


@dataclass
class SplitComparison:
    n_images: int
    no_object: int
    overall: Scores
    classes: dict[str, Scores] = field(default_factory=dict)


@dataclass
class Comparison:
    store: str
    map: str
    against: str
    threshold: float
    splits: dict[str, SplitComparison]

    def to_json(self) -> dict[str, Any]:
        return {
            "store": self.store, "map": self.map, "against": self.against, "threshold": self.threshold,
            "splits": {
                s: {"n_images": c.n_images, "no_object": c.no_object, "overall": c.overall.to_json(),
                    "classes": {k: v.to_json() for k, v in c.classes.items()}}
                for s, c in self.splits.items()
            },
        }

    def format(self) -> str:
        """A readable table per split: overall, then each class."""
        lines = []
        for s, c in self.splits.items():
            lines.append(f"{self.map} against {self.against} on {s}: {c.n_images:,} images"
                         f" ({c.no_object:,} with no object left out), threshold {self.threshold:g}")
            width = max([len("class"), len("all")] + [len(k) for k in c.classes])
            lines.append(f"  {'class':<{width}} {'n':>7} {'pointing':>9} {'IoU':>7} {'energy':>7}")

            def row(label: str, sc: Scores) -> str:
                def f(v: float) -> str:
                    return "-" if math.isnan(v) else f"{v:.3f}"

                return f"  {label:<{width}} {sc.n:>7,} {f(sc.pointing):>9} {f(sc.iou):>7} {f(sc.energy):>7}"

            lines.append(row("all", c.overall))
            for k, v in c.classes.items():
                lines.append(row(k, v))
        return "\n".join(lines)


def compare_maps(store: Store, map_a: str, map_b: str, *, splits: Sequence[str] | None = None,
                 threshold: float = 0.5) -> Comparison:
    """Score map_a against map_b's object on each split (see the module docstring)."""
    info = store.info
    for flag, name in (("--map", map_a), ("--against", map_b)):
        if name not in info.maps:
            known = ", ".join(sorted(info.maps)) or "none"
            raise SatkitError(f"{flag}: {store.path} has no map {name!r} (maps: {known})")
    if not 0.0 <= threshold <= 1.0:
        raise SatkitError(f"--threshold: must be in [0, 1], got {threshold}")
    order = store.select_splits(splits, "--split")
    a_info, b_info = info.maps[map_a], info.maps[map_b]
    out: dict[str, SplitComparison] = {}
    for split in order:
        a_arr = store.array(split, "saliency", map_a)
        b_arr = store.array(split, "saliency", map_b)
        labels = store.load(split, "labels")
        n = info.splits[split]
        parts: dict[str, list[np.ndarray]] = {}
        for start in range(0, n, BLOCK):
            stop = min(n, start + BLOCK)
            per = score_block(np.asarray(a_arr[start:stop]), a_info, np.asarray(b_arr[start:stop]), b_info,
                              threshold)
            for k, v in per.items():
                parts.setdefault(k, []).append(v)
        # an empty split has no blocks: no images, each score over nothing
        per_all = {k: np.concatenate(parts[k]) if k in parts else np.zeros(0, dtype=bool if k == "has_object" else float)
                   for k in ("has_object", "pointing", "iou", "energy")}
        everyone = np.ones(n, dtype=bool)
        classes: dict[str, Scores] = {}
        for ci, cname in enumerate(info.classes):
            member = labels == ci if labels.ndim == 1 else labels[:, ci].astype(bool)
            if member.any():
                classes[cname] = _average(per_all, member)
        out[split] = SplitComparison(n_images=n, no_object=int((~per_all["has_object"]).sum()),
                                     overall=_average(per_all, everyone), classes=classes)
    return Comparison(store=store.path, map=map_a, against=map_b, threshold=threshold, splits=out)


def comparison_json(c: Comparison) -> str:
    return json.dumps(c.to_json(), indent=2)


__all__ = ["Comparison", "Scores", "SplitComparison", "compare_maps", "comparison_json", "positive_energy",
           "score_block", "to_unit"]
