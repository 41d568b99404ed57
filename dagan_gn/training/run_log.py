"""Run logging: TensorBoard scalars, ``metrics.jsonl``, PNG sample grids and the loss-curve figure.

Only rank 0 logs (the trainer builds a disabled :class:`RunLogger` on the other ranks).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from dagan_gn.fileio import atomic_path, atomic_write_text, save_figure

__all__ = ["RunLogger", "image_grid", "save_image_grid", "plot_loss_curves", "read_metrics"]


class RunLogger:
    """Writes scalars to ``RUN/tensorboard`` and ``RUN/metrics.jsonl`` (one JSON object per logged step)."""

    def __init__(self, run_dir: str | os.PathLike, enabled: bool = True, tensorboard: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.jsonl = self.run_dir / "metrics.jsonl"
        self._writer = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
            except ImportError:  # tensorboard is a dependency, but a broken install must not stop training
                self._writer = None

    def truncate_after(self, step: int) -> None:
        """Drop ``metrics.jsonl`` records later than ``step`` (a resumed run re-logs them)."""
        if not self.enabled or not self.jsonl.is_file():
            return
        kept = [rec for rec in read_metrics(self.jsonl) if rec.get("step", 0) <= step]
        atomic_write_text(self.jsonl, "".join(json.dumps(r) + "\n" for r in kept))

    def log(self, step: int, scalars: Mapping[str, float], prefix: str = "") -> None:
        if not self.enabled:
            return
        record: dict[str, Any] = {"step": int(step)}
        for key, value in scalars.items():
            v = float(value)
            record[prefix + key] = v if math.isfinite(v) else str(v)
            if self._writer is not None:
                self._writer.add_scalar(prefix + key, v, int(step))
        with open(self.jsonl, "a") as fh:
            fh.write(json.dumps(record) + "\n")

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of a ``metrics.jsonl`` (unreadable lines, e.g. from a killed write, are skipped)."""
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def image_grid(images: torch.Tensor, nrow: int, padding: int = 2, pad_value: float = 1.0) -> np.ndarray:
    """Tile ``[N, C, H, W]`` images in [-1, 1] (``nrow`` per row, ``padding`` pixels of ``pad_value`` in [0, 1]
    around them, as torchvision's ``make_grid`` lays them out) into a ``uint8`` array: ``H' x W'`` for one channel,
    ``H' x W' x 3`` for three. Values map to ``uint8`` as torchvision's ``save_image`` does (``x * 255 + 0.5``).

    Written out rather than imported: ``import torchvision`` costs seconds per process, and every run draws a grid
    at step 0.
    """
    images = images.detach().float().cpu().clamp(-1, 1).add(1).div(2)
    n, c, h, w = images.shape
    ncol = max(1, min(int(nrow), n))
    nrows = math.ceil(n / ncol)
    grid = torch.full((c, nrows * (h + padding) + padding, ncol * (w + padding) + padding), float(pad_value))
    for i in range(n):
        r, col = divmod(i, ncol)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[:, top : top + h, left : left + w] = images[i]
    arr = grid.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    return arr[..., 0] if c == 1 else arr[..., :3]


def save_image_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int, padding: int = 2) -> Path:
    """Write :func:`image_grid` of ``images`` as a PNG (grey for one channel), atomically; returns ``path``.

    The one way dagan-gn draws image grids: training samples, the augment contact sheet, the CIFAR-10 study grids.
    """
    from PIL import Image

    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(image_grid(images, nrow, padding)).save(tmp, format="PNG")
    return path


def plot_loss_curves(metrics_jsonl: str | os.PathLike, path: str | os.PathLike) -> Path | None:
    """Plot the loss/penalty/Wasserstein curves of ``metrics.jsonl`` to a PNG; None when nothing was logged."""
    metrics_jsonl = Path(metrics_jsonl)
    if not metrics_jsonl.is_file():
        return None
    records = read_metrics(metrics_jsonl)
    keys = ["loss/critic", "loss/generator", "loss/gradient_penalty", "wasserstein_estimate"]
    series = {k: [(r["step"], r[k]) for r in records if isinstance(r.get(k), (int, float))] for k in keys}
    series = {k: v for k, v in series.items() if v}
    fid = [(r["step"], r[k]) for r in records for k in r if k.endswith("fid") and isinstance(r[k], (int, float))]
    if not series and not fid:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    ncols = 2 if fid else 1
    fig, axes = plt.subplots(1, ncols, figsize=(6 * ncols, 4), squeeze=False)
    ax = axes[0, 0]
    for key, points in series.items():
        steps, values = zip(*points)
        ax.plot(steps, values, label=key)
    ax.set_xlabel("generator step")
    ax.set_title("training losses")
    ax.legend(loc="best", fontsize="small")
    ax.grid(alpha=0.3)
    if fid:
        steps, values = zip(*fid)
        axes[0, 1].plot(steps, values, marker="o")
        axes[0, 1].set_xlabel("generator step")
        axes[0, 1].set_title("FID")
        axes[0, 1].grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    return save_figure(fig, path, dpi=100)
