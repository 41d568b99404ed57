"""The ``augment`` job's records (:mod:`dagan_gn.jobs.augment`): the request (its options and their checks), the
selected sources and the plan; and the job's error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from dagan_gn.errors import DaganError

if TYPE_CHECKING:  # imported lazily at run time: `dagan augment -h` stays fast
    from dagan_gn.config import ExperimentConfig
    from dagan_gn.training.families import ModelFamily

__all__ = ["AugmentError", "AugmentPlan", "AugmentRequest", "CARRIED_COLUMNS", "EVAL_SPLITS", "SourceSelection"]

#: Provenance columns copied from the source patch to each of its variants, when the input file has them.
CARRIED_COLUMNS: tuple[str, ...] = ("patient_pseudonym", "image_pseudonym", "laterality", "view")
#: Splits that are never augmented unless explicitly allowed (evaluation must not leak into training data).
EVAL_SPLITS: frozenset[str] = frozenset({"val", "test"})


class AugmentError(DaganError, ValueError):
    """An augment request that cannot be carried out; the message names the file and the problem."""


@dataclass(frozen=True)
class AugmentRequest:
    """The arguments of one augment job (see :func:`augment` for their meaning)."""

    in_path: Path
    checkpoint: Path
    out_path: Path
    n: int = 10
    split: str = "train"
    classes: tuple[str, ...] = ()
    truncation: float = 0.0
    batch_size: int = 32
    device: str = "auto"
    seed: int = 0
    contact_sheet: Path | None = None
    contact_sheet_rows: int = 8
    allow_eval_split: bool = False
    overwrite: bool = False
    progress: bool = True
    commit_seconds: float = 1.0
    commit_batches: int = 0
    reject_off_class: bool = False

    def check(self) -> None:
        """Refuse impossible arguments before any work: numbers out of range, an evaluation split, the input as
        output, and outputs that cannot be written (so an unwritable ``--contact-sheet`` fails now, not at the end).

        Raises:
            AugmentError: the message names the option.
        """
        from dagan_gn.fileio import OutputError, check_writable

        if self.n < 1:
            raise AugmentError(f"--n must be at least 1, got {self.n}")
        if self.batch_size < 1:
            raise AugmentError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.truncation < 0:
            raise AugmentError(f"--truncation must be >= 0, got {self.truncation}")
        if self.split in EVAL_SPLITS and not self.allow_eval_split:
            raise AugmentError(
                f"refusing to augment the {self.split!r} split: synthetic variants of evaluation patches would leak "
                "into training. Augment 'train' (the default), or pass --allow-eval-split if you really mean it"
            )
        if self.out_path.resolve() == self.in_path.resolve():
            raise AugmentError(f"--out {self.out_path} is the input file; choose another output path")
        try:
            check_writable(self.out_path, "--out")
            if self.contact_sheet is not None:
                check_writable(self.contact_sheet, "--contact-sheet")
        except OutputError as exc:
            raise AugmentError(str(exc)) from exc


@dataclass(frozen=True)
class SourceSelection:
    """The input rows to augment and what the output needs to know about them."""

    #: Rows of the input file, in output order.
    rows: np.ndarray
    #: Label indices (into ``class_names``) that are augmented.
    wanted: list[int]
    class_names: list[str]
    split_code: int
    #: ``CARRIED_COLUMNS`` the input has.
    carried: list[str]


@dataclass
class AugmentPlan:
    """Everything :func:`run_augment` needs, resolved and checked (the checkpoint is loaded once, here)."""

    request: AugmentRequest
    sources: SourceSelection
    generator: nn.Module
    generator_config: ExperimentConfig
    device: torch.device
    checkpoint: Path
    checkpoint_sha256: str
    checkpoint_step: int
    used_ema: bool
    #: Input label → the generator's label (conditional generators), or None.
    label_map: dict[int, int] | None
    #: The ``parameters`` attribute of the output: what determines its content (not batch size or device).
    parameters: dict[str, Any]
    #: The output exists, complete, from these same parameters: nothing to generate.
    complete: bool = False
    notes: list[str] = field(default_factory=list)
    #: ``reject_off_class``: the checkpoint's critic (its class head reads a variant as the self-pair ``(v, v)``).
    critic: nn.Module | None = None

    @property
    def family(self) -> "ModelFamily":
        """The generator's model family (its one generator forward)."""
        from dagan_gn.training.families import get_family

        return get_family(self.generator_config.model.name)

    @property
    def n_written(self) -> int:
        return len(self.sources.rows) * self.request.n
