"""The data-source registry: a registered kind trains (and gives FID reference images) with nothing else changed,
an unknown kind is one clear error, and the built-in kinds are registered."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from training.training_testutils import TinyImages, make_cfg

from dagan_gn.datasets.loader import LabelledPairs
from dagan_gn.datasets.registry import (
    DATA_SOURCES,
    DataError,
    get_data_source,
    register_data_source,
    unregister_data_source,
)
from dagan_gn.errors import DaganError
from dagan_gn.training.families import build_dataset
from dagan_gn.training.trainer import Trainer


@pytest.fixture
def toy_source():
    seen = []

    def training(cfg):
        seen.append(cfg.data.path)
        return TinyImages(n=12, size=32, k=3)

    register_data_source("toy", training=training, description="12 random images, 3 classes")
    try:
        yield seen
    finally:
        unregister_data_source("toy")


def test_the_built_in_kinds_are_registered():
    assert {"patches", "cifar10", "image_folder"} <= set(DATA_SOURCES)
    assert all(source.description for source in DATA_SOURCES.values())


def test_a_registered_source_trains_a_couple_of_steps(tmp_path, toy_source):
    cfg = make_cfg("data.kind=toy", f"data.path={tmp_path}", "train.steps=2")
    trainer = Trainer(cfg, tmp_path / "run", log=lambda m: None)
    assert toy_source == [str(tmp_path)]
    assert isinstance(trainer.dataset, LabelledPairs)  # the DAGAN family pairs any labelled source
    item = trainer.dataset[4]
    assert item["label"] == 4 % 3 and "pair" in item and trainer.dataset.labels[item["pair_index"]] == 4 % 3
    trainer.fit()
    trainer.close()
    assert trainer.step == 2
    # ... and `dagan evaluate` scores the run on the same source (its own data.kind, no splits: the training images)
    from dagan_gn.jobs.evaluate import evaluate_checkpoint

    result = evaluate_checkpoint(tmp_path / "run", metrics=["kid", "recon"], num_samples=8, kid_subset_size=4,
                                 feature_extractor="tiny", device="cpu", seed=0)
    assert result["split"] == "train" and result["n_reference"] == 8 and np.isfinite(result["kid_mean"])
    assert "recon_unavailable" in result
    assert toy_source[-1] == str(tmp_path)
    with pytest.raises(DataError, match="no splits to read 'test'"):
        evaluate_checkpoint(tmp_path / "run", metrics=["kid"], split="test", num_samples=8, feature_extractor="tiny",
                            device="cpu")
    # noise-to-image families train on the images themselves
    plain = build_dataset(make_cfg("data.kind=toy", f"data.path={tmp_path}", "model.name=cifar_dcgan"))
    assert "pair" not in plain[0]


def test_reference_images_come_from_the_source(tmp_path, toy_source):
    from dagan_gn.metrics.fidelity import reference_images_for_config

    images, key = reference_images_for_config(make_cfg("data.kind=toy", f"data.path={tmp_path}"), 5)
    assert images.dtype == torch.uint8 and tuple(images.shape) == (5, 3, 32, 32)
    assert key.startswith("toy-train-")  # no split function: the training images


def test_unknown_kind_is_one_clear_error(tmp_path, toy_source):
    unregister_data_source("toy")
    cfg = make_cfg("data.kind=toy", f"data.path={tmp_path}")
    with pytest.raises(DataError, match=r"unknown data.kind 'toy'; choose one of: patches, cifar10") as info:
        build_dataset(cfg)
    assert isinstance(info.value, DaganError) and isinstance(info.value, ValueError)
    with pytest.raises(DataError, match="unknown data.kind 'toy'"):
        get_data_source("toy")
    with pytest.raises(ValueError, match="unknown data.kind 'toy'"):  # what TrainingEvaluator turns into metrics:
        from dagan_gn.metrics.fidelity import reference_images_for_config

        reference_images_for_config(cfg, 4)


def test_missing_data_and_single_image_classes_are_data_errors(tmp_path, toy_source):
    with pytest.raises(DataError, match="does not exist"):
        build_dataset(make_cfg("data.kind=toy", f"data.path={tmp_path / 'nope'}"))
    register_data_source("toy", training=lambda cfg: TinyImages(n=4, size=32, k=3))
    with pytest.raises(DataError, match="class.*c2.*single patch"):
        build_dataset(make_cfg("data.kind=toy", f"data.path={tmp_path}"))


def test_image_folder_kind_reads_class_folders(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8)).save(tmp_path / "imgs" / cls / f"{i}.png")
    cfg = make_cfg("data.kind=image_folder", f"data.path={tmp_path / 'imgs'}", "data.limit_per_class=2")
    ds = build_dataset(cfg)
    assert len(ds) == 4 and ds.class_names == ["a", "b"] and tuple(ds[0]["pair"].shape) == (1, 32, 32)
    with pytest.raises(DataError, match="no splits"):
        build_dataset(make_cfg("data.kind=image_folder", f"data.path={tmp_path / 'imgs'}", "data.split=val"))
