"""Exponential moving average of generator weights (Karras et al.; Yazıcı et al. 2019).

Before ``start_step`` the average simply tracks the generator (a copy), so early, poor weights do not dominate the
average; afterwards ``ema = decay * ema + (1 - decay) * param``. Buffers (e.g. batch-norm running statistics) are
copied, not averaged.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

__all__ = ["EMA"]


class EMA:
    """Holds an averaged copy of ``model`` in ``self.module`` (always in eval mode, never requiring grad)."""

    def __init__(self, model: nn.Module, decay: float = 0.999, start_step: int = 0) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay} (config key train.ema_decay; 0 disables EMA)")
        self.decay = float(decay)
        self.start_step = int(start_step)
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Fold the current weights of ``model`` in (``step`` is the generator step just completed)."""
        ema_params = list(self.module.parameters())
        params = list(model.parameters())
        if step < self.start_step:
            torch._foreach_copy_(ema_params, [p.detach() for p in params])
        else:
            torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1.0 - self.decay)
        for b_ema, b in zip(self.module.buffers(), model.buffers()):
            b_ema.copy_(b)

    def state_dict(self) -> dict[str, Any]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state)
