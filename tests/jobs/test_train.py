"""dagan_gn/jobs/train.py: train_unless_finished, the pipelines' one "train unless finished"."""

from __future__ import annotations

import pytest
from training.training_testutils import TinyPairs, make_cfg

from dagan_gn.jobs.train import train_unless_finished
from dagan_gn.training.checkpoint import checkpoint_step
from dagan_gn.training.trainer import TrainingError


def test_trains_once_continues_with_more_steps_and_refuses_another_config(tmp_path):
    cfg = make_cfg("train.steps=2", "train.checkpoint_every=1")
    first = train_unless_finished(cfg, tmp_path, dataset=TinyPairs())
    assert first.trained_here and first.resumed_from_step is None and checkpoint_step(first.checkpoint) == 2
    again = train_unless_finished(cfg, tmp_path, dataset=TinyPairs())
    assert not again.trained_here and again.checkpoint == first.checkpoint
    more = train_unless_finished(make_cfg("train.steps=3", "train.checkpoint_every=1"), tmp_path,
                                 dataset=TinyPairs())
    assert more.trained_here and more.resumed_from_step == 2 and checkpoint_step(more.checkpoint) == 3
    with pytest.raises(TrainingError, match=r"optim\.g_lr differ"):
        train_unless_finished(make_cfg("train.steps=3", "optim.g_lr=0.5"), tmp_path, dataset=TinyPairs())


def test_a_config_resolved_from_the_data_compares_resolved(tmp_path):
    cfg = make_cfg("train.steps=1", "model.critic_classes=-1", "loss.class_weight=1")
    train_unless_finished(cfg, tmp_path, dataset=TinyPairs(k=3))
    assert not train_unless_finished(cfg, tmp_path, dataset=TinyPairs(k=3)).trained_here
