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


def make_checkpoint(run_dir, patch_path, *, num_classes=3, steps=2, critic_classes=0):
    """A tiny conditional DAGAN trained for ``steps`` steps on the train split of ``patch_path`` (EMA on);
    ``critic_classes`` > 0 gives its critic a class head (trained with ``loss.class_weight=1``)."""
    from dagan_gn.config import ExperimentConfig
    from dagan_gn.nets.dagan import dagan_preset
    from dagan_gn.jobs.train import train

    cfg = ExperimentConfig()
    cfg.model = dataclasses.replace(cfg.model, name="dagan", **dagan_preset("tiny"))
    cfg.model.image_size, cfg.model.num_classes = SIZE, num_classes
    cfg.model.g_width, cfg.model.d_width = 8, 8
    cfg.data = dataclasses.replace(cfg.data, batch_size=4, num_workers=0, path=str(patch_path))
    cfg.optim = dataclasses.replace(cfg.optim, n_critic=1)
    if critic_classes:
        cfg.model.critic_classes = critic_classes
        cfg.loss = dataclasses.replace(cfg.loss, class_weight=1.0)
    cfg.train = dataclasses.replace(cfg.train, steps=steps, device="cpu", ema_start=0, ema_decay=0.5, log_every=1,
                                    sample_every=10_000, checkpoint_every=steps, progress=False)
    return train(cfg, run_dir)  # PatchDataset + SameClassPairDataset of the train split, as `dagan train` does


def make_omniglot_zip(path, alphabets, drawings=4, top="images_background_small1", size=105, seed=0):
    """A zip in Omniglot's layout, ``<top>/<alphabet>/characterNN/<id>_NN.png``: 1-bit PNGs of black strokes on white.

    ``alphabets`` maps alphabet name → number of characters. Each character is a random polyline; its drawings are
    jittered copies (so characters are told apart by shape, like the real thing). A character's bytes depend only on
    ``seed``, its alphabet's name and position and its number (so two zips can share an alphabet byte for byte).
    """
    import io
    import zipfile
    import zlib

    from PIL import Image, ImageDraw

    with zipfile.ZipFile(path, "w") as zf:
        for a, (alphabet, n_chars) in enumerate(alphabets.items()):
            for c in range(1, n_chars + 1):
                # One generator per character, so an alphabet is drawn alike in every zip that holds it.
                rng = np.random.default_rng([seed, zlib.crc32(alphabet.encode()), c])
                template = rng.uniform(0.2, 0.8, size=(4, 2)) * size
                for d in range(1, drawings + 1):
                    im = Image.new("1", (size, size), 1)
                    pts = template + rng.normal(0, 2.0, size=template.shape)
                    ImageDraw.Draw(im).line([tuple(p) for p in pts], fill=0, width=3)
                    buf = io.BytesIO()
                    im.save(buf, format="PNG")
                    name = f"{top}/{alphabet}/character{c:02d}/{100 * a + c:04d}_{d:02d}.png"
                    zf.writestr(zipfile.ZipInfo(name, date_time=(2017, 1, 1, 0, 0, 0)), buf.getvalue())
    return path
