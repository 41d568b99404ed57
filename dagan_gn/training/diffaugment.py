"""Differentiable augmentation of the critic's input (DiffAugment, Zhao et al. 2020) with the adaptive probability of
ADA (Karras et al. 2020).

A GAN trained on a few thousand images overfits its critic: the critic memorises the training images, its feedback
to the generator stops being informative and the generator collapses onto a few outputs. DiffAugment applies the
*same kind* of random transform to real and generated images, inside the autograd graph and right before the
critic, so the critic never sees an un-augmented image and the generator still gets gradients (every op here is
differentiable with respect to the image). ADA applies each op to a sample with probability ``p`` and moves ``p``
so that the critic's overfitting statistic ``r_t`` stays at a target.

::

    aug = DiffAugment("translation,cutout,brightness,contrast", p=1.0)
    x_a, x_other_a, fake_a = aug(x, x_other, fake)   # one draw: the three images of sample i get the same transform
    aug.observe(d_real, d_fake, wasserstein=True)    # ADA: update p every `ada_interval` observed critic steps

Design choices (what the DAGAN needs beyond the reference implementation, mit-han-lab/data-efficient-gans):

* **One draw per call, shared by every image passed.** The DAGAN critic judges a *pair* (source, partner); a
  transform applied to one member only would be a cue the critic could learn instead of the pair's content, so the
  source, its real partner and its generated partner of sample ``i`` all get sample ``i``'s transform. The real pair
  ``(x, x_other)`` and the fake pair ``(x, G(x, z))`` therefore contain the *same* augmented source tensor, which keeps
  the gradient penalty's convention (the source is conditioning and held fixed; only the partner is interpolated,
  between augmented real and augmented fake partners). Different samples of a batch get independent transforms.
* **Parameters from the global torch RNG on the CPU** (like the trainer's flips), so a resumed run redraws exactly
  the transforms the uninterrupted one did, whatever the device; the number of values drawn per call depends only on
  the policy and the batch size, never on ``p`` (a changing ADA ``p`` does not shift the random stream).
* **Ops** (applied in this order, whatever the order in the policy string):
  ``brightness`` adds U(-0.5, 0.5) (on the [-1, 1] scale, as DiffAugment);
  ``saturation`` scales the deviation from the per-pixel channel mean by U(0, 2) (colour images only: with one
  channel it is the identity, which is why the ``color`` alias of DiffAugment means brightness + contrast for
  grayscale patches); ``contrast`` scales the deviation from the image mean by U(0.5, 1.5);
  ``translation`` shifts by an integer number of pixels in [-S/8, S/8] per axis; ``cutout`` sets a square of half
  the side to 0 (mid-grey on the [-1, 1] scale) at a uniform position.
* **Reflect padding for translation** (``padding="reflect"``, the default; ``"zeros"`` is DiffAugment's). A zero
  border is a flat mid-grey band, a structure that exists in no mammogram: the critic can learn "band width" as a
  feature, and at small ``p`` it is the most visible sign of augmentation. Reflection keeps the shifted image made of
  tissue texture, and it is what ADA uses for its geometric ops for the same reason.
* **ADA for Wasserstein critics.** ADA's statistic ``r_t = E[sign(D(real))]`` assumes a decision boundary at 0; a
  WGAN critic's output has an arbitrary offset (the loss is shift-invariant), so for Wasserstein losses ``r_t`` is
  ``E[sign(D(real) - D(fake))]`` over the (real, fake) pairs of the batch: 0 when the critic cannot tell them apart,
  1 when it ranks every real above its fake. ``p`` moves by ``sign(r_t - target) · images / (ada_kimg · 1000)`` every
  ``ada_interval`` observed critic steps, clamped to [0, 1] (ADA's update). ``p`` and the running sums are training
  state: :meth:`state_dict` / :meth:`load_state_dict` (the trainer checkpoints them with the model state).
"""

from __future__ import annotations

from typing import Any

import torch

from dagan_gn.errors import DaganError

__all__ = ["DiffAugmentError", "DiffAugment", "OPS", "parse_policy", "sample_params", "apply_params",
           "translate", "cutout"]

#: Ops in the order they are applied.
OPS: tuple[str, ...] = ("brightness", "saturation", "contrast", "translation", "cutout")
#: DiffAugment's policy names that stand for several ops.
ALIASES: dict[str, tuple[str, ...]] = {"color": ("brightness", "saturation", "contrast")}
PADDINGS = ("reflect", "zeros")


class DiffAugmentError(DaganError, ValueError):
    """An invalid DiffAugment policy or setting; the message names the config key."""


def parse_policy(policy: str) -> tuple[str, ...]:
    """The ops of a comma-separated policy such as ``"translation,cutout"`` (``color`` expands to brightness,
    saturation, contrast), in application order; ``""`` gives ``()``."""
    names: set[str] = set()
    for raw in str(policy or "").split(","):
        name = raw.strip().lower()
        if not name:
            continue
        if name in ALIASES:
            names.update(ALIASES[name])
        elif name in OPS:
            names.add(name)
        else:
            raise DiffAugmentError(f"unknown DiffAugment op '{name}' in loss.diffaugment={policy!r}; choose from "
                                   f"{', '.join((*OPS, *ALIASES))}")
    return tuple(op for op in OPS if op in names)


def sample_params(ops: tuple[str, ...], batch: int, height: int, width: int, p: float = 1.0, *,
                  translation_ratio: float = 0.125, cutout_ratio: float = 0.5) -> dict[str, dict[str, torch.Tensor]]:
    """Per-sample parameters of every op, drawn on the CPU from the global torch RNG.

    Returns ``{op: {"apply": bool[B], ...}}``: ``apply`` is the Bernoulli(``p``) choice of ADA (all true at
    ``p = 1``), the other entries the op's values for every sample (drawn whether applied or not, so the stream of
    random numbers does not depend on ``p``).
    """
    params: dict[str, dict[str, torch.Tensor]] = {}
    for op in ops:
        entry = {"apply": torch.rand(batch) < p}
        if op == "brightness":
            entry["shift"] = torch.rand(batch) - 0.5
        elif op == "saturation":
            entry["factor"] = torch.rand(batch) * 2.0
        elif op == "contrast":
            entry["factor"] = torch.rand(batch) + 0.5
        elif op == "translation":
            my, mx = int(height * translation_ratio + 0.5), int(width * translation_ratio + 0.5)
            entry["dy"] = torch.randint(-my, my + 1, (batch,))
            entry["dx"] = torch.randint(-mx, mx + 1, (batch,))
        elif op == "cutout":
            ch, cw = int(height * cutout_ratio + 0.5), int(width * cutout_ratio + 0.5)
            # the square's top-left corner; it may hang over the border (then the cut is smaller), as DiffAugment
            entry["top"] = torch.randint(0, height + 1 - (ch % 2), (batch,)) - ch // 2
            entry["left"] = torch.randint(0, width + 1 - (cw % 2), (batch,)) - cw // 2
            entry["size"] = torch.tensor([ch, cw])
        params[op] = entry
    return params


def _per_sample(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return values.to(device=x.device, dtype=x.dtype).view(-1, *([1] * (x.dim() - 1)))


def _reflect(index: torch.Tensor, n: int) -> torch.Tensor:
    """Reflect indices into [0, n) without repeating the edge (numpy/torch 'reflect'), for |shift| < n."""
    index = index.abs()
    return (n - 1) - ((n - 1) - index).abs()


def translate(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, padding: str = "reflect") -> torch.Tensor:
    """Shift each sample of ``x`` [B, C, H, W] by ``(dy[i], dx[i])`` whole pixels (output pixel ``(r, c)`` reads
    input ``(r - dy, c - dx)``), filling the uncovered border by reflection or with zeros. Two gathers:
    differentiable, exact (no interpolation)."""
    b, c, h, w = x.shape
    rows = torch.arange(h, device=x.device)[None, :] - dy.to(x.device)[:, None]  # [B, H]
    cols = torch.arange(w, device=x.device)[None, :] - dx.to(x.device)[:, None]  # [B, W]
    if padding == "reflect":
        rows_in, cols_in = _reflect(rows, h), _reflect(cols, w)
    else:
        rows_in, cols_in = rows.clamp(0, h - 1), cols.clamp(0, w - 1)
    out = x.gather(2, rows_in[:, None, :, None].expand(b, c, h, w))
    out = out.gather(3, cols_in[:, None, None, :].expand(b, c, h, w))
    if padding == "zeros":
        inside = ((rows >= 0) & (rows < h))[:, None, :, None] & ((cols >= 0) & (cols < w))[:, None, None, :]
        out = out * inside.to(out.dtype)
    return out


def cutout(x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Zero a ``size`` rectangle at ``(top[i], left[i])`` (may hang over the border) of each sample."""
    _, _, h, w = x.shape
    rows = torch.arange(h, device=x.device)[None, :] - top.to(x.device)[:, None]
    cols = torch.arange(w, device=x.device)[None, :] - left.to(x.device)[:, None]
    inside = ((rows >= 0) & (rows < size[0]))[:, None, :, None] & ((cols >= 0) & (cols < size[1]))[:, None, None, :]
    return x * (~inside).to(x.dtype)


def apply_params(x: torch.Tensor, params: dict[str, dict[str, torch.Tensor]],
                 padding: str = "reflect") -> torch.Tensor:
    """Apply the ops of :func:`sample_params` to ``x`` [B, C, H, W]; samples whose ``apply`` is false keep their
    values exactly (``torch.where``), so ``p = 0`` returns ``x`` unchanged."""
    for op in OPS:
        if op not in params:
            continue
        entry = params[op]
        if op == "saturation" and x.shape[1] == 1:
            continue  # a grayscale image has no saturation
        if op == "brightness":
            out = x + _per_sample(entry["shift"], x)
        elif op == "saturation":
            mean = x.mean(dim=1, keepdim=True)
            out = (x - mean) * _per_sample(entry["factor"], x) + mean
        elif op == "contrast":
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            out = (x - mean) * _per_sample(entry["factor"], x) + mean
        elif op == "translation":
            out = translate(x, entry["dy"], entry["dx"], padding)
        else:
            out = cutout(x, entry["top"], entry["left"], (int(entry["size"][0]), int(entry["size"][1])))
        x = torch.where(_per_sample(entry["apply"], x).bool(), out, x)
    return x


class DiffAugment:
    """The critic-input augmentation of a training run, with its (optionally adaptive) probability ``p``.

    Args:
        policy: comma-separated ops (``translation,cutout,brightness,contrast``; ``color`` as in DiffAugment); empty
            disables augmentation (:attr:`enabled` is false and calls return their inputs).
        p: probability that an op is applied to a sample (1: DiffAugment; the start value under ADA).
        ada_target: target of the overfitting statistic ``r_t`` (ADA uses 0.6); 0 keeps ``p`` fixed.
        ada_interval: observed critic steps between updates of ``p``.
        ada_kimg: thousands of real images it takes ``p`` to move by 1 (ADA: 500 for runs of millions of images;
            short CPU runs need a faster pace).
        translation_ratio / cutout_ratio: largest shift and cutout side as fractions of the image side.
        padding: ``reflect`` (default) or ``zeros`` for the translated border (see the module docstring).
    """

    def __init__(self, policy: str = "", p: float = 1.0, *, ada_target: float = 0.0, ada_interval: int = 4,
                 ada_kimg: float = 100.0, translation_ratio: float = 0.125, cutout_ratio: float = 0.5,
                 padding: str = "reflect") -> None:
        self.ops = parse_policy(policy)
        if not 0.0 <= p <= 1.0:
            raise DiffAugmentError(f"loss.diffaugment_p must be in [0, 1], got {p}")
        if not 0.0 <= ada_target < 1.0:
            raise DiffAugmentError(f"loss.ada_target must be in [0, 1) (0 keeps p fixed), got {ada_target}")
        if ada_interval < 1 or ada_kimg <= 0:
            raise DiffAugmentError(f"loss.ada_interval must be >= 1 and loss.ada_kimg > 0, got {ada_interval} and "
                                   f"{ada_kimg}")
        if padding not in PADDINGS:
            raise DiffAugmentError(f"unknown translation padding '{padding}'; choose {' or '.join(PADDINGS)}")
        self.p = float(p)
        self.ada_target = float(ada_target)
        self.ada_interval = int(ada_interval)
        self.ada_kimg = float(ada_kimg)
        self.translation_ratio = float(translation_ratio)
        self.cutout_ratio = float(cutout_ratio)
        self.padding = padding
        # ADA running sums since the last update of p: sum of signs, number of signs, critic steps observed.
        self._sign_sum = 0.0
        self._sign_count = 0
        self._steps = 0
        self.last_rt = float("nan")

    @classmethod
    def from_config(cls, loss_cfg: Any) -> "DiffAugment":
        """Build from the ``loss`` section of a config (``diffaugment``, ``diffaugment_p``, ``ada_*`` keys)."""
        return cls(loss_cfg.diffaugment, loss_cfg.diffaugment_p, ada_target=loss_cfg.ada_target,
                   ada_interval=loss_cfg.ada_interval, ada_kimg=loss_cfg.ada_kimg)

    @property
    def enabled(self) -> bool:
        return bool(self.ops)

    @property
    def adaptive(self) -> bool:
        return self.enabled and self.ada_target > 0

    def __call__(self, *images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Augment every tensor with one draw of per-sample parameters: sample ``i`` of each tensor gets the same
        transform. All tensors must have the same shape [B, C, H, W]."""
        if not self.enabled:
            return images
        shape = images[0].shape
        if any(t.shape != shape for t in images):
            raise DiffAugmentError(f"DiffAugment: the images of one call must have one shape, got "
                                   f"{[list(t.shape) for t in images]}")
        params = sample_params(self.ops, shape[0], shape[-2], shape[-1], self.p,
                               translation_ratio=self.translation_ratio, cutout_ratio=self.cutout_ratio)
        return tuple(apply_params(t, params, self.padding) for t in images)

    # ------------------------------------------------------------------ ADA
    def observe(self, d_real: torch.Tensor, d_fake: torch.Tensor, *, wasserstein: bool) -> dict[str, float]:
        """Record one critic step's scores; every ``ada_interval`` steps move ``p`` (no-op unless adaptive).
        Returns values to log (``augment/p``, and ``augment/rt`` at an update)."""
        if not self.enabled:
            return {}
        if not self.adaptive:
            return {"augment/p": self.p}
        with torch.no_grad():
            scores = d_real.float() - d_fake.float() if wasserstein else d_real.float()
            signs = torch.stack([scores.sign().sum(), torch.tensor(float(scores.numel()), device=scores.device)])
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(signs)  # every rank must move p the same way
        self._sign_sum += float(signs[0])
        self._sign_count += int(signs[1])
        self._steps += 1
        logs = {"augment/p": self.p}
        if self._steps >= self.ada_interval:
            rt = self._sign_sum / max(1, self._sign_count)
            step = (1.0 if rt > self.ada_target else -1.0 if rt < self.ada_target else 0.0)
            self.p = min(1.0, max(0.0, self.p + step * self._sign_count / (self.ada_kimg * 1000.0)))
            self.last_rt = rt
            self._sign_sum, self._sign_count, self._steps = 0.0, 0, 0
            logs = {"augment/p": self.p, "augment/rt": rt}
        return logs

    def state_dict(self) -> dict[str, float | int]:
        """Training state: ``p`` and the ADA sums since its last update (plain numbers, checkpoint-safe)."""
        return {"p": self.p, "sign_sum": self._sign_sum, "sign_count": self._sign_count, "steps": self._steps,
                "last_rt": self.last_rt}

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        self.p = float(state["p"])
        self._sign_sum = float(state.get("sign_sum", 0.0))
        self._sign_count = int(state.get("sign_count", 0))
        self._steps = int(state.get("steps", 0))
        self.last_rt = float(state.get("last_rt", float("nan")))
