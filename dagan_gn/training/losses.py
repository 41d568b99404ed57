"""Adversarial objectives in one registry, plus the WGAN-GP gradient penalty.

Every loss has the same two-method interface so the trainer never branches on the loss name::

    loss = get_loss("wgan-gp")
    d_loss = loss.critic_loss(d_real, d_fake)        # minimised by the critic
    g_loss = loss.generator_loss(d_fake)             # minimised by the generator
    if loss.uses_gradient_penalty:
        d_loss = d_loss + gp_weight * gradient_penalty(critic_fn, real, fake)[0]
    loss.after_critic_update(critic, loss_cfg)      # after each critic optimizer step (WGAN: clip the weights)

Critic outputs are raw scores ``[B]`` (no sigmoid); all reductions are means over the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from dagan_gn.errors import DaganError

__all__ = [
    "GANLoss",
    "WassersteinLoss",
    "HingeLoss",
    "NonSaturatingLoss",
    "LOSSES",
    "LossError",
    "get_loss",
    "gradient_penalty",
    "drift_penalty",
]

Images = Union[torch.Tensor, Sequence[torch.Tensor]]


class LossError(DaganError, ValueError):
    """Unknown loss name or invalid loss arguments."""


@dataclass(frozen=True)
class GANLoss:
    """Base class: a critic objective, a generator objective and two flags the trainer reads."""

    name: str = "base"
    #: Add the gradient penalty (WGAN-GP) to the critic loss.
    uses_gradient_penalty: bool = False
    #: Clamp critic weights after every critic update (original WGAN).
    clips_weights: bool = False

    def critic_loss(self, d_real: torch.Tensor, d_fake: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def generator_loss(self, d_fake: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def after_critic_update(self, critic: nn.Module, loss_cfg: Any) -> None:
        """What the loss does to the critic after each critic optimizer step: with ``clips_weights`` (the original
        WGAN), clamp every parameter to ``[-loss_cfg.clip_value, loss_cfg.clip_value]``; nothing otherwise."""
        if self.clips_weights:
            c = loss_cfg.clip_value
            with torch.no_grad():
                for p in critic.parameters():
                    p.clamp_(-c, c)


@dataclass(frozen=True)
class WassersteinLoss(GANLoss):
    """WGAN: the critic maximises E[D(real)] - E[D(fake)] (the Wasserstein estimate); G maximises E[D(fake)]."""

    def critic_loss(self, d_real: torch.Tensor, d_fake: torch.Tensor) -> torch.Tensor:
        return d_fake.float().mean() - d_real.float().mean()

    def generator_loss(self, d_fake: torch.Tensor) -> torch.Tensor:
        return -d_fake.float().mean()


@dataclass(frozen=True)
class HingeLoss(GANLoss):
    """Hinge loss (Lim & Ye 2017; SAGAN/BigGAN): relu(1 - D(real)) + relu(1 + D(fake)); G maximises D(fake)."""

    def critic_loss(self, d_real: torch.Tensor, d_fake: torch.Tensor) -> torch.Tensor:
        return F.relu(1.0 - d_real.float()).mean() + F.relu(1.0 + d_fake.float()).mean()

    def generator_loss(self, d_fake: torch.Tensor) -> torch.Tensor:
        return -d_fake.float().mean()


@dataclass(frozen=True)
class NonSaturatingLoss(GANLoss):
    """Goodfellow et al.'s GAN loss with the non-saturating generator objective, on logits:
    critic ``softplus(-D(real)) + softplus(D(fake))`` (= BCE with logits), generator ``softplus(-D(fake))``."""

    def critic_loss(self, d_real: torch.Tensor, d_fake: torch.Tensor) -> torch.Tensor:
        return F.softplus(-d_real.float()).mean() + F.softplus(d_fake.float()).mean()

    def generator_loss(self, d_fake: torch.Tensor) -> torch.Tensor:
        return F.softplus(-d_fake.float()).mean()


#: The registry: ``LossConfig.name`` → loss object.
LOSSES: dict[str, GANLoss] = {
    "wgan-gp": WassersteinLoss(name="wgan-gp", uses_gradient_penalty=True),
    "wgan-clip": WassersteinLoss(name="wgan-clip", clips_weights=True),
    "hinge": HingeLoss(name="hinge"),
    "ns": NonSaturatingLoss(name="ns"),
}


def get_loss(name: str) -> GANLoss:
    """The registered loss called ``name``; a clear error lists the choices otherwise."""
    try:
        return LOSSES[name]
    except KeyError:
        raise LossError(f"unknown loss '{name}'; choose one of: {', '.join(LOSSES)} (config key loss.name)") from None


def _as_tuple(x: Images) -> tuple[torch.Tensor, ...]:
    return (x,) if isinstance(x, torch.Tensor) else tuple(x)


def gradient_penalty(
    critic_fn: Callable[..., torch.Tensor],
    real: Images,
    fake: Images,
    center: float = 1.0,
    one_sided: bool = False,
    *,
    grad_scale: float | torch.Tensor = 1.0,
    alpha: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """WGAN-GP penalty ``E[(||∇D(x̂)||₂ - center)²]`` at random points between real and fake samples.

    Args:
        critic_fn: called as ``critic_fn(*x_hat)`` and returning scores ``[B]``.
        real, fake: a tensor ``[B, ...]`` or a tuple of tensors (the critic's inputs). For tuples, an element that is
            *the same tensor object* in ``real`` and ``fake`` is conditioning and is held fixed; every other element
            is interpolated. For the DAGAN pair critic this means ``real=(x, x_other)``, ``fake=(x, G(x, z))``:
            the source image ``x`` stays as it is and only the second image moves between the real partner and the
            generated one. That matches what the critic is asked to judge (is the *second* image a plausible
            same-class partner of ``x``?) and keeps the penalty on the direction the generator can change.
        center: target gradient norm: 1 (Gulrajani et al.) or 0 (zero-centred penalty, Mescheder et al.).
        one_sided: penalise only norms above ``center`` (``max(0, ||g|| - center)²``).
        grad_scale: the fp16 GradScaler's current scale (1 otherwise), a float or a 0-d tensor on the device (the
            trainer passes the tensor so reading it does not wait for the GPU). The critic output is multiplied by it
            before differentiating so fp16 gradients do not underflow, and the gradients are divided by it again in
            fp32 (the recipe of the torch.amp docs' "gradient penalty" example).
        alpha: optional interpolation weights ``[B]``; drawn uniformly per sample when omitted.

    Returns:
        ``(penalty, grad_norm)``: the scalar penalty (fp32, differentiable with ``create_graph=True``) and the
        per-sample gradient norms ``[B]`` (detached), for logging.

    Interpolation is per sample: ``α`` has shape ``[B, 1, 1, 1]`` (one weight per sample, broadcast over C, H, W and
    shared by all interpolated tensors of the sample). The gradient norm is taken over the whole flattened sample
    (all interpolated tensors together), not per channel or per pixel. The interpolation, the gradient and the norm
    are computed in fp32 even under autocast; only the critic's own forward follows the autocast context.
    """
    real_t, fake_t = _as_tuple(real), _as_tuple(fake)
    if len(real_t) != len(fake_t):
        raise LossError("gradient_penalty: real and fake must have the same number of tensors")
    moving = [r is not f for r, f in zip(real_t, fake_t)]
    if not any(moving):
        raise LossError("gradient_penalty: real and fake are identical; nothing to interpolate")
    batch = real_t[0].shape[0]
    device = real_t[0].device
    if alpha is None:
        alpha = torch.rand(batch, device=device, dtype=torch.float32)
    alpha = alpha.to(device=device, dtype=torch.float32).reshape(batch)

    inputs: list[torch.Tensor] = []
    interpolated: list[torch.Tensor] = []
    for r, f, move in zip(real_t, fake_t, moving):
        if not move:
            inputs.append(r)
            continue
        a = alpha.view(batch, *([1] * (r.dim() - 1)))  # [B, 1, 1, 1] for images
        # detach: the penalty must not push gradients into the generator or the data pipeline.
        x_hat = (a * r.detach().float() + (1.0 - a) * f.detach().float())
        if r.is_contiguous(memory_format=torch.channels_last) and r.dim() == 4:
            x_hat = x_hat.contiguous(memory_format=torch.channels_last)
        x_hat.requires_grad_(True)
        # Differentiate with respect to a (free) view rather than the leaf itself: module hooks such as
        # FlopCounterMode's or full backward hooks refuse autograd.grad() with respect to leaf inputs.
        x_hat = x_hat.view_as(x_hat)
        inputs.append(x_hat)
        interpolated.append(x_hat)

    scores = critic_fn(*inputs).float()
    grads = torch.autograd.grad(
        outputs=scores.sum() * grad_scale, inputs=interpolated, create_graph=True
    )
    flat = torch.cat([g.float().reshape(batch, -1) for g in grads], dim=1)
    if isinstance(grad_scale, torch.Tensor) or grad_scale != 1.0:
        flat = flat / grad_scale
    norm = flat.norm(2, dim=1)
    gap = norm - center
    if one_sided:
        gap = gap.clamp(min=0.0)
    penalty = (gap**2).mean()
    return penalty, norm.detach()


def drift_penalty(d_real: torch.Tensor) -> torch.Tensor:
    """``E[D(real)²]`` (Karras et al. 2018): keeps critic outputs from drifting; weight it with ``loss.drift``."""
    return (d_real.float() ** 2).mean()
