"""The seeds' argument, as a property: a WGAN-GP critic must score each sample on its own.

The gradient penalty is defined per sample, ``(‖∇_{x_i} D(x_i)‖ - 1)²``; it is only well defined when ``D(x)_i``
depends on ``x_i`` alone. With none/layer/instance/group/weight/spectral norm, ``∂D(x)_i / ∂x_j`` is exactly zero for
``i ≠ j``; batch norm in training mode couples the batch through its statistics and makes it non-zero (in eval mode,
with running statistics, it is per-sample again).
"""

import pytest
import torch

from dagan_gn.nets import DAGANCritic, DCGANCritic, ResNetCritic

INDEPENDENT = ["none", "layer", "instance", "group:4", ("group", {"num_groups": [4, 2]}), "weight", "spectral"]
B = 4


def _critics(norm):
    """(name, critic, call) for the CIFAR ResNet, DCGAN and the DAGAN pair critic, all tiny."""
    torch.manual_seed(0)
    return [
        ("cifar_resnet", ResNetCritic(width=8, norm=norm), lambda d, x: d(x), (B, 3, 32, 32)),
        ("cifar_dcgan", DCGANCritic(width=8, norm=norm), lambda d, x: d(x), (B, 3, 32, 32)),
        # The DAGAN critic scores pairs: the second image of the pair is part of the sample too.
        ("dagan", DAGANCritic(image_size=32, width=8, norm=norm), lambda d, x: d(x[:, :1], x[:, 1:]), (B, 2, 32, 32)),
        ("dagan_conditional", DAGANCritic(image_size=32, width=8, norm=norm, num_classes=3),
         lambda d, x: d(x[:, :1], x[:, 1:], torch.tensor([0, 1, 2, 0])), (B, 2, 32, 32)),
    ]


def cross_sample_jacobian(critic, call, shape):
    """``J[i, j] = ‖∂D(x)_i / ∂x_j‖₁`` computed with autograd, one backward pass per output row."""
    x = torch.randn(*shape, requires_grad=True)
    scores = call(critic, x)
    assert scores.shape == (shape[0],)
    rows = []
    for i in range(shape[0]):
        (grad,) = torch.autograd.grad(scores[i], x, retain_graph=True)
        rows.append(grad.abs().flatten(1).sum(1))
    return torch.stack(rows)


@pytest.mark.parametrize("norm", INDEPENDENT, ids=str)
def test_critic_scores_are_per_sample_independent(norm):
    for name, critic, call, shape in _critics(norm):
        critic.train()
        jac = cross_sample_jacobian(critic, call, shape)
        off_diagonal = jac[~torch.eye(shape[0], dtype=torch.bool)]
        assert torch.all(off_diagonal == 0), f"{name} with {norm}: sample scores leak across the batch"
        assert torch.all(jac.diagonal() > 0), f"{name} with {norm}: a score does not depend on its own sample"


def test_batch_norm_in_training_mode_couples_the_samples():
    for name, critic, call, shape in _critics("batch"):
        critic.train()
        jac = cross_sample_jacobian(critic, call, shape)
        off_diagonal = jac[~torch.eye(shape[0], dtype=torch.bool)]
        assert torch.all(off_diagonal > 0), f"{name}: batch norm should couple every pair of samples"


def test_batch_norm_in_eval_mode_is_per_sample_again():
    for name, critic, call, shape in _critics("batch"):
        critic.train()
        call(critic, torch.randn(*shape))  # populate running statistics
        critic.eval()
        jac = cross_sample_jacobian(critic, call, shape)
        assert torch.all(jac[~torch.eye(shape[0], dtype=torch.bool)] == 0), name


@pytest.mark.parametrize("norm", ["group:4", "layer", "instance", "batch", "spectral"])
def test_generator_output_does_not_depend_on_batch_composition_in_eval_mode(norm):
    """``augment`` regenerates a patch from its (source, noise seed): in eval mode a generated patch must be the same
    whether it was made alone or inside a batch."""
    from dagan_gn.nets import DAGANGenerator

    torch.manual_seed(0)
    g = DAGANGenerator(image_size=32, z_dim=8, width=8, norm=norm)
    g.train()
    g(torch.randn(4, 1, 32, 32), torch.randn(4, 8))  # running statistics for batch norm
    g.eval()
    x, z = torch.rand(3, 1, 32, 32) * 2 - 1, torch.randn(3, 8)
    batched = g(x, z)
    for i in range(3):
        torch.testing.assert_close(g(x[i:i + 1], z[i:i + 1]), batched[i:i + 1], atol=1e-5, rtol=1e-4)
