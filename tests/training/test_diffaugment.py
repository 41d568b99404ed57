"""DiffAugment/ADA (dagan_gn/training/diffaugment.py) and the mode-seeking term (dagan_gn/training/regularizers.py):
differentiable, the same transform for every member of a pair, per-sample parameters, p = 0 is the identity,
reproducible from the RNG state, ADA moves p the right way, and a run with all of it on resumes bit for bit."""

from __future__ import annotations

import pytest
import torch
from training_testutils import TinyPairs, make_cfg

from dagan_gn.config import load_config

from dagan_gn.training.families import build_networks, get_family
from dagan_gn.training.diffaugment import (DiffAugment, DiffAugmentError, apply_params, parse_policy, sample_params,
                                           translate)
from dagan_gn.training.regularizers import (mode_seeking_penalty, mode_seeking_ratio, paired_noise_inputs,
                                           real_pair_cap)
from dagan_gn.training.trainer import Trainer

POLICY = "translation,cutout,brightness,contrast"


def _images(b=6, c=1, s=16, seed=0):
    return torch.rand(b, c, s, s, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_policy_parsing_and_errors():
    assert parse_policy("cutout, translation") == ("translation", "cutout")
    assert parse_policy("color") == ("brightness", "saturation", "contrast")
    assert parse_policy("") == ()
    with pytest.raises(DiffAugmentError, match="unknown DiffAugment op 'rotate'.*translation"):
        parse_policy("translation,rotate")
    with pytest.raises(DiffAugmentError, match="diffaugment_p"):
        DiffAugment(POLICY, p=1.5)
    assert not DiffAugment("").enabled


def test_pair_members_get_identical_transforms_and_samples_differ():
    a = _images()
    torch.manual_seed(0)
    out1, out2, out3 = DiffAugment(POLICY + ",color")(a, a.clone(), a.clone())
    assert torch.equal(out1, out2) and torch.equal(out1, out3)
    assert not torch.equal(out1, a)
    # per-sample parameters: the same image repeated over the batch comes out differently per sample
    same = a[:1].repeat(8, 1, 1, 1)
    torch.manual_seed(1)
    (aug,) = DiffAugment(POLICY)(same)
    assert len({aug[i].sum().item() for i in range(8)}) == 8


def test_p_zero_is_identity_and_draws_do_not_depend_on_p():
    a = _images(c=3)
    torch.manual_seed(3)
    (out,) = DiffAugment(POLICY + ",color", p=0.0)(a)
    assert torch.equal(out, a)
    after_p0 = torch.rand(1)
    torch.manual_seed(3)
    DiffAugment(POLICY + ",color", p=1.0)(a)
    assert torch.equal(torch.rand(1), after_p0)  # same amount of the RNG stream consumed


def test_reproducible_from_rng_state():
    a = _images()
    aug = DiffAugment(POLICY)
    state = torch.get_rng_state()
    (first,) = aug(a)
    torch.set_rng_state(state)
    (second,) = aug(a)
    assert torch.equal(first, second)


def test_gradients_reach_the_input():
    a = _images().requires_grad_(True)
    torch.manual_seed(0)
    (out,) = DiffAugment(POLICY)(a)
    (out * torch.randn_like(out)).sum().backward()
    assert a.grad is not None and a.grad.abs().sum() > 0


def test_translation_values_and_padding():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    dy, dx = torch.tensor([1]), torch.tensor([-1])
    zeros = translate(x, dy, dx, "zeros")
    # output (r, c) reads input (r - 1, c + 1); the first row and the last column are outside -> 0
    assert torch.equal(zeros[0, 0, 1:, :3], x[0, 0, :3, 1:])
    assert zeros[0, 0, 0].abs().sum() == 0 and zeros[0, 0, :, 3].abs().sum() == 0
    reflect = translate(x, dy, dx, "reflect")
    assert torch.equal(reflect[0, 0, 0, :3], x[0, 0, 1, 1:])  # row -1 reflects to row 1
    assert reflect[0, 0, 1, 3] == x[0, 0, 0, 2]  # column 4 reflects to column 2


def test_cutout_and_colour_ops_values():
    x = torch.ones(2, 1, 8, 8)
    params = sample_params(("cutout",), 2, 8, 8)
    out = apply_params(x, params)
    assert out.shape == x.shape and set(out.unique().tolist()) <= {0.0, 1.0}
    assert 0 < (out == 0).sum() <= 2 * 16  # a 4x4 square at most, per sample
    p = {"brightness": {"apply": torch.tensor([True, False]), "shift": torch.tensor([0.25, 0.25])},
         "contrast": {"apply": torch.tensor([True, True]), "factor": torch.tensor([2.0, 0.5])}}
    img = torch.stack([torch.tensor([[[-0.5, 0.5]]]), torch.tensor([[[-0.5, 0.5]]])])
    got = apply_params(img, p)
    # sample 0: +0.25 then contrast 2 about the mean 0.25; sample 1: brightness not applied, contrast 0.5 about 0
    assert torch.allclose(got[0, 0, 0], torch.tensor([-0.75, 1.25]))
    assert torch.allclose(got[1, 0, 0], torch.tensor([-0.25, 0.25]))


def test_ada_moves_p_toward_target_and_state_round_trips():
    aug = DiffAugment("translation", p=0.0, ada_target=0.6, ada_interval=2, ada_kimg=0.01)  # 10 images per unit
    separable = torch.ones(4), -torch.ones(4)  # WGAN: every real above its fake -> r_t = 1 > 0.6
    aug.observe(*separable, wasserstein=True)
    assert aug.p == 0.0  # not yet: interval 2
    logs = aug.observe(*separable, wasserstein=True)
    assert logs["augment/rt"] == 1.0 and aug.p == pytest.approx(0.8)  # 8 images / 10
    state = aug.state_dict()
    aug.observe(-torch.ones(4), torch.ones(4), wasserstein=True)
    aug.observe(-torch.ones(4), torch.ones(4), wasserstein=True)
    assert aug.p == pytest.approx(0.0)  # r_t = -1 < target: back down, clamped at 0
    fresh = DiffAugment("translation", ada_target=0.6)
    fresh.load_state_dict(state)
    assert fresh.p == pytest.approx(0.8) and fresh.state_dict() == state
    # non-Wasserstein losses use sign(D(real)) as in ADA
    ns = DiffAugment("translation", p=0.5, ada_target=0.6, ada_interval=1, ada_kimg=0.01)
    ns.observe(torch.ones(2), torch.ones(2), wasserstein=False)
    assert ns.p == pytest.approx(0.7)


def test_mode_seeking_ratio_and_penalty():
    za, zb = torch.zeros(2, 4), torch.ones(2, 4)
    fa, fb = torch.zeros(2, 1, 3, 3), torch.full((2, 1, 3, 3), 0.5)
    ratio = mode_seeking_ratio(fa, fb, za, zb)
    assert ratio.item() == pytest.approx(0.5)
    assert mode_seeking_penalty(ratio, 2.0).item() == pytest.approx(2.0 / (0.5 + 1e-5))
    # bounded variant: clipped at the cap, no push beyond it
    r = torch.tensor(0.5, requires_grad=True)
    mode_seeking_penalty(r, 1.0, cap=0.25).backward()
    assert r.grad == 0
    r2 = torch.tensor(0.1, requires_grad=True)
    capped = mode_seeking_penalty(r2, 1.0, cap=0.25)
    capped.backward()
    assert capped.item() == pytest.approx(1 / (0.1 + 1e-5)) and r2.grad < 0
    # cap = target x (source-partner distance) / noise distance
    cap = real_pair_cap(torch.zeros(2, 1, 3, 3), torch.ones(2, 1, 3, 3), za, zb * 2, target=0.5)
    assert cap.item() == pytest.approx(0.25)
    z, (x, y, none) = paired_noise_inputs(torch.randn(3, 4), torch.ones(3, 1, 2, 2), torch.tensor([0, 1, 2]), None)
    assert z.shape == (6, 4) and not torch.equal(z[:3], z[3:]) and none is None
    assert torch.equal(x[:3], x[3:]) and y.tolist() == [0, 1, 2, 0, 1, 2]


class _CopyG(torch.nn.Module):
    """A generator that ignores z: returns its input plus a trainable offset."""

    z_dim = 8

    def __init__(self) -> None:
        super().__init__()
        self.offset = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, z, y=None):
        return x + self.offset


def _dagan_model(cfg, generator=None):
    torch.manual_seed(0)
    g, d = build_networks(cfg.model)
    g = generator if generator is not None else g
    return get_family("dagan").train_steps(g, d, model_cfg=cfg.model, loss_cfg=cfg.loss), g


def _batch(n=4):
    ds = TinyPairs()
    items = [ds[i] for i in range(n)]
    return {"image": torch.stack([it["image"] for it in items]), "pair": torch.stack([it["pair"] for it in items]),
            "label": torch.tensor([it["label"] for it in items])}


def test_generator_step_gradients_flow_with_diffaugment_and_mode_seeking():
    cfg = make_cfg(f"loss.diffaugment={POLICY}", "loss.mode_seeking=1.0")
    model, g = _dagan_model(cfg)
    loss, logs = model.generator_step(_batch())
    loss.backward()
    grads = [p.grad for p in g.parameters() if p.requires_grad]
    assert all(gr is not None for gr in grads) and sum(gr.abs().sum() for gr in grads) > 0
    assert logs["loss/mode_seeking"] > 0 and logs["diversity/mode_seeking_ratio"] > 0
    # the critic step runs on augmented pairs (gradient penalty included) and logs p
    _, clogs = model.critic_step(_batch())
    assert clogs["augment/p"] == 1.0 and torch.isfinite(clogs["loss/gradient_penalty"])


def test_mode_seeking_term_is_larger_for_a_generator_that_ignores_z():
    cfg = make_cfg("loss.mode_seeking=1.0")
    torch.manual_seed(1)
    _, real_logs = _dagan_model(cfg)[0].generator_step(_batch())
    copy_model, copy_g = _dagan_model(cfg, _CopyG())
    torch.manual_seed(1)
    loss, copy_logs = copy_model.generator_step(_batch())
    assert copy_logs["diversity/mode_seeking_ratio"] == 0.0
    assert copy_logs["loss/mode_seeking"] > 100 * real_logs["loss/mode_seeking"]  # 1/eps vs 1/ratio


@pytest.mark.parametrize("target", [0.0, 1e-3])
def test_bounded_mode_seeking_caps_the_ratio_in_the_generator_step(target):
    """loss.mode_seeking_target > 0 (the bounded variant): the DAGAN's generator step clips the ratio at
    ``target · mean|x − x_other| / mean|z_a − z_b|`` (computed here from the batch and the noise G received), so the
    term is ``λ / (cap + ε)`` once the variants are that diverse; 0 leaves it unbounded."""
    cfg = make_cfg("loss.mode_seeking=1.0", f"loss.mode_seeking_target={target}")
    model, g = _dagan_model(cfg)
    seen = []
    hook = g.register_forward_pre_hook(lambda module, args: seen.append(args[1].detach().clone()))
    batch = _batch()
    try:
        _, logs = model.generator_step(batch)
    finally:
        hook.remove()
    z_a, z_b = seen[0].chunk(2)
    ratio = logs["diversity/mode_seeking_ratio"].item()
    cap = target * (batch["image"] - batch["pair"]).abs().mean().item() / (z_a - z_b).abs().mean().item()
    if target == 0:
        assert logs["loss/mode_seeking"].item() == pytest.approx(1.0 / (ratio + 1e-5), rel=1e-4)
    else:
        assert ratio > cap  # the tiny target binds
        assert logs["loss/mode_seeking"].item() == pytest.approx(1.0 / (cap + 1e-5), rel=1e-4)


def test_resume_bit_for_bit_with_diffaugment_ada_and_mode_seeking(tmp_path):
    cfg = make_cfg("train.steps=6", "data.hflip=true", f"loss.diffaugment={POLICY}", "loss.diffaugment_p=0.5",
                   "loss.ada_target=0.6", "loss.ada_interval=1", "loss.ada_kimg=0.05", "loss.mode_seeking=0.5",
                   "loss.mode_seeking_target=0.5")

    def run(out, resume=False, stop_at=None):
        t = Trainer(cfg, out, resume=resume, dataset=TinyPairs(), log=lambda m: None)
        t.fit(stop_at=stop_at)
        t.close()
        return t

    straight = run(tmp_path / "a")
    run(tmp_path / "b", stop_at=3)
    resumed = run(tmp_path / "b", resume=True)
    assert resumed.step == 6
    assert straight.model.augment.p != 0.5  # ADA moved p during the run
    assert resumed.model.augment.state_dict() == straight.model.augment.state_dict()
    for a, b in ((straight.g_bare, resumed.g_bare), (straight.d_bare, resumed.d_bare),
                 (straight.ema.module, resumed.ema.module)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    oa, ob = straight.opt_g.state_dict()["state"], resumed.opt_g.state_dict()["state"]
    assert all(torch.equal(oa[i]["exp_avg"], ob[i]["exp_avg"]) for i in oa)


def test_config_keys_exist_with_defaults():
    cfg = load_config(None)
    assert (cfg.loss.diffaugment, cfg.loss.diffaugment_p, cfg.loss.ada_target, cfg.loss.mode_seeking) == \
        ("", 1.0, 0.0, 0.0)
