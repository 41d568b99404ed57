"""Losses registry values and the WGAN-GP gradient penalty (per-sample α, hand-computed values, tuples, AMP)."""

import math

import pytest
import torch

from dagan_gn.training.losses import LOSSES, LossError, drift_penalty, get_loss, gradient_penalty


def test_registry_names():
    assert set(LOSSES) == {"wgan-gp", "wgan-clip", "hinge", "ns"}
    assert get_loss("wgan-gp").uses_gradient_penalty and not get_loss("wgan-gp").clips_weights
    assert get_loss("wgan-clip").clips_weights and not get_loss("wgan-clip").uses_gradient_penalty
    with pytest.raises(LossError, match="unknown loss 'lsgan'.*wgan-gp"):
        get_loss("lsgan")


def test_loss_values_on_known_inputs():
    d_real = torch.tensor([2.0, 0.0])
    d_fake = torch.tensor([-1.0, 3.0])
    w = get_loss("wgan-gp")
    assert w.critic_loss(d_real, d_fake).item() == pytest.approx(1.0 - 1.0)  # mean(fake)=1, mean(real)=1
    assert w.generator_loss(d_fake).item() == pytest.approx(-1.0)
    h = get_loss("hinge")
    # relu(1-2)=0, relu(1-0)=1 -> 0.5 ; relu(1-1)=0, relu(1+3)=4 -> 2
    assert h.critic_loss(d_real, d_fake).item() == pytest.approx(2.5)
    assert h.generator_loss(d_fake).item() == pytest.approx(-1.0)
    ns = get_loss("ns")
    sp = lambda v: math.log1p(math.exp(v))  # noqa: E731
    expected_d = (sp(-2.0) + sp(0.0)) / 2 + (sp(-1.0) + sp(3.0)) / 2
    assert ns.critic_loss(d_real, d_fake).item() == pytest.approx(expected_d, rel=1e-6)
    assert ns.generator_loss(d_fake).item() == pytest.approx((sp(1.0) + sp(-3.0)) / 2, rel=1e-6)
    assert drift_penalty(torch.tensor([1.0, 3.0])).item() == pytest.approx(5.0)


def test_gp_linear_critic_equals_hand_computed():
    torch.manual_seed(0)
    w = torch.randn(1, 3, 4, 4)

    def critic(x):
        return (x * w).flatten(1).sum(1)

    real, fake = torch.randn(5, 3, 4, 4), torch.randn(5, 3, 4, 4)
    gp, norms = gradient_penalty(critic, real, fake)
    wn = w.norm().item()
    assert torch.allclose(norms, torch.full((5,), wn))
    assert gp.item() == pytest.approx((wn - 1.0) ** 2, rel=1e-5)
    gp0, _ = gradient_penalty(critic, real, fake, center=0.0)
    assert gp0.item() == pytest.approx(wn**2, rel=1e-5)
    # one-sided: a critic with gradient norm below 1 is not penalised
    small = lambda x: critic(x) * (0.5 / wn)  # noqa: E731
    assert gradient_penalty(small, real, fake, one_sided=True)[0].item() == pytest.approx(0.0, abs=1e-10)
    assert gradient_penalty(small, real, fake)[0].item() == pytest.approx(0.25, rel=1e-5)


def test_gp_alpha_is_per_sample_and_norm_over_flattened_sample():
    seen = {}

    def critic(x):
        seen["x"] = x
        return 0.5 * (x**2).flatten(1).sum(1)  # gradient = x itself

    real, fake = torch.ones(6, 2, 3, 3), torch.zeros(6, 2, 3, 3)
    gp, norms = gradient_penalty(critic, real, fake)
    x_hat = seen["x"].detach()
    alpha = x_hat[:, 0, 0, 0]
    # one α per sample, shared by every channel and pixel of that sample...
    assert torch.equal(x_hat, alpha.view(6, 1, 1, 1).expand_as(x_hat))
    # ...and different between samples
    assert alpha.unique().numel() == 6
    # norm over the whole flattened sample: ||α·1|| = α·sqrt(18)
    assert torch.allclose(norms, alpha * math.sqrt(18), atol=1e-6)
    assert gp.item() == pytest.approx(((alpha * math.sqrt(18) - 1) ** 2).mean().item(), rel=1e-5)


def test_gp_explicit_alpha_and_create_graph():
    w = torch.randn(1, 1, 2, 2, requires_grad=True)

    def critic(x):
        return (x * w).flatten(1).sum(1)

    gp, _ = gradient_penalty(critic, torch.randn(3, 1, 2, 2), torch.randn(3, 1, 2, 2), alpha=torch.tensor([0, .5, 1]))
    gp.backward()  # differentiable w.r.t. critic parameters (create_graph=True)
    expected = 2 * (w.norm() - 1) * w / w.norm()
    assert torch.allclose(w.grad, expected.detach(), atol=1e-5)


def test_gp_tuple_keeps_conditioning_fixed():
    x = torch.randn(4, 1, 4, 4)
    x_other, x_fake = torch.randn(4, 1, 4, 4), torch.randn(4, 1, 4, 4)
    seen = {}

    def critic(a, b):
        seen["a"], seen["b"] = a, b
        return (a * b).flatten(1).sum(1)  # d/db = a

    gp, norms = gradient_penalty(critic, (x, x_other), (x, x_fake))
    assert seen["a"] is x and not seen["a"].requires_grad
    assert seen["b"].requires_grad
    assert torch.allclose(norms, x.flatten(1).norm(dim=1), atol=1e-5)
    with pytest.raises(LossError):
        gradient_penalty(critic, (x, x), (x, x))


def test_gp_fp32_under_autocast_and_grad_scale():
    conv = torch.nn.Conv2d(3, 1, 4)

    def critic(x):
        return conv(x).flatten(1).sum(1)

    real, fake = torch.randn(4, 3, 4, 4), torch.randn(4, 3, 4, 4)
    alpha = torch.rand(4)
    ref, ref_norm = gradient_penalty(critic, real, fake, alpha=alpha)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gp, norm = gradient_penalty(critic, real, fake, alpha=alpha)
    assert gp.dtype == torch.float32 and norm.dtype == torch.float32
    assert gp.item() == pytest.approx(ref.item(), rel=5e-2)
    scaled, scaled_norm = gradient_penalty(critic, real, fake, alpha=alpha, grad_scale=1024.0)
    assert torch.allclose(scaled_norm, ref_norm, rtol=1e-5)
    assert scaled.item() == pytest.approx(ref.item(), rel=1e-5)


def test_after_critic_update_clips_only_for_weight_clipping_losses():
    from types import SimpleNamespace

    critic = torch.nn.Linear(4, 3)
    with torch.no_grad():
        critic.weight.fill_(0.5)
    get_loss("wgan-gp").after_critic_update(critic, SimpleNamespace(clip_value=0.01))
    assert critic.weight.max().item() == 0.5  # nothing for a gradient-penalty loss
    get_loss("wgan-clip").after_critic_update(critic, SimpleNamespace(clip_value=0.01))
    assert critic.weight.abs().max().item() <= 0.01 and critic.bias.abs().max().item() <= 0.01


def test_orthogonal_regularization_is_zero_for_orthogonal_rows_and_added_with_its_weight():
    from dagan_gn.training.regularizers import orthogonal_regularization, with_orthogonal_regularization

    lin = torch.nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(3) * 2)
    assert orthogonal_regularization(lin).item() == 0.0
    with torch.no_grad():
        lin.weight.fill_(1.0)  # W Wᵀ = all 3: six off-diagonal entries of 9
    assert orthogonal_regularization(lin).item() == pytest.approx(54.0)
    logs: dict = {}
    loss = torch.tensor(1.0)
    assert with_orthogonal_regularization(loss, lin, 0.0, logs) is loss and not logs
    assert with_orthogonal_regularization(loss, lin, 0.5, logs).item() == pytest.approx(28.0)
    assert logs["loss/orthogonal_reg"].item() == pytest.approx(54.0)
