"""The mixed-precision path of the trainer, run on the CPU (``train.amp_on_cpu``): bf16 autocast with the gradient
penalty, fp16 with per-optimizer GradScalers (state checkpointed, resume bit-for-bit), and the fp32 default."""

from __future__ import annotations

import json
import math

import pytest
import torch
from training_testutils import CIFAR_TINY, TinyImages, TinyPairs, make_cfg

from dagan_gn.training.checkpoint import latest_checkpoint, load_checkpoint
from dagan_gn.training.trainer import Trainer


def _conv_output_dtypes(module: torch.nn.Module) -> tuple[list, list]:
    seen: list = []
    handles = [m.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
               for m in module.modules() if isinstance(m, torch.nn.Conv2d)]
    return seen, handles


@pytest.mark.parametrize("model, data", [(None, TinyPairs), (CIFAR_TINY, lambda: TinyImages(channels=3))])
def test_bf16_autocast_on_cpu_trains_with_the_penalty_in_fp32(tmp_path, model, data):
    extra = {} if model is None else {"model": model}
    cfg = make_cfg("train.steps=2", "train.amp=bf16", "train.amp_on_cpu=true", **extra)
    trainer = Trainer(cfg, tmp_path, dataset=data(), log=lambda m: None)
    assert trainer.amp_dtype == torch.bfloat16 and not trainer.scaler_d.is_enabled()
    seen, handles = _conv_output_dtypes(trainer.d_bare)
    batch = trainer.model.prepare(next(iter(trainer.data)))
    logs, _ = trainer._critic_update(batch, want_norm=False)
    for h in handles:
        h.remove()
    assert seen and set(seen) == {torch.bfloat16}  # the critic's convs ran in bf16...
    gp = logs["loss/gradient_penalty"]
    assert gp.dtype == torch.float32 and math.isfinite(gp.item())  # ...the penalty and its norm in fp32
    assert all(p.dtype == torch.float32 for p in trainer.d_bare.parameters())  # master weights stay fp32
    trainer.fit()
    trainer.close()
    assert trainer.step == 2
    state = load_checkpoint(latest_checkpoint(tmp_path))
    assert state["scaler"] == {}  # bf16 needs no scaler
    assert all(torch.isfinite(v).all() for v in state["generator"].values() if v.is_floating_point())


def test_fp16_on_cpu_uses_grad_scalers_and_resumes_bit_for_bit(tmp_path):
    cfg = make_cfg("train.steps=4", "train.amp=fp16", "train.amp_on_cpu=true", "train.checkpoint_every=2")

    def run(folder, *, resume=False, stop_at=None):
        t = Trainer(cfg, folder, resume=resume, dataset=TinyPairs(), log=lambda m: None)
        t.fit(stop_at=stop_at)
        t.close()
        return t

    straight = run(tmp_path / "a")
    assert straight.amp_dtype == torch.float16
    assert straight.scaler_d.is_enabled() and straight.scaler_g.is_enabled()
    saved = load_checkpoint(latest_checkpoint(tmp_path / "a"))["scaler"]
    assert set(saved) == {"g", "d"} and saved["d"]["scale"] > 0
    assert saved["d"]["scale"] == straight.scaler_d.get_scale()

    assert all(torch.isfinite(p).all() for p in straight.g_bare.parameters())
    run(tmp_path / "b", stop_at=2)
    resumed = run(tmp_path / "b", resume=True)
    assert resumed.step == 4
    assert resumed.scaler_d.get_scale() == straight.scaler_d.get_scale()
    for a, b in ((straight.g_bare, resumed.g_bare), (straight.d_bare, resumed.d_bare)):
        for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(pa, pb), f"{name} differs after an fp16 resume"


def test_amp_is_ignored_on_cpu_unless_asked(tmp_path):
    said = []
    trainer = Trainer(make_cfg("train.steps=1", "train.amp=bf16"), tmp_path, dataset=TinyPairs(), log=said.append)
    assert trainer.amp_dtype is None and not trainer.scaler_d.is_enabled()
    assert any("train.amp=bf16 ignored on cpu" in m and "amp_on_cpu" in m for m in said)
    trainer.close()


def test_fp16_overflowed_steps_are_skipped_not_fatal_when_logged(tmp_path):
    # fp16's first critic updates overflow (the scaled penalty is inf/NaN): the GradScaler skips them and halves its
    # scale. Logging every step must not turn those skipped steps into a "non-finite loss" failure.
    cfg = make_cfg("train.steps=3", "train.amp=fp16", "train.amp_on_cpu=true", "train.log_every=1")
    trainer = Trainer(cfg, tmp_path, dataset=TinyPairs(), log=lambda m: None)
    start_scale = trainer.scaler_d.get_scale()
    trainer.fit()
    trainer.close()
    assert trainer.step == 3
    rows = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if "amp/critic_scale" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    # The scaler did skip overflowing steps (it halved its scale) and the run went on; the weights stayed finite.
    assert rows[-1]["amp/critic_scale"] < start_scale
    assert all(r["amp/critic_step_skipped"] in (0.0, 1.0) for r in rows)
    assert all(torch.isfinite(p).all() for p in trainer.d_bare.parameters())


def test_fp16_non_finite_loss_still_stops_a_run_whose_scale_collapsed():
    from dagan_gn.training.stopping import TrainingError, finite_scalars

    logs = {"loss/critic": torch.tensor(float("nan")), "amp/critic_step_skipped": torch.tensor(1.0),
            "amp/critic_scale": torch.tensor(0.5), "amp/generator_scale": torch.tensor(2.0)}
    with pytest.raises(TrainingError, match="non-finite loss/critic at step 7"):
        finite_scalars(logs, 7)
    logs["amp/critic_scale"] = torch.tensor(1024.0)
    assert not math.isfinite(finite_scalars(logs, 7)["loss/critic"])  # a skipped step: tolerated
    logs["amp/critic_step_skipped"] = torch.tensor(0.0)
    with pytest.raises(TrainingError):
        finite_scalars(logs, 7)  # not skipped: a real divergence
