"""The training loop shared by every GAN in dagan-gn (the ``train`` job, :mod:`dagan_gn.jobs.train`, runs it).

One generator step = ``optim.n_critic`` critic updates (each on a fresh batch) + one generator update (on the last
critic batch's images/labels). ``train.steps`` counts generator steps, and so do checkpoints, logs and grids.

Reproducibility: a run is a function of (config, seed). The data order is derived from (seed, epoch) and the
position inside the epoch is checkpointed; noise and flips come from the global RNGs, whose states are
checkpointed per rank; sample grids and evaluation draw from their own seeded generators. ``--resume`` therefore
continues bit for bit on the CPU (on CUDA up to cuDNN's non-determinism). Randomness inside a dataset's
``__getitem__`` running in DataLoader workers is reproducible per epoch but not across a mid-epoch resume; the
datasets of this package are deterministic per item and leave augmentation to the trainer.

What is not the loop lives beside it: the training data (the model family's ``training_dataset``, the data source of
:mod:`dagan_gn.datasets.registry`, the batches of :mod:`dagan_gn.datasets.loader`), the loss's own steps
(``GANLoss.after_critic_update``, :mod:`~dagan_gn.training.regularizers`), mixed precision
(:mod:`~dagan_gn.training.precision`), why a run stops (:mod:`~dagan_gn.training.stopping`), the resume guard
(:func:`~dagan_gn.training.checkpoint.checkpoint_to_resume`).
"""

from __future__ import annotations

import functools
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from dagan_gn.errors import DaganError
from dagan_gn.config import ExperimentConfig, save_config
from dagan_gn.datasets.loader import InfiniteBatches, check_data_fits_model, resolve_data_keys
from dagan_gn.runtime import resolve_device, seed_everything
from dagan_gn.training import distributed as dist_utils
from dagan_gn.training.checkpoint import (
    capture_rng_state,
    checkpoint_dir,
    checkpoint_path,
    checkpoint_to_resume,
    prune_checkpoints,
    restore_rng_state,
    save_checkpoint,
)
from dagan_gn.training.ema import EMA
from dagan_gn.training.families import FixedGrid, ModelFamily, SampleGrid, build_dataset, get_family
from dagan_gn.training.handlers import CheckpointHandler, EvaluationHandler, Handler, SampleGridHandler
from dagan_gn.training.identity import identity_embedding_for_run
from dagan_gn.training.losses import get_loss
from dagan_gn.training.models import GANModel
from dagan_gn.training.precision import amp_dtype, current_scale, grad_norm, scaled_step
from dagan_gn.training.regularizers import with_orthogonal_regularization
from dagan_gn.training.run_log import RunLogger, plot_loss_curves
from dagan_gn.training.stopping import StopRequests, TrainingError, finite_scalars, is_oom, out_of_memory_error

__all__ = ["TrainingError", "Trainer"]


def _check_training_config(cfg: ExperimentConfig) -> None:
    """The optimisation settings a run cannot start with (before anything is built)."""
    get_loss(cfg.loss.name)  # fail early on an unknown loss
    if cfg.optim.n_critic < 1:
        raise TrainingError(f"optim.n_critic must be >= 1, got {cfg.optim.n_critic}")
    if cfg.optim.lr_decay not in ("linear", "none"):
        raise TrainingError(f"unknown optim.lr_decay '{cfg.optim.lr_decay}'; choose linear or none")
    if cfg.train.steps < 1:
        raise TrainingError(f"train.steps must be >= 1, got {cfg.train.steps}")


# ============================================================================================ trainer
class Trainer:
    """A training run: built from an :class:`ExperimentConfig` by ``__init__`` (one small step per part: device,
    resume guard, networks, optimizers, training steps, data, handlers, restored state, run folder), run by
    :meth:`fit` (the loop: critic and generator updates, logging, then the cadence handlers of
    :mod:`dagan_gn.training.handlers`).

    Args:
        cfg: the resolved config.
        run_dir: output folder (config.yaml, checkpoints/, samples/, tensorboard/, metrics.jsonl, loss_curves.png).
        resume: continue from the newest checkpoint of ``run_dir`` (starts fresh, with a message, when there is none).
        dataset: use this Dataset instead of building one from ``cfg.data`` (tests, notebooks).
        networks: ``(generator, critic)`` instead of the family's ``build_networks(cfg.model)``.
        evaluator: a callable like ``dagan_gn.metrics.fidelity.TrainingEvaluator`` (built lazily from the config
            when ``metrics.eval_every > 0`` and none is given).
        handlers: extra :class:`~dagan_gn.training.handlers.Handler` s, run after the sample-grid and evaluation
            handlers and before the checkpoint handler (so what they change is checkpointed).
        log: where one-line status messages go (``print`` by default; rank 0 only).
    """

    def __init__(
        self,
        cfg: ExperimentConfig,
        run_dir: str | Path,
        *,
        resume: bool = False,
        dataset: Dataset | None = None,
        networks: tuple[nn.Module, nn.Module] | None = None,
        evaluator: Callable | None = None,
        handlers: Sequence[Handler] = (),
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self._print = log or (lambda msg: print(msg, file=sys.stderr))
        self.family: ModelFamily = get_family(cfg.model.name)
        _check_training_config(cfg)
        self._setup_device()
        # The data first when a config key is resolved from it (model.critic_classes=-1), so that the resume guard
        # compares resolved configs and the networks are built at their final size.
        if cfg.model.critic_classes < 0:
            dataset = dataset if dataset is not None else build_dataset(cfg)
            self.cfg = cfg = resolve_data_keys(cfg, dataset)
        self.resume_from, state = checkpoint_to_resume(self.run_dir, self.cfg, resume, self.say)
        self._build_networks(networks)
        self._build_optimizers()
        self.model: GANModel = self.family.train_steps(
            self.g_run, self.d_run, model_cfg=cfg.model, loss_cfg=cfg.loss, device=self.device,
            amp_dtype=self.amp_dtype, channels_last=cfg.train.channels_last, hflip=cfg.data.hflip,
            rotate90=cfg.data.rotate90,
            generator_ddp=self.g_ddp, critic_ddp=self.d_ddp, generator_bare=self.g_bare, critic_bare=self.d_bare,
        )
        self._build_data(dataset)
        if cfg.loss.embedding_identity > 0:
            self.model.identity_embedding = identity_embedding_for_run(cfg, self.dataset, state, self.device, self.say)
        self.fixed: FixedGrid = self.family.fixed_grid(self.g_bare, self.dataset, cfg.train.seed,
                                                       num_classes=cfg.model.num_classes,
                                                       truncation=cfg.train.truncation)
        self.evaluator = evaluator
        if self.evaluator is None and cfg.metrics.eval_every > 0 and self.is_main:
            # Built now so missing Inception weights fail before hours of training, not at the first evaluation.
            from dagan_gn.metrics.fidelity import TrainingEvaluator

            try:
                self.evaluator = TrainingEvaluator(cfg, self.device)
            except DaganError:  # InceptionWeightsUnavailable
                raise
            except ValueError as exc:  # an unknown metrics.metrics entry or metrics.feature_extractor
                raise TrainingError(f"metrics: {exc}") from exc
        grid_metrics = (self.family.grid_metrics(self.dataset, cfg.train.seed)
                        if self.is_main and cfg.train.sample_every > 0 else {})
        self.handlers: list[Handler] = [
            SampleGridHandler(cfg.train.sample_every, metrics=grid_metrics),
            EvaluationHandler(cfg.metrics.eval_every),
            *handlers,
            CheckpointHandler(cfg.train.checkpoint_every),
        ]
        self.best_fid = math.inf
        self.step = 0
        if state is not None:
            self._load_state(state)
        else:
            seed_everything(cfg.train.seed + 7919 * self.dist.rank)
        self._open_run_folder(resumed=state is not None)
        self.stops = StopRequests(self.dist, self.device, self.say)

    # ------------------------------------------------------------------ building the run
    def _setup_device(self) -> None:
        cfg = self.cfg
        device = resolve_device(cfg.train.device)
        self.dist = dist_utils.init_distributed(device)
        self.device = dist_utils.process_device(device, self.dist)
        self.is_main = self.dist.is_main
        self.amp_dtype = amp_dtype(cfg.train.amp, self.device, cfg.train.amp_on_cpu)
        if cfg.train.amp not in ("none", "") and self.amp_dtype is None and self.is_main:
            hint = " (train.amp_on_cpu=true autocasts on the CPU too)" if self.device.type == "cpu" else ""
            self.say(f"note: train.amp={cfg.train.amp} ignored on {self.device.type}; training in fp32{hint}")

    def _build_networks(self, networks: tuple[nn.Module, nn.Module] | None) -> None:
        """Bare networks on the device, the EMA copy, and the forms that run (compiled, DDP-wrapped)."""
        cfg = self.cfg
        seed_everything(cfg.train.seed)  # the same seed on every rank → the same initial weights (DDP broadcasts too)
        g_bare, d_bare = networks if networks is not None else self.family.build_networks(cfg.model)
        self.g_bare, self.d_bare = g_bare.to(self.device), d_bare.to(self.device)
        if cfg.train.channels_last:
            self.g_bare.to(memory_format=torch.channels_last)
            self.d_bare.to(memory_format=torch.channels_last)
        self.g_bare.train()
        self.d_bare.train()
        try:
            self.ema = EMA(self.g_bare, cfg.train.ema_decay, cfg.train.ema_start) if cfg.train.ema_decay > 0 else None
        except ValueError as exc:  # a decay outside (0, 1): the message names train.ema_decay
            raise TrainingError(str(exc)) from exc
        self.g_run, self.d_run = self.g_bare, self.d_bare
        if cfg.train.compile:
            self.g_run = torch.compile(self.g_bare)
            # Double backward (the gradient penalty) is not supported by torch.compile; compile D only without it.
            if not get_loss(cfg.loss.name).uses_gradient_penalty:
                self.d_run = torch.compile(self.d_bare)
        self.g_ddp = dist_utils.wrap_ddp(self.g_run, self.dist, self.device)
        self.d_ddp = dist_utils.wrap_ddp(self.d_run, self.dist, self.device)

    def _build_optimizers(self) -> None:
        cfg = self.cfg
        betas = tuple(float(b) for b in cfg.optim.betas)
        if len(betas) != 2:
            raise TrainingError(f"optim.betas must have two values, got {cfg.optim.betas}")
        self.opt_g = torch.optim.Adam(self.g_bare.parameters(), lr=cfg.optim.g_lr, betas=betas)
        self.opt_d = torch.optim.Adam(self.d_bare.parameters(), lr=cfg.optim.d_lr, betas=betas)
        fp16 = self.amp_dtype == torch.float16
        self.scaler_g = torch.amp.GradScaler(self.device.type, enabled=fp16)
        self.scaler_d = torch.amp.GradScaler(self.device.type, enabled=fp16)

    def _build_data(self, dataset: Dataset | None) -> None:
        cfg = self.cfg
        self.dataset = dataset if dataset is not None else build_dataset(cfg)
        check_data_fits_model(self.dataset, cfg, self.family.check_training_item)
        self.data = InfiniteBatches(
            self.dataset,
            cfg.data.batch_size,
            seed=cfg.train.seed,
            num_workers=cfg.data.num_workers,
            pin_memory=self.device.type == "cuda",
            rank=self.dist.rank,
            world_size=self.dist.world_size,
        )

    def _open_run_folder(self, resumed: bool) -> None:
        self.logger = RunLogger(self.run_dir, enabled=self.is_main)
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.run_dir / "config.yaml")
            if resumed:
                self.logger.truncate_after(self.step)

    # ------------------------------------------------------------------ messages
    def say(self, msg: str) -> None:
        if self.dist.is_main:
            self._print(msg)

    # ------------------------------------------------------------------ state
    def _load_state(self, state: dict[str, Any]) -> None:
        self.g_bare.load_state_dict(state["generator"])
        self.d_bare.load_state_dict(state["critic"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"] if state.get("ema") is not None else state["generator"])
        self.opt_g.load_state_dict(state["optim_g"])
        self.opt_d.load_state_dict(state["optim_d"])
        scalers = state.get("scaler") or {}
        if scalers.get("g"):
            self.scaler_g.load_state_dict(scalers["g"])
        if scalers.get("d"):
            self.scaler_d.load_state_dict(scalers["d"])
        self.model.load_state_dict(state.get("train_model") or {})
        self.step = int(state["step"])
        self.best_fid = float(state.get("best_fid", math.inf))
        if state.get("data"):
            self.data.load_state_dict(state["data"])
        rng = state.get("rng") or {}
        per_rank = rng.get("ranks") if isinstance(rng, dict) else None
        if per_rank and self.dist.rank < len(per_rank):
            restore_rng_state(per_rank[self.dist.rank])
        else:
            seed_everything(self.cfg.train.seed + 7919 * self.dist.rank + self.step)
        self.say(f"resumed {self.resume_from} at step {self.step}")

    def save(self, path: Path | None = None, *, collective: bool = True) -> Path | None:
        """Checkpoint the run. With ``collective`` every rank must call this (their RNG states are gathered) and
        rank 0 writes; ``collective=False`` (rank 0 alone, e.g. ``best.pt``) stores rank 0's RNG state only."""
        rng_states = (dist_utils.all_gather_objects(capture_rng_state(), self.dist) if collective
                      else [capture_rng_state()])
        if not self.is_main:
            return None
        path = path or checkpoint_path(self.run_dir, self.step)
        scalers = {}
        if self.scaler_g.is_enabled():
            scalers = {"g": self.scaler_g.state_dict(), "d": self.scaler_d.state_dict()}
        extra: dict[str, Any] = {"data": self.data.state_dict(), "best_fid": float(self.best_fid)}
        model_state = self.model.state_dict()
        if model_state:
            extra["train_model"] = model_state
        save_checkpoint(
            path,
            step=self.step,
            generator=self.g_bare,
            critic=self.d_bare,
            config=self.cfg,
            optim_g=self.opt_g,
            optim_d=self.opt_d,
            ema=self.ema.module if self.ema is not None else None,
            scaler=scalers,
            rng={"ranks": rng_states},
            extra=extra,
        )
        if path.name.startswith("step_"):
            prune_checkpoints(self.run_dir, self.cfg.train.keep_checkpoints)
        return path

    # ------------------------------------------------------------------ pieces of a step
    def _set_lr(self) -> float:
        frac = 1.0
        if self.cfg.optim.lr_decay == "linear":
            frac = max(0.0, 1.0 - self.step / float(self.cfg.train.steps))
        for opt, base in ((self.opt_g, self.cfg.optim.g_lr), (self.opt_d, self.cfg.optim.d_lr)):
            for group in opt.param_groups:
                group["lr"] = base * frac
        return self.cfg.optim.g_lr * frac

    def _critic_update(self, batch: dict[str, Any], want_norm: bool) -> tuple[dict[str, torch.Tensor], float]:
        self.opt_d.zero_grad(set_to_none=True)
        loss, logs = self.model.critic_step(batch, grad_scale=current_scale(self.scaler_d))
        self.scaler_d.scale(loss).backward()
        norm = 0.0
        if want_norm:
            self.scaler_d.unscale_(self.opt_d)
            norm = grad_norm(self.d_bare.parameters())
        scaled_step(self.scaler_d, self.opt_d, logs, "critic")
        self.model.loss.after_critic_update(self.d_bare, self.cfg.loss)
        return logs, norm

    def _generator_update(self, batch: dict[str, Any], want_norm: bool) -> tuple[dict[str, torch.Tensor], float]:
        self.opt_g.zero_grad(set_to_none=True)
        loss, logs = self.model.generator_step(batch)
        loss = with_orthogonal_regularization(loss, self.g_bare, self.cfg.optim.ortho_reg, logs)
        self.scaler_g.scale(loss).backward()
        norm = 0.0
        if want_norm:
            self.scaler_g.unscale_(self.opt_g)
            norm = grad_norm(self.g_bare.parameters())
        scaled_step(self.scaler_g, self.opt_g, logs, "generator")
        return logs, norm

    def train_step(self, want_norms: bool = False) -> dict[str, torch.Tensor | float]:
        """One generator step: ``optim.n_critic`` critic updates on fresh batches, then the generator update on the
        last of them, then the EMA. Returns the step's values to log, still as tensors (reading them waits for the
        device, so :meth:`fit` does it on logging steps only), with the gradient norms when ``want_norms``."""
        lr = self._set_lr()
        batch = None
        n_critic = self.cfg.optim.n_critic
        for i in range(n_critic):
            batch = self.model.prepare(next(self.data))
            d_logs, d_norm = self._critic_update(batch, want_norm=want_norms and i == n_critic - 1)
        g_logs, g_norm = self._generator_update(batch, want_norm=want_norms)
        self.step += 1
        if self.ema is not None:
            self.ema.update(self.g_bare, self.step)
        return {**d_logs, **g_logs, "grad_norm/critic": d_norm, "grad_norm/generator": g_norm, "lr": lr}

    # ------------------------------------------------------------------ sampling and evaluation
    @property
    def sampling_generator(self) -> nn.Module:
        """The generator that samples and is evaluated: the EMA copy when enabled, else the trained one."""
        return self.ema.module if self.ema is not None else self.g_bare

    def _generate_kwargs(self) -> dict[str, Any]:
        return {"device": self.device, "amp_dtype": self.amp_dtype, "channels_last": self.cfg.train.channels_last}

    def sample_grid(self) -> SampleGrid:
        """The grid of the run's fixed inputs, drawn by :attr:`sampling_generator`."""
        return self.family.sample_grid(self.sampling_generator, self.fixed, **self._generate_kwargs())

    def sample_fn(self) -> Callable[[int], torch.Tensor]:
        """``n -> n generated images in [-1, 1]`` for the evaluator, from a private RNG (no effect on training)."""
        rng = torch.Generator().manual_seed(self.cfg.train.seed + 31337)
        return functools.partial(
            self.family.sample, self.sampling_generator, rng=rng, dataset=self.dataset,
            num_classes=self.cfg.model.num_classes, truncation=self.cfg.train.truncation,
            batch_size=self.cfg.data.batch_size, **self._generate_kwargs(),
        )

    def evaluate(self) -> dict[str, float]:
        """Score :attr:`sampling_generator` with the evaluator (rank 0), log ``eval/*`` and keep ``best.pt``."""
        if not self.is_main or self.evaluator is None:
            return {}
        results = {k: float(v) for k, v in self.evaluator(self.sample_fn(), self.step).items()}
        self.logger.log(self.step, results, prefix="eval/")
        fid = results.get("fid")
        if fid is not None and math.isfinite(fid) and fid < self.best_fid:
            self.best_fid = fid
            self.save(checkpoint_dir(self.run_dir) / "best.pt", collective=False)
        return results

    def request_stop(self) -> None:
        """Ask the loop to stop after the current step (and checkpoint), as Ctrl-C/SIGTERM do."""
        self.stops.request()

    # ------------------------------------------------------------------ the loop
    def fit(self, stop_at: int | None = None) -> Path:
        """Train until ``train.steps`` (or ``stop_at``, or a stop request), checkpoint, plot; returns the run dir."""
        cfg = self.cfg
        total = cfg.train.steps
        end = min(total, stop_at) if stop_at is not None else total
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=self.step, disable=not (cfg.train.progress and self.is_main),
                   desc="train", unit="step", dynamic_ncols=True)
        self.say(
            f"training {cfg.model.name} on {self.device} ({self.dist.world_size} process(es)), "
            f"{len(self.dataset)} images, batch {cfg.data.batch_size}, steps {self.step}->{end}"
        )
        for handler in self.handlers:
            handler.started(self)
        t0, s0 = time.perf_counter(), self.step
        try:
            with self.stops.signals():
                while self.step < end:
                    log_now = cfg.train.log_every > 0 and (self.step + 1) % cfg.train.log_every == 0
                    logs = self.train_step(want_norms=log_now)
                    if log_now or self.step == end:
                        scalars = finite_scalars(logs, self.step)
                        scalars["steps_per_s"] = (self.step - s0) / max(time.perf_counter() - t0, 1e-9)
                        self.logger.log(self.step, scalars)
                        bar.set_postfix(d=f"{scalars['loss/critic']:.3f}", g=f"{scalars['loss/generator']:.3f}",
                                        refresh=False)
                    bar.update(1)
                    for handler in self.handlers:
                        handler.step_completed(self)
                    if self.stops.should_stop():
                        self.say(f"stopping at step {self.step} on request")
                        break
        except Exception as exc:
            if is_oom(exc):
                raise out_of_memory_error(self.device, cfg.data.batch_size) from exc
            raise
        finally:
            bar.close()
        for handler in reversed(self.handlers):
            handler.completed(self)
        if self.is_main:
            self.logger.flush()
            plot_loss_curves(self.run_dir / "metrics.jsonl", self.run_dir / "loss_curves.png")
        return self.run_dir

    def close(self) -> None:
        self.logger.close()
        dist_utils.cleanup_distributed(self.dist)
