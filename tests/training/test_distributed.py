"""Two-process DDP on the CPU (gloo): the gradient penalty's double backward works through DDP and both ranks hold
identical weights after training; only rank 0 writes checkpoints and logs."""

from __future__ import annotations

import os
import socket
import sys

import pytest
import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, out: str, test_dir: str) -> None:
    sys.path.insert(0, test_dir)
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    from training_testutils import TinyPairs, make_cfg

    from dagan_gn.training.trainer import Trainer

    cfg = make_cfg("train.steps=3", "train.checkpoint_every=1", "data.hflip=true")
    trainer = Trainer(cfg, os.path.join(out, f"run{rank}"), dataset=TinyPairs(n=16), log=lambda m: None)
    assert trainer.dist.world_size == world_size and trainer.dist.backend == "gloo"
    trainer.fit()
    torch.save({"g": trainer.g_bare.state_dict(), "d": trainer.d_bare.state_dict(),
                "ema": trainer.ema.module.state_dict()}, os.path.join(out, f"rank{rank}.pt"))
    trainer.close()


@pytest.mark.slow
def test_two_process_gloo_ddp_keeps_ranks_identical(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), os.path.dirname(__file__)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    initial = None
    for part in ("g", "d", "ema"):
        for k in r0[part]:
            assert torch.equal(r0[part][k], r1[part][k]), f"{part}.{k} differs between ranks"
    # training moved the weights (the ranks agree because gradients were all-reduced, not because nothing happened)
    from training_testutils import make_cfg

    from dagan_gn.training.families import build_networks

    torch.manual_seed(make_cfg().train.seed)
    initial, _ = build_networks(make_cfg().model)
    assert any(not torch.equal(initial.state_dict()[k], r0["g"][k]) for k in r0["g"] if r0["g"][k].is_floating_point())
    # rank 0 alone writes the run folder
    assert sorted(p.name for p in (tmp_path / "run0" / "checkpoints").iterdir())[-1] == "step_0000003.pt"
    assert not (tmp_path / "run1").exists()
    ckpt = torch.load(tmp_path / "run0" / "checkpoints" / "step_0000003.pt", weights_only=True)
    assert len(ckpt["rng"]["ranks"]) == 2
