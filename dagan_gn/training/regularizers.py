"""Generator regularizers that act on *pairs of outputs*: the mode-seeking term (Mao et al. 2019, MSGAN).

A conditional generator trained only against a critic tends to ignore its noise: the critic judges one output per
condition, and one good output per source patch already fools it, so ``G(x, z1) ≈ G(x, z2)`` (the classic DAGAN
failure, "all other images are the same"). MSGAN asks two variants of the same source to differ in proportion to
their noises::

    ratio = mean|G(x, z1) - G(x, z2)| / mean|z1 - z2|       (means over the batch and all pixels / noise entries)
    L_ms  = λ / (ratio + ε)                                 (added to the generator loss; ``loss.mode_seeking: λ``)

Maximising the ratio spreads the outputs of one source over image space; the adversarial term keeps each of them
plausible. ``1/(ratio + ε)`` (MSGAN's form) has a large gradient exactly where the generator ignores ``z`` and a
vanishing one once variants are diverse, so it does not push diversity past what the critic accepts. The image
distance is on the networks' [-1, 1] scale.

**Bounded variant** (``loss.mode_seeking_target: c > 0``, DAGAN only): the ratio is clipped at
``c · mean|x − x_other| / mean|z1 − z2|`` before ``λ / (· + ε)``, where ``x_other`` is the source's real same-class
partner in the batch — the term pushes variants apart until they differ by ``c`` times what two real patches of
the class differ, and not beyond (unbounded, the generator's cheapest route to a large ratio is wild brightness and
texture swings; see docs/augment.md for the measurements).
"""

from __future__ import annotations

import torch

__all__ = ["mode_seeking_ratio", "mode_seeking_penalty", "real_pair_cap", "paired_noise_inputs",
           "orthogonal_regularization", "with_orthogonal_regularization"]


def mode_seeking_ratio(fake_a: torch.Tensor, fake_b: torch.Tensor, z_a: torch.Tensor,
                       z_b: torch.Tensor) -> torch.Tensor:
    """``mean|fake_a - fake_b| / mean|z_a - z_b|`` as a differentiable fp32 scalar (MSGAN's ``lz``)."""
    image_distance = (fake_a.float() - fake_b.float()).abs().mean()
    noise_distance = (z_a.float() - z_b.float()).abs().mean()
    return image_distance / noise_distance


def mode_seeking_penalty(ratio: torch.Tensor, weight: float, eps: float = 1e-5,
                         cap: torch.Tensor | float | None = None) -> torch.Tensor:
    """MSGAN's generator term ``weight / (ratio + eps)`` (to be minimised); with ``cap`` the ratio is clipped at
    ``cap`` first, so the term stops pushing variants apart once they are that diverse (its gradient is 0 above)."""
    if cap is not None:
        ratio = torch.minimum(ratio, torch.as_tensor(cap, dtype=ratio.dtype, device=ratio.device))
    return weight / (ratio + eps)


def real_pair_cap(sources: torch.Tensor, partners: torch.Tensor, z_a: torch.Tensor, z_b: torch.Tensor,
                  target: float) -> torch.Tensor:
    """The bounded variant's cap for the DAGAN: ``target · mean|x − x_other| / mean|z_a − z_b|`` (detached), i.e.
    stop at variants that differ by ``target`` times the distance between a source and its real same-class partner
    (``target = 1``: as varied as real pairs of the batch)."""
    with torch.no_grad():
        return target * (sources.float() - partners.float()).abs().mean() / (z_a.float() - z_b.float()).abs().mean()


def paired_noise_inputs(z: torch.Tensor, *conditions: torch.Tensor | None
                        ) -> tuple[torch.Tensor, tuple[torch.Tensor | None, ...]]:
    """Inputs for one generator forward of two variants per condition: ``[z; z2]`` with a fresh ``z2`` drawn like
    ``z`` (global RNG, ``z``'s device), and every condition repeated ``[c; c]`` (None stays None). The two halves of
    the output are then the variant pairs of :func:`mode_seeking_ratio`."""
    z2 = torch.randn(z.shape, device=z.device, dtype=z.dtype)
    doubled = tuple(None if c is None else torch.cat([c, c]) for c in conditions)
    return torch.cat([z, z2]), doubled


def orthogonal_regularization(module: torch.nn.Module) -> torch.Tensor:
    """BigGAN's orthogonal regularisation ``Σ ||W Wᵀ ⊙ (1 - I)||²_F`` over conv/linear weights
    (rows = output channels)."""
    total = None
    for name, p in module.named_parameters():
        if p.dim() < 2 or not p.requires_grad:
            continue
        w = p.reshape(p.shape[0], -1).float()
        gram = w @ w.t()
        off = gram * (1.0 - torch.eye(gram.shape[0], device=gram.device))
        term = (off**2).sum()
        total = term if total is None else total + term
    return total if total is not None else torch.zeros(())


def with_orthogonal_regularization(loss: torch.Tensor, generator: torch.nn.Module, weight: float,
                                   logs: dict) -> torch.Tensor:
    """``loss + weight · orthogonal_regularization(generator)`` (``optim.ortho_reg``), the term logged as
    ``loss/orthogonal_reg``; ``loss`` itself when ``weight`` is 0."""
    if weight <= 0:
        return loss
    ortho = orthogonal_regularization(generator)
    logs["loss/orthogonal_reg"] = ortho.detach()
    return loss + weight * ortho
