"""Tests for dagan_gn.config: YAML loading, dotted overrides, type checks and the resume guard."""

import dataclasses

import pytest
import yaml

from dagan_gn.config import (
    ConfigError,
    ExperimentConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
    resume_mismatches,
    save_config,
)


def test_defaults_round_trip_through_yaml(tmp_path):
    cfg = ExperimentConfig()
    save_config(cfg, tmp_path / "cfg.yaml")
    assert load_config(tmp_path / "cfg.yaml") == cfg
    assert not list(tmp_path.glob("*.tmp")), "atomic save left a temporary file behind"


def test_yaml_values_and_missing_keys_take_defaults(tmp_path):
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"model": {"name": "cifar_resnet", "g_width": 128},
                                                     "optim": {"n_critic": 3}}))
    cfg = load_config(tmp_path / "c.yaml")
    assert cfg.model.name == "cifar_resnet" and cfg.model.g_width == 128
    assert cfg.optim.n_critic == 3
    assert cfg.optim.betas == [0.0, 0.9]  # default kept


def test_overrides_parse_yaml_scalars_and_lists():
    cfg = apply_overrides(ExperimentConfig(), ["optim.g_lr=2e-4", "optim.betas=[0.5, 0.99]",
                                               "model.d_norm=group:4", "train.amp=bf16", "data.hflip=false"])
    assert cfg.optim.g_lr == pytest.approx(2e-4)
    assert cfg.optim.betas == [0.5, 0.99]
    assert cfg.model.d_norm == "group:4"
    assert cfg.train.amp == "bf16"
    assert cfg.data.hflip is False


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("optim.g_lrr=1", "optim.g_lrr"),
        ("optimiser.g_lr=1", "optimiser"),
        ("optim.n_critic=2.5", "optim.n_critic"),
        ("train.progress=maybe", "train.progress"),
        ("no_equals_sign", "section.key=value"),
        ("steps=3", "section.key"),
    ],
)
def test_bad_overrides_name_the_key(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        apply_overrides(ExperimentConfig(), [override])


def test_bad_yaml_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {name: dagan, widht: 3}\n")
    with pytest.raises(ConfigError, match="bad.yaml.*model.widht"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_resume_guard_ignores_safe_keys_and_names_the_rest():
    a = ExperimentConfig()
    b = apply_overrides(a, ["train.steps=99", "train.log_every=7", "data.num_workers=0"])
    assert resume_mismatches(a, b) == []
    c = apply_overrides(a, ["model.d_norm=batch", "optim.d_lr=3e-4"])
    assert resume_mismatches(config_to_dict(a), c) == ["model.d_norm", "optim.d_lr"]


def test_config_from_dict_rejects_unknown_section():
    with pytest.raises(ConfigError, match="unknown config section"):
        config_from_dict({"modle": {}})


def test_save_config_is_atomic_and_leaves_nothing_behind_on_error(tmp_path):
    cfg = ExperimentConfig()
    target = tmp_path / "cfg.yaml"
    save_config(cfg, target)
    save_config(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=7)), target)  # replaces it
    assert load_config(target).train.steps == 7
    blocked = tmp_path / "blocked.yaml"
    blocked.mkdir()  # the final rename cannot replace a folder
    with pytest.raises(OSError):
        save_config(cfg, blocked)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocked.yaml", "cfg.yaml"]  # no temp file left
@pytest.mark.parametrize("text, fragment", [
    ("- model\n- data\n", "must be a mapping of sections.*got a YAML list"),
    ("model:\n\tname: dagan\n", r"not valid YAML: found character '\\t'.*line 2"),
    ("data: {batch_size: 0}\n", "'data.batch_size' must be at least 1, got 0"),
    ("data: {num_workers: -1}\n", "'data.num_workers' must be at least 0"),
    ("train: {steps: 0}\n", "'train.steps' must be at least 1"),
])
def test_bad_config_files_name_the_file_and_the_problem(tmp_path, text, fragment):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(ConfigError, match=fragment) as info:
        load_config(bad)
    assert "bad.yaml" in str(info.value)


def test_ranges_apply_to_overrides_and_paths_are_reduced_for_sharing():
    from dagan_gn.config import config_without_paths

    with pytest.raises(ConfigError, match="'data.batch_size' must be at least 1"):
        apply_overrides(ExperimentConfig(), ["data.batch_size=0"])
    cfg = apply_overrides(ExperimentConfig(), ["data.path=/data/Doe_Jane/p.h5"])
    shared = config_without_paths(cfg)
    assert shared["data"]["path"] == "p.h5" and cfg.data.path == "/data/Doe_Jane/p.h5"
    assert config_without_paths(ExperimentConfig())["data"]["path"] is None


def test_parse_setting():
    from dagan_gn.config import ConfigError, parse_setting

    assert parse_setting("ms=loss.mode_seeking=1.0;optim.n_critic=2") == ("ms", ["loss.mode_seeking=1.0",
                                                                                  "optim.n_critic=2"])
    assert parse_setting("base=") == ("base", [])
    with pytest.raises(ConfigError, match="expected name="):
        parse_setting("no-equals-sign")
