"""Small shared test data factories: a patch file and a tiny trained DAGAN checkpoint (tests/ is on pythonpath)."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from dagan_gn.store.patch_file import PatchWriter, to_uint16

SIZE = 64
CLASSES = ["normal", "benign", "malignant"]


def make_patch_file(path, n_train=6, n_val=2, n_test=2, size=SIZE, channels=1, seed=0, classes=CLASSES):
    """A small real-looking patch file: smooth random patches, 2 patches per patient, train/val/test splits."""
    rng = np.random.default_rng(seed)
    n = n_train + n_val + n_test
    base = rng.random((n, channels, size // 8, size // 8)).astype(np.float32)
    imgs = torch.nn.functional.interpolate(torch.from_numpy(base), size=size, mode="bilinear").numpy()
    split = ["train"] * n_train + ["val"] * n_val + ["test"] * n_test
    labels = np.arange(n) % len(classes)
    cols = {"patient_pseudonym": "str", "image_pseudonym": "str", "view": "str", "source_index": "int32"}
    with PatchWriter(path, patch_size=size, class_names=classes, provenance=cols, channels=channels) as w:
        w.append(to_uint16(imgs), labels, split, {
            "patient_pseudonym": [f"pat{i // 2:03d}" for i in range(n)],
            "image_pseudonym": [f"img{i:03d}" for i in range(n)],
            "view": ["CC"] * n,
            "source_index": np.zeros(n, np.int32),
        })
    return path


def make_checkpoint(run_dir, patch_path, *, num_classes=3, steps=2):
    """A tiny conditional DAGAN trained for ``steps`` steps on the train split of ``patch_path`` (EMA on)."""
    from dagan_gn.config import ExperimentConfig
    from dagan_gn.nets.dagan import dagan_preset
    from dagan_gn.jobs.train import train

    cfg = ExperimentConfig()
    cfg.model = dataclasses.replace(cfg.model, name="dagan", **dagan_preset("tiny"))
    cfg.model.image_size, cfg.model.num_classes = SIZE, num_classes
    cfg.model.g_width, cfg.model.d_width = 8, 8
    cfg.data = dataclasses.replace(cfg.data, batch_size=4, num_workers=0, path=str(patch_path))
    cfg.optim = dataclasses.replace(cfg.optim, n_critic=1)
    cfg.train = dataclasses.replace(cfg.train, steps=steps, device="cpu", ema_start=0, ema_decay=0.5, log_every=1,
                                    sample_every=10_000, checkpoint_every=steps, progress=False)
    return train(cfg, run_dir)  # PatchDataset + SameClassPairDataset of the train split, as `dagan train` does
