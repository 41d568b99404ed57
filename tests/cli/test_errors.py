"""The CLI's error contract: a DaganError (or OSError) is one ``error:`` line and exit code 2; anything else is a bug
and shows its traceback. Choices are listed in ``--help`` and checked before a command runs."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dagan_gn.cli import app

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


def _flat(output: str) -> str:
    """Output without typer's box drawing and line wrapping."""
    return " ".join(output.translate({ord(c): " " for c in "│╭╮╰╯─"}).split())


def test_a_bug_in_a_command_shows_its_traceback():
    """A library bug (here a plain ValueError, which the CLI used to swallow) is not turned into "error:"."""
    script = textwrap.dedent("""
        import sys
        import dagan_gn.store.patch_file as store

        def broken(*args, **kwargs):
            raise ValueError("an internal bug")

        store.merge_patch_files = broken
        from dagan_gn.cli import main
        sys.argv = ["dagan", "merge-patches", "a.h5", "b.h5", "--out", "merged.h5"]
        main()
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "NO_ALBUMENTATIONS_UPDATE": "1"},
                         timeout=120)
    assert res.returncode == 1, res.stderr
    assert "Traceback (most recent call last)" in res.stderr and "ValueError: an internal bug" in res.stderr
    assert "error:" not in res.stderr


def test_dagan_errors_are_one_line(monkeypatch, tmp_path):
    import dagan_gn.jobs.train as job
    from dagan_gn.training.trainer import TrainingError

    def refuses(*args, **kwargs):
        raise TrainingError("the data does not fit\n  the model")

    monkeypatch.setattr(job, "train", refuses)
    res = runner.invoke(app, ["train", "--out", str(tmp_path / "run")])
    assert res.exit_code == 2 and res.output.strip() == "error: the data does not fit the model"

    def bug(*args, **kwargs):
        raise KeyError("internal")

    monkeypatch.setattr(job, "train", bug)
    res = runner.invoke(app, ["train", "--out", str(tmp_path / "run")])
    assert res.exit_code == 1 and isinstance(res.exception, KeyError) and "error:" not in res.output


def test_config_and_device_mistakes_are_one_line(tmp_path):
    from factories import make_patch_file

    patches = make_patch_file(tmp_path / "p.h5")
    res = runner.invoke(app, ["train", "--config", str(ROOT / "configs/dagan_tiny.yaml"), "--data", str(patches),
                              "--out", str(tmp_path / "r"), "-q", "model.g_kwargs={z_chanels: 4}"])
    assert res.exit_code == 2, res.output
    assert res.output.startswith("error: unknown key(s) model.g_kwargs.z_chanels: DAGANGenerator takes")
    assert "Traceback" not in res.output
    res = runner.invoke(app, ["train", "--out", str(tmp_path / "r"), "model.name=biggan"])
    assert res.exit_code == 2 and "unknown model 'biggan'" in res.output
    res = runner.invoke(app, ["evaluate", "--checkpoint", str(tmp_path), "--device", "gpu"])
    assert res.exit_code == 2 and "'gpu' is not a device; use auto, cpu, cuda or cuda:N" in _flat(res.output)


@pytest.mark.parametrize("argv, listed", [
    (["train"], "[auto|cpu|cuda|cuda:N]"),
    (["train"], "none|bf16|fp16"),
    (["benchmark", "cifar10"], "smoke|seed-10k|full-100k"),
    (["evaluate-augmentation"], "real|real+albumentations|real+dagan|real+both"),
    (["evaluate-augmentation"], "resnet|densenet"),
    (["check-memorization"], "random-conv|none"),
])
def test_help_lists_the_choices(argv, listed):
    res = runner.invoke(app, [*argv, "--help"], env={"COLUMNS": "250"})  # no wrapping inside the metavars
    assert res.exit_code == 0 and listed in _flat(res.output).replace(" ", "")


def test_cli_choices_are_the_librarys():
    from dagan_gn.cli.augment import AugmentationPreset, ClassifierArch, Regime
    from dagan_gn.cli.evaluate import StudyPreset
    from dagan_gn.jobs.cifar10_study import PRESETS
    from dagan_gn.metrics.downstream import AUGMENTATION_PRESETS, CLASSIFIER_ARCHS, REGIMES

    assert tuple(r.value for r in Regime) == REGIMES
    assert tuple(a.value for a in ClassifierArch) == CLASSIFIER_ARCHS
    assert tuple(a.value for a in AugmentationPreset) == AUGMENTATION_PRESETS
    assert tuple(p.value for p in StudyPreset) == tuple(PRESETS)
