"""The release card's judgement rules: the thresholds each verdict is read against, and the verdict record
(shared by :mod:`dagan_gn.jobs.report` and :mod:`dagan_gn.jobs.report_privacy`, which import it, not each other)."""

from __future__ import annotations

import numpy as np

__all__ = ["THRESHOLDS", "verdict", "as_unit"]

#: The thresholds behind the verdict lines (shown on the page next to each verdict).
THRESHOLDS: dict[str, float] = {
    # assess: pixel diversity ratio (1 = as varied as real same-class pairs)
    "diversity_ok": 0.5,
    "diversity_copies": 0.2,
    # assess: distance to source below this is a copy of the source
    "source_distance_copy": 0.2,
    # assess: balanced accuracy on variants may trail held-out real patches by this much
    "class_consistency_drop": 0.1,
    # assess / evaluate: KID of the variants at most this many times the real-vs-real floor
    "kid_floor_factor": 2.0,
    # membership: AUC whose bootstrap interval lies above this is measurable leakage
    "membership_auc": 0.55,
}


def verdict(status: str, text: str, threshold: str) -> dict[str, str]:
    """``status`` is one of ``pass``, ``warn``, ``fail``, ``not measured``."""
    return {"status": status, "text": text, "threshold": threshold}


def as_unit(x: np.ndarray) -> np.ndarray:
    """[-1, 1] → [0, 1]."""
    return np.clip((np.asarray(x, np.float32) + 1.0) / 2.0, 0.0, 1.0)
