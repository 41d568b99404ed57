"""No operator path in an output meant to leave the hospital (issue 13, item 6). The training data lives under a
patient-named folder; the synthetic file, the checkpoint, and the evaluate / check-memorization /
evaluate-augmentation reports must not contain that name anywhere in their bytes — only base names and hashes. The
run's own ``config.yaml`` keeps the full path (``--resume`` needs it; it stays with the operator)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from dagan_gn.cli import app
from dagan_gn.runtime import environment_info
from dagan_gn.jobs.augment import augment
from dagan_gn.training.checkpoint import latest_checkpoint, load_checkpoint

from factories import make_checkpoint, make_patch_file  # tests/ is on pythonpath

PATIENT = "Doe_Jane_19570312"
runner = CliRunner()


def hits(path) -> int:
    return path.read_bytes().count(PATIENT.encode())


@pytest.fixture(scope="module")
def run_on_patient_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("operator")
    data = make_patch_file(root / PATIENT / "patches.h5")
    run = make_checkpoint(root / "runs" / "exp", data)
    synthetic = root / "share" / "synthetic.h5"
    augment(data, run, synthetic, n=2, device="cpu", seed=0, progress=False)
    return root, data, run, synthetic


def test_synthetic_file_and_checkpoint_hold_base_names_only(run_on_patient_folder):
    root, data, run, synthetic = run_on_patient_folder
    assert hits(synthetic) == 0
    ckpt = latest_checkpoint(run)
    assert hits(ckpt) == 0
    assert load_checkpoint(ckpt)["config"]["data"]["path"] == "patches.h5"
    assert PATIENT in (run / "config.yaml").read_text()  # the operator's copy, for --resume


def test_reports_hold_base_names_only(run_on_patient_folder, tmp_path):
    root, data, run, synthetic = run_on_patient_folder
    ev = tmp_path / "evaluate.json"
    result = runner.invoke(app, ["evaluate", "--checkpoint", str(run), "--device", "cpu", "--feature-extractor",
                                 "tiny", "--num-samples", "4", "--kid-subset-size", "2", "--out", str(ev)])
    assert result.exit_code == 0, result.output
    report = json.loads(ev.read_text())
    assert report["data"] == "patches.h5" and report["checkpoint"].startswith("step_")
    assert len(report["checkpoint_sha256"]) == 64  # the default --data came from the run's config.yaml
    mem = tmp_path / "mem"
    result = runner.invoke(app, ["check-memorization", "--real", str(data), "--synthetic", str(synthetic), "--out",
                                 str(mem), "--device", "cpu", "--feature", "none"])
    assert result.exit_code == 0, result.output
    down = tmp_path / "down"
    result = runner.invoke(app, ["evaluate-augmentation", "--real", str(data), "--synthetic", str(synthetic), "--out",
                                 str(down), "--epochs", "1", "--width", "4", "--batch-size", "8", "--seeds", "1",
                                 "--device", "cpu", "--regimes", "real", "--regimes", "real+dagan", "-q"])
    assert result.exit_code == 0, result.output
    outputs = [ev, mem / "memorization.json", mem / "memorization.md", down / "downstream.json",
               down / "downstream.md"]
    assert {p.name: hits(p) for p in outputs} == {p.name: 0 for p in outputs}
    assert json.loads((down / "downstream.json").read_text())["meta"]["real"] == "patches.h5"
    for path in (ev, mem / "memorization.json", down / "downstream.json"):  # what the figures were measured with
        assert json.loads(path.read_text())["environment"] == environment_info("cpu"), path.name


@pytest.mark.parametrize("command", ["evaluate", "check-memorization", "evaluate-augmentation", "augment"])
def test_unwritable_output_is_refused_before_the_work(run_on_patient_folder, tmp_path, command):
    root, data, run, synthetic = run_on_patient_folder
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = blocker / "out"
    args = {
        "evaluate": ["evaluate", "--checkpoint", str(run), "--device", "cpu", "--feature-extractor", "tiny",
                     "--num-samples", "4", "--out", str(out)],
        "check-memorization": ["check-memorization", "--real", str(data), "--synthetic", str(synthetic), "--out",
                               str(out), "--device", "cpu"],
        "evaluate-augmentation": ["evaluate-augmentation", "--real", str(data), "--out", str(out), "--epochs", "1"],
        "augment": ["augment", "--in", str(data), "--checkpoint", str(run), "--out", str(tmp_path / "s.h5"),
                    "--contact-sheet", str(out), "--device", "cpu", "-q"],
    }[command]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "a-file" in lines[0] and "Traceback" not in result.output
    assert not (tmp_path / "s.h5").exists() and not (tmp_path / "s.h5.partial").exists()
    assert "{" not in result.output  # nothing was computed (evaluate prints its JSON when it finishes)
