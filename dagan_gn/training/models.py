"""Per-model training steps (mimicry style): one class per network family knows how to feed its networks.

The trainer owns optimizers, scalers, schedules and logging; a model class only turns a batch into a critic loss or a
generator loss (plus detached values to log). Which class a network family trains with, and how that family samples,
is declared once in :mod:`dagan_gn.training.families`:

* :class:`DAGANModel` — the conditional DAGAN: ``G(x, z, y) -> x'`` and a pair critic ``D(x, x_other, y)`` that
  tells a real same-class pair ``(x, x_other)`` from ``(x, G(x, z))``.
* :class:`UnconditionalGANModel` — CIFAR-10 ResNet/DCGAN: ``G(z, y) -> image``, ``D(image, y)``; class conditioning is
  used when ``model.num_classes > 0`` (fakes take the labels of the real batch, so the class mix matches the data).

Two things keep the critic steps cheap and are deliberate:

1. fakes for critic steps are generated under ``torch.no_grad()`` by the bare generator — the critic loss never needs
   gradients with respect to G's parameters (many WGAN-GP/DAGAN ports back-propagate through G here and discard it);
2. in the generator step the critic's parameters are frozen (``requires_grad=False``) so backward computes only
   the input gradients that flow into G, and the bare critic is called (no DDP all-reduce of unused gradients).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

from dagan_gn.config import LossConfig, ModelConfig
from dagan_gn.training.diffaugment import DiffAugment
from dagan_gn.training.identity import embedding_identity_loss
from dagan_gn.training.losses import WassersteinLoss, drift_penalty, get_loss, gradient_penalty
from dagan_gn.training.regularizers import (mode_seeking_penalty, mode_seeking_ratio, paired_noise_inputs,
                                           real_pair_cap)

__all__ = ["GANModel", "DAGANModel", "UnconditionalGANModel", "truncated_noise", "frozen"]


def truncated_noise(
    n: int, z_dim: int, truncation: float = 0.0, *, generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Standard normal noise ``[n, z_dim]``; with ``truncation > 0`` entries beyond ±truncation are redrawn
    (the BigGAN truncation trick). Drawn on the CPU from ``generator`` when given (reproducible grids), else on
    ``device`` from the global RNG."""
    gen_device = "cpu" if generator is not None else device
    z = torch.randn(n, z_dim, generator=generator, device=gen_device)
    if truncation and truncation > 0:
        for _ in range(100):
            bad = z.abs() > truncation
            if not bad.any():
                break
            z = torch.where(bad, torch.randn(z.shape, generator=generator, device=gen_device), z)
        z = z.clamp(-truncation, truncation)
    return z.to(device)


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Temporarily set ``requires_grad=False`` on the parameters that had it."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


class GANModel:
    """Shared plumbing: devices, autocast, channels_last, flips, the loss object.

    Args:
        generator, critic: the networks as trained (possibly ``torch.compile``-d, never DDP-wrapped); the generator
            makes the critic steps' no-grad fakes.
        generator_ddp, critic_ddp: DDP wrappers used where gradients must be all-reduced (default: the same nets).
        generator_bare, critic_bare: the plain networks (the frozen critic of the generator step).
    """

    def __init__(
        self,
        generator: nn.Module,
        critic: nn.Module,
        *,
        model_cfg: ModelConfig,
        loss_cfg: LossConfig,
        device: torch.device | str = "cpu",
        amp_dtype: torch.dtype | None = None,
        channels_last: bool = False,
        hflip: bool = False,
        rotate90: float = 0.0,
        generator_ddp: nn.Module | None = None,
        critic_ddp: nn.Module | None = None,
        generator_bare: nn.Module | None = None,
        critic_bare: nn.Module | None = None,
    ) -> None:
        self.G = generator
        self.D = critic
        self.G_ddp = generator_ddp if generator_ddp is not None else generator
        self.D_ddp = critic_ddp if critic_ddp is not None else critic
        self.G_bare = generator_bare if generator_bare is not None else generator
        self.D_bare = critic_bare if critic_bare is not None else critic
        self.model_cfg = model_cfg
        self.loss_cfg = loss_cfg
        self.loss = get_loss(loss_cfg.name)
        self.device = torch.device(device)
        self.amp_dtype = amp_dtype
        self.channels_last = channels_last
        self.hflip = hflip
        self.rotate90 = float(rotate90)
        self.conditional = model_cfg.num_classes > 0
        # Real and fake batches go through the critic in one forward of 2B samples (bigger, more efficient GEMMs,
        # one DDP forward fewer) whenever that cannot change the result: the critic's norm must treat samples
        # independently (not batch norm) and the critic must be in a mode without cross-sample statistics.
        from dagan_gn.modules.norms import is_batch_coupling

        self.fuse_real_fake = not is_batch_coupling(model_cfg.d_norm)
        self.z_dim = int(getattr(self.G_bare, "z_dim", model_cfg.z_dim))
        # Critic-input augmentation (loss.diffaugment, ADA) and the mode-seeking weight (loss.mode_seeking).
        self.augment = DiffAugment.from_config(loss_cfg)
        self.mode_seeking = float(loss_cfg.mode_seeking)
        self.mode_seeking_target = float(loss_cfg.mode_seeking_target)
        # Identity terms (DAGAN family): the critic's class head and the reconstruction at zero noise.
        self.class_weight = float(loss_cfg.class_weight)
        self.reconstruction = float(loss_cfg.reconstruction)
        self.embedding_identity = float(loss_cfg.embedding_identity)
        #: The frozen identity embedding (:mod:`dagan_gn.training.identity`), set by the trainer when
        #: ``loss.embedding_identity > 0``; its weights are part of :meth:`state_dict`.
        self.identity_embedding: nn.Module | None = None

    # ------------------------------------------------------------------ helpers
    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _flip(self, x: torch.Tensor) -> torch.Tensor:
        """Random horizontal flip per sample (drawn from the global RNG on the CPU, so resumes reproduce it)."""
        mask = torch.rand(x.shape[0]) < 0.5
        if not mask.any():
            return x
        mask = mask.to(x.device).view(-1, *([1] * (x.dim() - 1)))
        return torch.where(mask, x.flip(-1), x)

    def _rotations(self, n: int) -> torch.Tensor | None:
        """Quarter turns per sample for ``data.rotate90 = p``: 0 with probability ``1 - p``, else 1, 2 or 3 (drawn
        from the global RNG on the CPU, so resumes reproduce them); None when rotation is off."""
        if self.rotate90 <= 0:
            return None
        turn = torch.rand(n) < self.rotate90
        k = torch.randint(1, 4, (n,))
        return torch.where(turn, k, torch.zeros_like(k))

    @staticmethod
    def _rotate(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Sample ``i`` of ``x`` [B, C, S, S] rotated by ``k[i]`` quarter turns."""
        out = x
        for turns in (1, 2, 3):
            mask = (k == turns).view(-1, *([1] * (x.dim() - 1)))
            if mask.any():
                out = torch.where(mask, torch.rot90(x, turns, dims=(-2, -1)), out)
        return out

    def prepare(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Move a collated batch to the device (flip images when ``data.hflip``; rotate both images of a pair by the
        same quarter turns when ``data.rotate90``)."""
        out = dict(batch)
        turns = self._rotations(out["image"].shape[0]) if "image" in out else None
        for key in ("image", "pair"):
            if key in out:
                x = out[key]
                if self.hflip:
                    x = self._flip(x)
                if turns is not None:
                    x = self._rotate(x, turns)
                out[key] = self._to_device(x)
        if "label" in out and isinstance(out["label"], torch.Tensor):
            out["label"] = out["label"].to(self.device, non_blocking=True).long()
        return out

    def labels(self, batch: dict[str, Any]) -> torch.Tensor | None:
        return batch["label"] if self.conditional else None

    def noise(self, n: int) -> torch.Tensor:
        return torch.randn(n, self.z_dim, device=self.device)

    def augmented(self, *images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """DiffAugment of critic inputs (one draw: sample ``i`` of every image gets the same transform), in the
        critic's memory format; the inputs themselves when ``loss.diffaugment`` is empty."""
        if not self.augment.enabled:
            return images
        out = self.augment(*images)
        if self.channels_last:
            out = tuple(t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t for t in out)
        return out

    def observe_critic(self, d_real: torch.Tensor, d_fake: torch.Tensor) -> dict[str, float]:
        """Feed a critic step's scores to ADA (moves ``p`` when ``loss.ada_target > 0``); values to log."""
        return self.augment.observe(d_real, d_fake, wasserstein=isinstance(self.loss, WassersteinLoss))

    def _generator_objective(self, d_fake: torch.Tensor, fake: torch.Tensor, z: torch.Tensor,
                             cap: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The generator loss, plus ``λ / (ratio + ε)`` when ``loss.mode_seeking = λ > 0`` (then the halves of
        ``fake`` are two variants of the same inputs, from
        :func:`~dagan_gn.training.regularizers.paired_noise_inputs`); ``cap`` bounds the ratio (the bounded
        variant)."""
        loss = self.loss.generator_loss(d_fake)
        logs: dict[str, torch.Tensor] = {}
        if self.mode_seeking > 0:
            logs["loss/generator_adversarial"] = loss.detach()
            ratio = mode_seeking_ratio(*fake.chunk(2), *z.chunk(2))
            term = mode_seeking_penalty(ratio, self.mode_seeking, cap=cap)
            loss = loss + term
            logs.update({"loss/mode_seeking": term.detach(), "diversity/mode_seeking_ratio": ratio.detach()})
        logs["loss/generator"] = loss.detach()
        return loss, logs

    def state_dict(self) -> dict[str, Any]:
        """Training state of the steps themselves, checkpointed by the trainer as ``train_model``: the adaptive
        augmentation's probability and sign statistics (only ADA moves; fixed DiffAugment has nothing to keep)."""
        state: dict[str, Any] = {"diffaugment": self.augment.state_dict()} if self.augment.adaptive else {}
        if self.identity_embedding is not None:
            state["identity_embedding"] = self.identity_embedding.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (a checkpoint's ``train_model`` entry)."""
        unknown = sorted(set(state) - {"diffaugment", "identity_embedding"})
        if unknown:
            from dagan_gn.training.checkpoint import CheckpointError

            raise CheckpointError(
                f"the checkpoint holds training-step state {unknown} that {type(self).__name__} does not keep"
            )
        if state.get("diffaugment"):
            self.augment.load_state_dict(state["diffaugment"])
        if state.get("identity_embedding") is not None and self.identity_embedding is not None:
            self.identity_embedding.load_state_dict(state["identity_embedding"])

    def critic_fake(self, *generator_inputs: torch.Tensor | None) -> torch.Tensor:
        """Fakes for a critic step: the generator under ``no_grad`` (the critic loss needs no gradient with respect to
        G) without its DDP wrapper (nothing to all-reduce), compiled when ``train.compile``, in the critic's memory
        format."""
        with torch.no_grad(), self.autocast():
            fake = self.G(*generator_inputs)
        fake = fake.detach()
        if self.channels_last and fake.dim() == 4:
            fake = fake.contiguous(memory_format=torch.channels_last)
        return fake

    def critic_scores(
        self, real: tuple[torch.Tensor, ...], fake: tuple[torch.Tensor, ...], y: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(D(*real, y), D(*fake, y))`` under autocast: one critic forward of 2B samples when
        ``fuse_real_fake``, two forwards otherwise."""
        with self.autocast():
            if self.fuse_real_fake:
                yy = None if y is None else torch.cat([y, y])
                d_real, d_fake = self.D_ddp(*(torch.cat([r, f]) for r, f in zip(real, fake)), yy).chunk(2)
                return d_real, d_fake
            return self.D_ddp(*real, y), self.D_ddp(*fake, y)

    def _critic_objective(
        self, d_real: torch.Tensor, d_fake: torch.Tensor, critic_fn, real, fake, grad_scale: float
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = self.loss.critic_loss(d_real, d_fake)
        logs = {
            "loss/critic_adversarial": loss.detach(),
            "critic/real": d_real.detach().float().mean(),
            "critic/fake": d_fake.detach().float().mean(),
            "wasserstein_estimate": (d_real.detach().float().mean() - d_fake.detach().float().mean()),
        }
        if self.loss.uses_gradient_penalty and self.loss_cfg.gp_weight > 0:
            gp, gnorm = gradient_penalty(
                critic_fn, real, fake, center=self.loss_cfg.gp_center, one_sided=self.loss_cfg.gp_one_sided,
                grad_scale=grad_scale,
            )
            loss = loss + self.loss_cfg.gp_weight * gp
            logs["loss/gradient_penalty"] = gp.detach()
            logs["critic/interp_grad_norm"] = gnorm.mean()
        if self.loss_cfg.drift > 0:
            drift = drift_penalty(d_real)
            loss = loss + self.loss_cfg.drift * drift
            logs["loss/drift"] = drift.detach()
        logs["loss/critic"] = loss.detach()
        return loss, logs

    # ------------------------------------------------------------------ interface
    def critic_step(
        self, batch: dict[str, Any], grad_scale: float = 1.0
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def generator_step(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError


class DAGANModel(GANModel):
    """Conditional DAGAN (Antoniou et al. 2017) with a pair critic, plus the optional identity terms of the later
    few-shot generators (FUNIT, LoFGAN, F2GAN, MatchingGAN):

    * ``loss.class_weight`` — the critic's auxiliary class head over the *training* classes
      (``model.critic_classes``): cross-entropy on real images for the critic, and on each variant with its
      source's class for the generator. The head reads the self-pair ``(v, v)`` of an image, so a pair's source can
      never give the answer away; the generator itself stays class-unconditional.
    * ``loss.reconstruction`` — ``L1(G(x, z=0), x)``: at zero noise the generator returns its source.
    * ``loss.embedding_identity`` — ``1 − cos(e(G(x, z)), e(x))`` in a frozen embedding ``e`` trained on the training
      classes before the GAN (:mod:`dagan_gn.training.identity`).

    Both ride in the forwards the steps already make (self-pairs join the critic batch, the zero-noise sources join
    the generator batch), so they cost extra rows, not extra passes.
    """

    def critic_outputs(
        self, pairs: list[tuple[torch.Tensor, torch.Tensor]], y: torch.Tensor | None, classify: torch.Tensor,
        critic: nn.Module | None = None,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Scores of each ``(a, b)`` pair batch and the class logits of the images ``classify`` (read as self-pairs),
        under autocast: one forward of ``critic`` (default the critic as trained; the generator step passes the frozen
        bare one) when ``fuse_real_fake`` (per-sample critic norms), else one per group. Every group has the rows of
        ``y`` (the class conditioning of a conditional critic, or None)."""
        critic = self.D_ddp if critic is None else critic
        groups = [*pairs, (classify, classify)]
        with self.autocast():
            if self.fuse_real_fake:
                yy = None if y is None else torch.cat([y] * len(groups))
                scores, logits = critic(torch.cat([a for a, _ in groups]), torch.cat([b for _, b in groups]), yy,
                                        with_logits=True)
                *scores, _ = scores.chunk(len(groups))
                return list(scores), logits.chunk(len(groups))[-1]
            scores = [critic(a, b, y) for a, b in pairs]
            _, logits = critic(classify, classify, y, with_logits=True)
            return scores, logits

    def _class_terms(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy (fp32) of the class head against ``labels`` repeated to the rows of ``logits``, and the
        detached accuracy."""
        labels = labels.repeat(logits.shape[0] // labels.shape[0])
        accuracy = (logits.detach().argmax(1) == labels).float().mean()
        return nn.functional.cross_entropy(logits.float(), labels), accuracy

    def critic_step(self, batch, grad_scale: float = 1.0):
        x, x_other, y = batch["image"], batch["pair"], self.labels(batch)
        fake = self.critic_fake(x, self.noise(x.shape[0]), y)
        # One augmentation draw for the three images: both pairs hold the same augmented source (the penalty keeps
        # it fixed and interpolates the augmented partners).
        x, x_other, fake = self.augmented(x, x_other, fake)
        logits = None
        if self.class_weight > 0:
            (d_real, d_fake), logits = self.critic_outputs([(x, x_other), (x, fake)], y, classify=x_other)
        else:
            d_real, d_fake = self.critic_scores((x, x_other), (x, fake), y)

        def critic_fn(a, b):
            with self.autocast():
                return self.D_ddp(a, b, y)

        loss, logs = self._critic_objective(d_real, d_fake, critic_fn, (x, x_other), (x, fake), grad_scale)
        if logits is not None:
            class_loss, accuracy = self._class_terms(logits, batch["label"])
            loss = loss + self.class_weight * class_loss
            logs["loss/critic_class"] = class_loss.detach()
            logs["critic/class_accuracy_real"] = accuracy
            logs["loss/critic"] = loss.detach()
        logs.update(self.observe_critic(d_real, d_fake))
        return loss, logs

    def generator_step(self, batch):
        x, y = batch["image"], self.labels(batch)
        source, source_y = x, y
        z = self.noise(x.shape[0])
        cap = None
        if self.mode_seeking > 0:
            z, (x, y) = paired_noise_inputs(z, source, y)  # two variants per source in one forward
            if self.mode_seeking_target > 0:
                cap = real_pair_cap(source, batch["pair"], *z.chunk(2), self.mode_seeking_target)
        n_variants = x.shape[0]
        g_x, g_z, g_y = x, z, y
        if self.reconstruction > 0:  # the sources at zero noise join the same generator forward
            g_x, g_z = torch.cat([x, source]), torch.cat([z, torch.zeros_like(z[: source.shape[0]])])
            g_y = None if y is None else torch.cat([y, source_y])
        logits = None
        with frozen(self.D_bare), self.autocast():
            out = self.G_ddp(g_x, g_z, g_y)
            fake, recon = out[:n_variants], out[n_variants:]
            pair_source, pair_fake = self.augmented(x, fake)
            if self.class_weight > 0:
                (d_fake,), logits = self.critic_outputs([(pair_source, pair_fake)], y, classify=pair_fake,
                                                        critic=self.D_bare)
            else:
                d_fake = self.D_bare(pair_source, pair_fake, y)
        loss, logs = self._generator_objective(d_fake, fake, z, cap)
        if logits is not None:
            class_loss, accuracy = self._class_terms(logits, batch["label"])
            loss = loss + self.class_weight * class_loss
            logs["loss/generator_class"] = class_loss.detach()
            logs["identity/variant_class_accuracy"] = accuracy
        if self.embedding_identity > 0:
            if self.identity_embedding is None:
                raise RuntimeError("loss.embedding_identity > 0 but no identity embedding was set (the trainer sets it)")
            with self.autocast():
                identity_loss = embedding_identity_loss(self.identity_embedding, fake, source)
            loss = loss + self.embedding_identity * identity_loss
            logs["loss/embedding_identity"] = identity_loss.detach()
        if self.reconstruction > 0:
            recon_loss = (recon.float() - source.float()).abs().mean()
            loss = loss + self.reconstruction * recon_loss
            logs["loss/reconstruction"] = recon_loss.detach()
        if logits is not None or self.reconstruction > 0 or self.embedding_identity > 0:
            logs["loss/generator"] = loss.detach()
        return loss, logs


class UnconditionalGANModel(GANModel):
    """Noise-to-image GANs (CIFAR-10 ResNet/DCGAN), optionally class-conditional."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.class_weight > 0 or self.reconstruction > 0 or self.embedding_identity > 0:
            from dagan_gn.config import ConfigError

            raise ConfigError("loss.class_weight, loss.reconstruction and loss.embedding_identity are identity terms of "
                              "an image-to-image (DAGAN) model: a noise-to-image GAN has no source image to keep")

    def critic_step(self, batch, grad_scale: float = 1.0):
        real, y = batch["image"], self.labels(batch)
        fake = self.critic_fake(self.noise(real.shape[0]), y)
        (real,), (fake,) = self.augmented(real), self.augmented(fake)  # unpaired images: independent draws
        d_real, d_fake = self.critic_scores((real,), (fake,), y)

        def critic_fn(a):
            with self.autocast():
                return self.D_ddp(a, y)

        loss, logs = self._critic_objective(d_real, d_fake, critic_fn, real, fake, grad_scale)
        logs.update(self.observe_critic(d_real, d_fake))
        return loss, logs

    def generator_step(self, batch):
        y = self.labels(batch)
        n = batch["image"].shape[0]
        z = self.noise(n)
        if self.mode_seeking > 0:
            z, (y,) = paired_noise_inputs(z, y)
        with frozen(self.D_bare), self.autocast():
            fake = self.G_ddp(z, y)
            d_fake = self.D_bare(*self.augmented(fake), y)
        return self._generator_objective(d_fake, fake, z)
