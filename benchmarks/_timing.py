"""The benchmarks' one timer: the best of ``repeats`` timed calls after one untimed warm-up call.

The best (not the mean) because the development machine is shared: other processes only ever make a call slower. The
scripts in this folder import it as ``from _timing import best_seconds``: run as ``python benchmarks/<script>.py``,
a script's own folder is first on ``sys.path``; ``gpu_check.py`` puts this folder there for the scripts it imports.
"""

from __future__ import annotations

import time
from typing import Callable

__all__ = ["best_seconds"]


def best_seconds(fn: Callable[[], object], repeats: int, sync: Callable[[], object] = lambda: None) -> float:
    """Seconds of the fastest of ``repeats`` calls of ``fn``, after one untimed warm-up call (allocator, oneDNN
    primitive creation, cuDNN autotuning). ``sync`` (e.g. ``torch.cuda.synchronize``) runs after the warm-up and
    inside each timed call's interval, so a device's queued work is counted. ``inf`` when ``repeats`` < 1."""
    fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best
