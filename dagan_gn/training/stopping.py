"""Why a training run stops: :class:`TrainingError` (it cannot start or continue), a non-finite loss, running out of
memory, and stop requests (Ctrl-C, SIGTERM, :meth:`StopRequests.request`) that end the loop after the current step,
at the same step on every rank."""

from __future__ import annotations

import contextlib
import math
import signal
import threading
from typing import Callable, Iterator

import torch

from dagan_gn.errors import DaganError
from dagan_gn.training.distributed import DistInfo

__all__ = ["TrainingError", "finite_scalars", "is_oom", "out_of_memory_error", "StopRequests"]


class TrainingError(DaganError, RuntimeError):
    """A training run cannot start or continue; the message says why and what to change."""


def finite_scalars(logs: dict[str, torch.Tensor | float], step: int) -> dict[str, float]:
    """``logs`` as floats; a non-finite loss stops the run. Gradient norms are not checked: an fp16 step whose
    gradients overflow is legitimately inf there, and the GradScaler skips it. For the same reason, with fp16 a
    non-finite loss of a step the GradScaler skipped is expected (the scaled penalty overflowed; the scaler halves
    its scale and the weights are untouched) — unless the scale has collapsed below 1, which means every step
    overflows and the run has diverged."""
    scalars = {k: float(v) for k, v in logs.items()}
    bad = [k for k, v in scalars.items() if not math.isfinite(v) and not k.startswith("grad_norm/")]
    skipped = scalars.get("amp/critic_step_skipped", 0.0) > 0 or scalars.get("amp/generator_step_skipped", 0.0) > 0
    scales = [v for k, v in scalars.items() if k.startswith("amp/") and k.endswith("_scale")]
    if bad and skipped and min(scales, default=0.0) >= 1.0:
        return scalars
    if bad:
        raise TrainingError(
            f"non-finite {', '.join(bad)} at step {step}; lower the learning rates or "
            f"check the data (last good checkpoint is kept)"
        )
    return scalars


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is an out-of-memory error of torch (CUDA or CPU allocator)."""
    if isinstance(exc, getattr(torch, "OutOfMemoryError", ())) or isinstance(
        exc, getattr(torch.cuda, "OutOfMemoryError", ())
    ):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def out_of_memory_error(device: torch.device, batch_size: int) -> TrainingError:
    """The one-line error for running out of memory, naming a smaller batch."""
    return TrainingError(
        f"out of memory on {device} at data.batch_size={batch_size}; lower the batch size "
        f"(e.g. data.batch_size={max(1, batch_size // 2)}) or use train.amp=bf16"
    )


class StopRequests:
    """Stop requests of a run: SIGINT/SIGTERM inside :meth:`signals` (a second Ctrl-C aborts at once) and
    :meth:`request`; :meth:`should_stop` agrees across the ranks of a process group, so every rank leaves the loop at
    the same step."""

    def __init__(self, dist: DistInfo, device: torch.device, say: Callable[[str], None]) -> None:
        self.dist, self.device, self.say = dist, device, say
        self.requested = False
        self._signals_seen = 0

    def request(self) -> None:
        self.requested = True

    def _handle_signal(self, signum, frame) -> None:  # pragma: no cover - exercised by the CLI in practice
        self._signals_seen += 1
        if self._signals_seen > 1 and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.say(f"\nreceived signal {signum}: finishing this step and writing a checkpoint (Ctrl-C again to abort)")

    @contextlib.contextmanager
    def signals(self) -> Iterator[None]:
        """Turn SIGINT/SIGTERM into stop requests while inside (main thread only; the old handlers come back)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in previous:
            signal.signal(s, self._handle_signal)
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def should_stop(self) -> bool:
        flag = self.requested
        if self.dist.enabled:  # every rank must leave the loop at the same step
            t = torch.tensor([1.0 if flag else 0.0], device=self.device if self.dist.backend == "nccl" else "cpu")
            torch.distributed.all_reduce(t)
            flag = bool(t.item() > 0)
        return flag
