"""Test-set reconstruction error (Xiang & Li 2017, "On the effects of batch and weight normalization in generative
adversarial networks"): how well a frozen generator can reproduce held-out images.

For each image ``x`` in [0, 1] the latent ``z`` starts at zero and is optimised with RMSprop (lr 0.01, alpha 0.9) for
50 steps to minimise ``MSE((G(z) + 1) / 2, x)``; the reported error is that MSE after the last step, averaged over
images. Images are optimised in batches, but the loss is the *sum* of per-image losses and RMSprop is elementwise,
so every image's ``z`` follows exactly the trajectory it would follow alone. The generator runs in eval mode
(batch-norm running statistics), which also keeps images in a batch independent.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["ReconstructionResult", "reconstruction_error"]


@dataclass
class ReconstructionResult:
    """Mean and per-image reconstruction MSE (images in [0, 1])."""

    mean: float
    per_image: torch.Tensor
    steps: int

    def as_dict(self) -> dict[str, float]:
        return {"recon_mse": self.mean, "recon_mse_std": float(self.per_image.std()) if len(self.per_image) > 1 else 0.0}


def reconstruction_error(
    generator: nn.Module,
    images01: torch.Tensor,
    steps: int = 50,
    lr: float = 0.01,
    alpha: float = 0.9,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    labels: torch.Tensor | None = None,
    progress: bool = False,
) -> ReconstructionResult:
    """Reconstruction error of ``generator`` (``G(z, y=None) -> [-1, 1]`` images, with a ``z_dim``) on ``images01``
    (``[N, C, H, W]`` in [0, 1]).

    Args:
        generator: frozen during the search (gradients flow only to ``z``); its train/eval mode and
            ``requires_grad`` flags are restored afterwards.
        images01: held-out images in [0, 1].
        steps, lr, alpha: RMSprop settings of the latent search (Xiang & Li: 50, 0.01, 0.9).
        batch_size: images optimised together (results do not depend on it).
        device: where to run.
        labels: class labels for a class-conditional generator (``y``); ``None`` for unconditional.
        progress: show a tqdm bar over batches.
    """
    if images01.ndim != 4:
        raise ValueError(f"images01 must be [N, C, H, W], got shape {tuple(images01.shape)}")
    if images01.numel() and (images01.min() < 0 or images01.max() > 1):
        raise ValueError("images01 must lie in [0, 1] (convert network-scale [-1, 1] images with (x + 1) / 2)")
    z_dim = getattr(generator, "z_dim", None)
    if z_dim is None:
        raise ValueError("generator has no z_dim attribute; reconstruction needs a noise-to-image generator G(z)")
    device = torch.device(device)
    was_training = generator.training
    flags = [p.requires_grad for p in generator.parameters()]
    generator.to(device).eval().requires_grad_(False)
    per_image = []
    try:
        from tqdm.auto import tqdm

        starts = range(0, len(images01), batch_size)
        for start in tqdm(starts, disable=not progress, desc="reconstruction", unit="batch"):
            x = images01[start : start + batch_size].to(device=device, dtype=torch.float32)
            y = labels[start : start + batch_size].to(device) if labels is not None else None
            z = torch.zeros(len(x), z_dim, device=device, requires_grad=True)
            opt = torch.optim.RMSprop([z], lr=lr, alpha=alpha)

            def per_sample_mse() -> torch.Tensor:
                out = generator(z) if y is None else generator(z, y)
                if out.shape != x.shape:
                    raise ValueError(f"generator output {tuple(out.shape)} does not match images {tuple(x.shape)}")
                return ((out + 1) / 2 - x).pow(2).flatten(1).mean(dim=1)

            for _ in range(steps):
                opt.zero_grad(set_to_none=True)
                per_sample_mse().sum().backward()
                opt.step()
            with torch.no_grad():
                per_image.append(per_sample_mse().cpu())
    finally:
        for p, f in zip(generator.parameters(), flags):
            p.requires_grad_(f)
        generator.train(was_training)
    values = torch.cat(per_image) if per_image else torch.zeros(0)
    return ReconstructionResult(float(values.mean()) if len(values) else float("nan"), values, steps)
