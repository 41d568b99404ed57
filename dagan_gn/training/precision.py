"""Mixed precision of a training run: the autocast dtype of ``train.amp``, and the GradScaler steps (fp16) whose
skipped steps and scale are logged as device tensors (read only on logging steps), plus gradient norms."""

from __future__ import annotations

from typing import Any, Iterable

import torch

from dagan_gn.training.stopping import TrainingError

__all__ = ["amp_dtype", "current_scale", "scaled_step", "grad_norm"]


def amp_dtype(name: str, device: torch.device, on_cpu: bool = False) -> torch.dtype | None:
    """The autocast dtype of ``train.amp`` (``none``/``bf16``/``fp16``) on ``device``; None for full precision (also
    on the CPU unless ``on_cpu``: autocast is slower than fp32 there without bf16 matrix units)."""
    name = (name or "none").lower()
    if name in ("none", "fp32", "no", "off", "false"):
        return None
    if name not in ("bf16", "fp16"):
        raise TrainingError(f"unknown train.amp '{name}'; choose none, bf16 or fp16")
    if device.type != "cuda" and not (device.type == "cpu" and on_cpu):
        return None
    return torch.bfloat16 if name == "bf16" else torch.float16


def current_scale(scaler: torch.amp.GradScaler) -> float | torch.Tensor:
    """A GradScaler's scale as a device tensor (reading it as a float would wait for the GPU at every step); its
    initial float before the first ``scale()`` call creates the tensor; 1 when the scaler is disabled."""
    if not scaler.is_enabled():
        return 1.0
    scale = scaler._get_scale_async()
    return scaler.get_scale() if scale is None else scale


def scaled_step(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer, logs: dict[str, Any],
                which: str) -> None:
    """``scaler.step`` + ``update``; with fp16, log whether the scaler skipped the step (its gradients
    overflowed, so it halved the scale) and the scale — as device tensors, read only on logging steps."""
    if not scaler.is_enabled():
        scaler.step(optimizer)
        scaler.update()
        return
    before = torch.as_tensor(current_scale(scaler)).clone()
    scaler.step(optimizer)
    scaler.update()
    after = scaler._get_scale_async()
    logs[f"amp/{which}_step_skipped"] = (after < before).float()
    logs[f"amp/{which}_scale"] = after.detach().clone()


def grad_norm(params: Iterable[torch.nn.Parameter]) -> float:
    """The global L2 norm of the parameters' gradients (0 when none has one)."""
    norms = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return float(torch.stack(norms).norm()) if norms else 0.0
