"""Cadence handlers (sample grid, evaluation, checkpoint, user handlers) and the training-step state hook."""

from __future__ import annotations

import json

import pytest
from training_testutils import TinyPairs, make_cfg

from dagan_gn.training.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
from dagan_gn.training.families import FAMILIES, ImageToImageFamily, register_family
from dagan_gn.training.handlers import CheckpointHandler, Handler, SampleGridHandler
from dagan_gn.training.models import DAGANModel
from dagan_gn.training.trainer import Trainer


class _Recorder(Handler):
    def __init__(self, every, events):
        super().__init__(every)
        self.events = events

    def started(self, trainer):
        self.events.append(("started", trainer.step))

    def __call__(self, trainer):
        self.events.append(("run", trainer.step, latest_checkpoint(trainer.run_dir) is not None))

    def completed(self, trainer):
        # completed runs in reverse order: the final checkpoint already exists
        self.events.append(("completed", trainer.step, latest_checkpoint(trainer.run_dir).name))


def test_handler_order_cadence_and_grid_metric(tmp_path):
    events = []
    cfg = make_cfg("train.steps=3", "train.sample_every=2", "train.checkpoint_every=2", "optim.n_critic=1")
    trainer = Trainer(cfg, tmp_path, dataset=TinyPairs(), handlers=[_Recorder(2, events)], log=lambda m: None)
    names = [type(h).__name__ for h in trainer.handlers]
    assert names == ["SampleGridHandler", "EvaluationHandler", "_Recorder", "CheckpointHandler"]
    grid_handler = trainer.handlers[0]
    grid_handler.metrics["sources_mean"] = lambda grid: float(grid.sources.mean())  # a grid metric joins in one line
    trainer.fit()
    trainer.close()
    # runs at step 2 before that step's checkpoint is written; completes after the final one
    assert events == [("started", 0), ("run", 2, False), ("completed", 3, "step_0000003.pt")]
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == [
        "step_0000000.png", "step_0000002.png", "step_0000003.png"]
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    grid_steps = [r["step"] for r in logged if "samples/sources_mean" in r]
    assert grid_steps == [0, 2, 3]
    means = {r["samples/sources_mean"] for r in logged if "samples/sources_mean" in r}
    assert len(means) == 1  # the sources of the fixed grid never change


def test_handler_every_zero_never_runs_and_checkpoint_handler_saves_at_the_end(tmp_path):
    cfg = make_cfg("train.steps=3", "train.sample_every=0", "train.checkpoint_every=0")
    trainer = Trainer(cfg, tmp_path, dataset=TinyPairs(), log=lambda m: None)
    assert isinstance(trainer.handlers[0], SampleGridHandler) and not trainer.handlers[0].due(2)
    assert isinstance(trainer.handlers[-1], CheckpointHandler)
    trainer.fit()
    trainer.close()
    assert not (tmp_path / "samples").exists()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_0000003.pt"]


class _CountingDAGAN(DAGANModel):
    """Steps that keep their own training state (as an adaptive augmentation probability would)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.critic_calls = 0

    def critic_step(self, batch, grad_scale=1.0):
        self.critic_calls += 1
        return super().critic_step(batch, grad_scale)

    def state_dict(self):
        return {"critic_calls": self.critic_calls}

    def load_state_dict(self, state):
        self.critic_calls = int(state["critic_calls"])


def test_training_step_state_is_checkpointed_and_restored(tmp_path, monkeypatch):
    monkeypatch.setitem(FAMILIES, "dagan_counting", None)
    dagan = FAMILIES["dagan"]
    register_family(ImageToImageFamily("dagan_counting", build=dagan.build, steps=_CountingDAGAN, grid_size=2))
    cfg = make_cfg("train.steps=3", "model.name=dagan_counting")  # n_critic=2
    first = Trainer(cfg, tmp_path, dataset=TinyPairs(), log=lambda m: None)
    first.fit(stop_at=2)
    first.close()
    assert load_checkpoint(latest_checkpoint(tmp_path))["train_model"] == {"critic_calls": 4}
    resumed = Trainer(cfg, tmp_path, resume=True, dataset=TinyPairs(), log=lambda m: None)
    assert resumed.model.critic_calls == 4
    resumed.fit()
    resumed.close()
    assert resumed.model.critic_calls == 6
    assert load_checkpoint(latest_checkpoint(tmp_path))["train_model"] == {"critic_calls": 6}


def test_steps_without_state_refuse_a_checkpoint_with_state(tmp_path):
    trainer = Trainer(make_cfg("train.steps=1"), tmp_path, dataset=TinyPairs(), log=lambda m: None)
    assert trainer.model.state_dict() == {}
    trainer.model.load_state_dict({})  # nothing to restore: fine
    with pytest.raises(CheckpointError, match=r"training-step state \['ada_p'\] that DAGANModel does not keep"):
        trainer.model.load_state_dict({"ada_p": 0.1})
    trainer.close()


def test_dagan_runs_log_the_pixel_diversity_ratio_of_the_sample_grid(tmp_path):
    from dagan_gn.metrics.diversity import diversity_ratios, pixel_l1, same_class_real_pairs

    cfg = make_cfg("train.steps=2", "train.sample_every=1", "optim.n_critic=1")
    data = TinyPairs()
    trainer = Trainer(cfg, tmp_path, dataset=data, log=lambda m: None)
    metric = trainer.handlers[0].metrics["pixel_diversity_ratio"]
    grid = trainer.sample_grid()
    assert grid.source_labels is not None and len(grid.source_labels) == grid.sources.shape[0]
    # the logged value is diversity_ratios of the grid's variants on the real same-class pair scale
    reference = same_class_real_pairs(data.images, data.labels, pixel_l1, seed=cfg.train.seed)
    v = grid.variants_per_source
    expected = diversity_ratios(grid.generated.view(-1, v, *grid.sources.shape[1:]), grid.source_labels, None, None,
                                reference=reference).mean()
    assert metric(grid) == pytest.approx(float(expected), rel=1e-5)
    # copies of the sources score 0
    copies = type(grid)(grid.images, grid.nrow, grid.sources.repeat_interleave(v, dim=0), grid.sources, v,
                        grid.source_labels)
    assert metric(copies) == pytest.approx(0.0, abs=1e-7)
    trainer.fit()
    trainer.close()
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    values = [r["samples/pixel_diversity_ratio"] for r in logged if "samples/pixel_diversity_ratio" in r]
    assert len(values) == 3 and all(v >= 0 for v in values)  # steps 0, 1, 2


def test_noise_to_image_runs_have_no_grid_metric(tmp_path):
    from training_testutils import CIFAR_TINY, TinyImages

    trainer = Trainer(make_cfg("train.steps=1", "train.sample_every=1", model=CIFAR_TINY), tmp_path,
                      dataset=TinyImages(channels=3), log=lambda m: None)
    assert trainer.handlers[0].metrics == {}
    trainer.close()
