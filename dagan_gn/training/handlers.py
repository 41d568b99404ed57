"""Cadence handlers: the work a training run does every so many generator steps, kept out of the loop (as MONAI's
engine handlers are).

The trainer fires three events on its handlers: ``started`` (before the first step of this call), ``step_completed``
(after every generator step, in handler order) and ``completed`` (after the loop, in *reverse* order, so the final
checkpoint is written before anything else that could fail). A handler with ``every = k`` runs ``__call__`` after
every step divisible by ``k``; ``every = 0`` turns it off. The built-in ones, in the order the trainer runs them:

* :class:`SampleGridHandler` (``train.sample_every``) — the PNG grid of the fixed inputs, plus any *grid metrics*;
* :class:`EvaluationHandler` (``metrics.eval_every``) — FID/KID through the run's evaluator, and ``best.pt``;
* :class:`CheckpointHandler` (``train.checkpoint_every``) — ``checkpoints/step_XXXXXXX.pt``, and one at the end.

A metric of the sample grid joins in one line: ``SampleGridHandler(every, metrics={"diversity": fn})`` with
``fn(grid: SampleGrid) -> float`` logs ``samples/diversity`` whenever the grid is drawn.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Mapping

if TYPE_CHECKING:  # pragma: no cover
    from dagan_gn.training.families import SampleGrid
    from dagan_gn.training.trainer import Trainer

__all__ = ["Handler", "SampleGridHandler", "EvaluationHandler", "CheckpointHandler", "GridMetric"]

#: A scalar computed from a drawn sample grid (e.g. a diversity ratio of the variants).
GridMetric = Callable[["SampleGrid"], float]


class Handler:
    """Runs :meth:`__call__` after every ``every``-th generator step (``every = 0``: never)."""

    def __init__(self, every: int) -> None:
        self.every = max(0, int(every))

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def started(self, trainer: "Trainer") -> None:
        """Before the first step of :meth:`Trainer.fit`."""

    def step_completed(self, trainer: "Trainer") -> None:
        if self.due(trainer.step):
            self(trainer)

    def completed(self, trainer: "Trainer") -> None:
        """After the loop (also after a stop request)."""

    def __call__(self, trainer: "Trainer") -> None:
        raise NotImplementedError


class SampleGridHandler(Handler):
    """Writes ``samples/step_XXXXXXX.png`` from the run's fixed grid inputs (rank 0): at step 0, every ``every``
    steps and at the last step; logs each of ``metrics`` of the grid as ``samples/<name>``."""

    def __init__(self, every: int, metrics: Mapping[str, GridMetric] | None = None) -> None:
        super().__init__(every)
        self.metrics: dict[str, GridMetric] = dict(metrics or {})

    def started(self, trainer: "Trainer") -> None:
        if self.every > 0 and trainer.step == 0:
            self(trainer)

    def completed(self, trainer: "Trainer") -> None:
        if self.every > 0 and not self.due(trainer.step):
            self(trainer)

    def __call__(self, trainer: "Trainer") -> None:
        if not trainer.is_main:
            return
        from dagan_gn.training.run_log import save_image_grid

        grid = trainer.sample_grid()
        save_image_grid(grid.images, trainer.run_dir / "samples" / f"step_{trainer.step:07d}.png", grid.nrow)
        if self.metrics:
            trainer.logger.log(trainer.step, {name: float(fn(grid)) for name, fn in self.metrics.items()},
                               prefix="samples/")


class EvaluationHandler(Handler):
    """Scores the generator with the run's evaluator (:meth:`Trainer.evaluate`) every ``every`` steps."""

    def __call__(self, trainer: "Trainer") -> None:
        trainer.evaluate()


class CheckpointHandler(Handler):
    """Checkpoints every ``every`` steps, and at the end of :meth:`Trainer.fit` unless that step is saved already
    (every rank calls it: the RNG states of all ranks are gathered)."""

    def __init__(self, every: int) -> None:
        super().__init__(every)
        self.last_saved = -1

    def started(self, trainer: "Trainer") -> None:
        self.last_saved = -1

    def __call__(self, trainer: "Trainer") -> None:
        trainer.save()
        self.last_saved = trainer.step

    def completed(self, trainer: "Trainer") -> None:
        if self.last_saved != trainer.step:
            self(trainer)
