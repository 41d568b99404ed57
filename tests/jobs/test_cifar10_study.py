"""The CIFAR-10 normalization study end to end on a tiny synthetic CIFAR archive with the tiny feature extractor:
numbers finite, files written, cells resumable and skipped when done, option errors."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "datasets"))
from test_cifar10 import write_python_archive  # noqa: E402

from dagan_gn.jobs.cifar10_study import (  # noqa: E402
    PRESETS,
    StudyError,
    cell_config,
    plan_cells,
    run_study,
)


@pytest.fixture()
def archive(tmp_path, monkeypatch):
    monkeypatch.setenv("DAGAN_GN_CACHE", str(tmp_path / "cache"))  # never write to the user's ~/.cache in tests
    path = tmp_path / "cifar-10-python.tar.gz"
    write_python_archive(path, per_batch=40, test=40)
    return path


def test_plan_and_config():
    smoke = PRESETS["smoke"]
    cells = plan_cells(smoke)
    assert {c.critic_norm for c in cells} == {"layer", "group"} and len(cells) == 4
    full = plan_cells(PRESETS["seed-10k"], archs=["resnet"])
    assert len(full) == 7 * 2 * 3  # critic norms × generator norms × seeds
    cfg = cell_config(cells[0], smoke, "x.tar.gz", feature_extractor="tiny")
    assert cfg.model.name == "cifar_resnet" and cfg.model.d_norm == "layer" and cfg.model.g_norm == "group"
    assert cfg.loss.name == "wgan-gp" and cfg.data.kind == "cifar10" and cfg.train.steps == smoke.steps
    assert cfg.metrics.feature_extractor == "tiny"
    with pytest.raises(StudyError, match="critic norm"):
        plan_cells(smoke, critic_norms=["bogus"])
    with pytest.raises(StudyError, match="architecture"):
        plan_cells(smoke, archs=["vit"])


@pytest.mark.slow
def test_smoke_sweep_end_to_end_and_resumable(archive, tmp_path):
    out = tmp_path / "results"
    logs: list[str] = []
    report = run_study(
        archive, out, preset="smoke", archs=["dcgan"], device="cpu", feature_extractor="tiny",
        progress=False, log=logs.append,
    )
    assert report == out / "results.md" and report.is_file()
    results = json.loads((out / "results.json").read_text())
    assert [r["cell"] for r in results] == ["dcgan-Dlayer-Ggroup-s0", "dcgan-Dgroup-Ggroup-s0"]
    assert all(r["environment"]["device"] == "cpu" and r["environment"]["monai"] for r in results)
    for r in results:
        for key in ("fid", "kid_mean", "kid_std", "isc_mean", "recon_mse", "wall_s", "it_per_s"):
            assert math.isfinite(r[key]), (r["cell"], key)
        assert r["fid"] > 0 and 0 < r["recon_mse"] < 1
        assert [s for s, _ in r["fid_curve"]] == [2, 4]
        assert (out / r["grid"]).is_file()
    text = report.read_text()
    assert "| dcgan | group | group | 1 |" in text and "3.324" in text and "smoke" in text.lower()
    assert (out / "fid_vs_step.png").stat().st_size > 1000

    # Done cells are skipped; a cell whose result is missing (killed after training) is finished from its run.
    done = out / "cells" / "dcgan-Dlayer-Ggroup-s0" / "result.json"
    before = done.read_text()
    (out / "cells" / "dcgan-Dgroup-Ggroup-s0" / "result.json").unlink()
    logs.clear()
    run_study(
        archive, out, preset="smoke", archs=["dcgan"], device="cpu", feature_extractor="tiny",
        progress=False, log=logs.append,
    )
    assert logs == ["skip (done) dcgan-Dlayer-Ggroup-s0", "run dcgan-Dgroup-Ggroup-s0"]
    assert done.read_text() == before
    redone = json.loads((out / "cells" / "dcgan-Dgroup-Ggroup-s0" / "result.json").read_text())
    assert redone["steps_trained_this_call"] == 0 and math.isfinite(redone["fid"])


def test_bad_data_path_fails_before_training(tmp_path):
    with pytest.raises(Exception, match="does not exist"):
        run_study(tmp_path / "nope", tmp_path / "out", preset="smoke", feature_extractor="tiny", progress=False)
    assert not (tmp_path / "out").exists()


def test_benchmark_cli_reports_bad_options_in_one_line(archive, tmp_path):
    from typer.testing import CliRunner

    from dagan_gn.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["benchmark", "cifar10", "--data", str(archive), "--out", str(tmp_path / "o"),
                              "--preset", "huge", "--feature-extractor", "tiny"])
    assert res.exit_code == 2 and "'huge' is not one of 'smoke'" in res.output and "'full-100k'" in res.output
    res = runner.invoke(app, ["benchmark", "cifar10", "--data", str(tmp_path / "none.tar.gz"), "--out",
                              str(tmp_path / "o"), "--feature-extractor", "tiny"])
    assert res.exit_code == 2 and "does not exist" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["benchmark", "cifar10", "--help"])
    assert res.exit_code == 0 and "--critic-norms" in res.output and "seed-10k" in res.output
