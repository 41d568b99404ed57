"""Generator EMA: copies before the start step, averages afterwards, buffers copied."""

import pytest
import torch
from torch import nn

from dagan_gn.training.ema import EMA


def test_ema_tracks_then_averages():
    net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = EMA(net, decay=0.9, start_step=2)
    assert all(not p.requires_grad for p in ema.module.parameters())
    with torch.no_grad():
        net[0].weight.fill_(1.0)
    ema.update(net, step=1)  # before start: a copy
    assert torch.equal(ema.module[0].weight, net[0].weight)
    with torch.no_grad():
        net[0].weight.fill_(2.0)
        net[1].running_mean.fill_(5.0)
    ema.update(net, step=2)  # from start: 0.9 * 1 + 0.1 * 2
    assert torch.allclose(ema.module[0].weight, torch.full((2, 2), 1.1))
    assert torch.equal(ema.module[1].running_mean, torch.full((2,), 5.0))
    state = ema.state_dict()
    other = EMA(net, decay=0.9)
    other.load_state_dict(state)
    assert torch.equal(other.module[0].weight, ema.module[0].weight)


def test_ema_rejects_bad_decay():
    with pytest.raises(ValueError, match="train.ema_decay"):
        EMA(nn.Linear(1, 1), decay=1.0)
