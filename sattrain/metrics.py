"""Scores shared by training's held-out evaluation and ``sattrain eval``, so both agree."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def _numpy(a: Any) -> np.ndarray:
    if hasattr(a, "detach"):  # a torch tensor, on any device
        a = a.detach().float().cpu().numpy()
    return np.asarray(a)


def average_precision(scores: Any, targets: Any) -> float:
    """Average precision of one class: sum over thresholds of (R_n - R_{n-1}) * P_n.

    The same non-interpolated definition as scikit-learn's ``average_precision_score``
    (ties in the scores share one threshold). NaN when the class has no positive sample,
    and when a score is NaN (a diverged model's logits have no ranking; argsort would
    silently order them anyway).
    """
    scores = _numpy(scores).astype(np.float64)
    targets = _numpy(targets) > 0.5
    n_pos = int(targets.sum())
    if n_pos == 0 or np.isnan(scores).any():
        return float("nan")
    order = np.argsort(-scores, kind="mergesort")
    s, t = scores[order], targets[order]
    tps = np.cumsum(t)
    fps = np.cumsum(~t)
    # The last index of each run of equal scores is where a threshold takes effect.
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]
    precision = tps[last] / (tps[last] + fps[last])
    recall = tps[last] / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def mean_average_precision(scores: Any, targets: Any) -> float:
    """mAP over the classes that have at least one positive sample (NaN if none has, or if
    any score is NaN).

    ``scores`` and ``targets`` are (N, K) arrays or tensors (targets multi-hot).
    """
    scores, targets = _numpy(scores), _numpy(targets)
    if np.isnan(scores.astype(np.float64)).any():
        return float("nan")  # not "the other classes' mAP": a NaN score is a failed model, not a missing class
    aps = [average_precision(scores[:, k], targets[:, k]) for k in range(targets.shape[1])]
    aps = [a for a in aps if not math.isnan(a)]
    return float(np.mean(aps)) if aps else float("nan")
