"""A corpus of malformed inputs, each generated here: HDF5 patch files (to ``dagan augment --in`` and ``dagan train
--data``), YAML configs (to ``dagan train --config``) and checkpoints (to ``dagan augment --checkpoint`` and ``dagan
evaluate --checkpoint``). Every case must end with a non-zero exit, exactly one ``error:`` line naming the file (or
the key), and no traceback — and nothing in an input file may run code."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from dagan_gn.cli import app

from factories import make_checkpoint, make_patch_file  # tests/ is on pythonpath
from fault_testutils import assert_one_line_error

runner = CliRunner()
TINY = ["model.image_size=64", "model.g_width=8", "model.d_width=8", "model.z_dim=8", "data.batch_size=4",
        "data.num_workers=0", "optim.n_critic=1", "train.sample_every=0", "train.checkpoint_every=0"]


# ------------------------------------------------------------------------------------------------ HDF5 corpus
def _replace(f: h5py.File, name: str, data: np.ndarray) -> None:
    del f[name]
    f[name] = data


def _edit(fn: Callable[[h5py.File], None]) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        make_patch_file(path)  # 10 rows: 6 train, 2 val, 2 test; classes normal/benign/malignant
        with h5py.File(path, "r+") as f:
            fn(f)
    return make


def _bytes(data: bytes) -> Callable[[Path], None]:
    return lambda path: path.write_bytes(data)


def _truncated(path: Path) -> None:
    make_patch_file(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _set(name: str, row: int, value) -> Callable[[h5py.File], None]:
    def fn(f: h5py.File) -> None:
        f[name][row] = value
    return fn


#: name → (builder, a fragment of the expected message)
HDF5_CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    "missing-patches": (_edit(lambda f: f.__delitem__("patches")), "not a dagan-gn patch file"),
    "missing-labels": (_edit(lambda f: f.__delitem__("labels")), "dataset 'labels' is missing"),
    "missing-split": (_edit(lambda f: f.__delitem__("split")), "dataset 'split' is missing"),
    "missing-provenance": (_edit(lambda f: f.__delitem__("provenance")), "group 'provenance' is missing"),
    "short-labels": (_edit(lambda f: _replace(f, "labels", f["labels"][:-1])), "'labels' has 9 rows"),
    "short-split": (_edit(lambda f: _replace(f, "split", f["split"][:-3])), "'split' has 7 rows"),
    "short-provenance": (_edit(lambda f: _replace(f, "provenance/view", f["provenance/view"][:-2])),
                         "'provenance/view' has 8 rows"),
    "float32-patches": (_edit(lambda f: _replace(f, "patches", f["patches"][()].astype(np.float32) / 65535)),
                        "'patches' is float32, expected uint16"),
    "wrong-rank": (_edit(lambda f: _replace(f, "patches", f["patches"][:, 0])), "'patches' has shape [10, 64, 64]"),
    "patch-size-attr": (_edit(lambda f: f.attrs.__setitem__("patch_size", 32)), "expected [N, 1, 32, 32]"),
    "negative-label": (_edit(_set("labels", 3, -1)), "'labels' row 3 is -1"),
    "label-out-of-range": (_edit(_set("labels", 2, 3)), "'labels' row 2 is 3, outside 0..2"),
    "split-value-7": (_edit(_set("split", 0, 7)), "'split' row 0 is 7"),
    "float-labels": (_edit(lambda f: _replace(f, "labels", f["labels"][()].astype(np.float32))), "1-D integers"),
    "no-class-names": (_edit(lambda f: f.attrs.__delitem__("class_names")), "attribute 'class_names' is missing"),
    "bad-parameters-json": (_edit(lambda f: f.attrs.__setitem__("parameters", "{not json")),
                            "cannot read the patch file layout"),
    "newer-format": (_edit(lambda f: f.attrs.__setitem__("format_version", 99)), "newer than this tool"),
    "truncated": (_truncated, "not a readable HDF5 file"),
    "not-hdf5": (_bytes(b"patient,label\nx,1\n" * 50), "not a readable HDF5 file"),
    "empty-file": (_bytes(b""), "not a readable HDF5 file"),
    "directory": (lambda path: path.mkdir(), "is a directory"),
}


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    root = tmp_path_factory.mktemp("good")
    patches = make_patch_file(root / "patches.h5")
    return patches, make_checkpoint(root / "run", patches)


@pytest.fixture(scope="module")
def hdf5_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("hdf5-corpus")
    paths = {}
    for name, (build, _) in HDF5_CASES.items():
        paths[name] = root / f"{name}.h5"
        build(paths[name])
    return paths


@pytest.mark.parametrize("case", sorted(HDF5_CASES))
def test_malformed_hdf5_to_augment(case, hdf5_corpus, good, tmp_path):
    _, run = good
    bad = hdf5_corpus[case]
    result = runner.invoke(app, ["augment", "--in", str(bad), "--checkpoint", str(run), "--out",
                                 str(tmp_path / "syn.h5"), "--device", "cpu", "-q"])
    assert_one_line_error(result.exit_code, result.output, str(bad), HDF5_CASES[case][1])
    assert not (tmp_path / "syn.h5").exists()


@pytest.mark.parametrize("case", sorted(HDF5_CASES))
def test_malformed_hdf5_to_train(case, hdf5_corpus, tmp_path):
    bad = hdf5_corpus[case]
    result = runner.invoke(app, ["train", "--data", str(bad), "--out", str(tmp_path / "run"), "--steps", "1",
                                 "--device", "cpu", "-q", *TINY])
    assert_one_line_error(result.exit_code, result.output, bad.name, HDF5_CASES[case][1])
    assert not (tmp_path / "run" / "checkpoints").exists()


# ------------------------------------------------------------------------------------------------ YAML corpus
YAML_CASES: dict[str, tuple[bytes, str]] = {
    "a-list": (b"- model\n- data\n", "must be a mapping of sections"),
    "a-scalar": (b"42\n", "must be a mapping of sections"),
    "tab-indent": (b"model:\n\tname: dagan\n", "not valid YAML: found character '\\t'"),
    "unclosed-bracket": (b"optim: {betas: [0.0, 0.9}\n", "not valid YAML"),
    "section-not-mapping": (b"model: 3\n", "config section 'model' must be a mapping"),
    "unknown-section": (b"modle: {name: dagan}\n", "unknown config section(s) modle"),
    "unknown-key": (b"model: {widht: 3}\n", "model.widht"),
    "wrong-type": (b"optim: {n_critic: many}\n", "optim.n_critic"),
    "batch-size-0": (b"data: {batch_size: 0}\n", "'data.batch_size' must be at least 1"),
    "num-workers-negative": (b"data: {num_workers: -1}\n", "'data.num_workers' must be at least 0"),
    "steps-0": (b"train: {steps: 0}\n", "'train.steps' must be at least 1"),
    "not-utf8": (b"model: {name: \xff\xfe}\n", "cannot be read"),
}


@pytest.mark.parametrize("case", sorted(YAML_CASES))
def test_malformed_yaml_to_train(case, good, tmp_path):
    patches, _ = good
    text, fragment = YAML_CASES[case]
    bad = tmp_path / f"{case}.yaml"
    bad.write_bytes(text)
    result = runner.invoke(app, ["train", "--config", str(bad), "--data", str(patches), "--out",
                                 str(tmp_path / "run"), "--device", "cpu", "-q"])
    assert_one_line_error(result.exit_code, result.output, str(bad), fragment)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override, fragment", [
    ("data.batch_size=0", "'data.batch_size' must be at least 1"),
    ("data.num_workers=-2", "'data.num_workers' must be at least 0"),
    ("train.steps=-5", "'train.steps' must be at least 1"),
])
def test_out_of_range_overrides(override, fragment, good, tmp_path):
    patches, _ = good
    result = runner.invoke(app, ["train", "--data", str(patches), "--out", str(tmp_path / "run"), "--device", "cpu",
                                 "-q", override])
    assert_one_line_error(result.exit_code, result.output, fragment)


def test_missing_config_file(good, tmp_path):
    patches, _ = good
    result = runner.invoke(app, ["train", "--config", str(tmp_path / "nope.yaml"), "--data", str(patches),
                                 "--out", str(tmp_path / "run")])
    assert_one_line_error(result.exit_code, result.output, "nope.yaml", "does not exist")


# ------------------------------------------------------------------------------------------------ checkpoints
SENTINEL = "dagan-gn-malicious-checkpoint-ran"


class _RunsCode:
    """Unpickling this would create a sentinel file: a checkpoint must never run it."""

    def __init__(self, where: Path) -> None:
        self.where = where

    def __reduce__(self):
        return (os.mkdir, (str(self.where / SENTINEL),))


def _real_checkpoint(run: Path) -> dict:
    return torch.load(next((run / "checkpoints").glob("step_*.pt")), weights_only=True)


def _checkpoint_cases(run: Path, root: Path) -> dict[str, tuple[Path, str]]:
    real_file = next((run / "checkpoints").glob("step_*.pt"))
    state = _real_checkpoint(run)
    cases: dict[str, tuple[Path, str]] = {}

    def save(name: str, obj, fragment: str, *, raw: bytes | None = None) -> None:
        path = root / f"{name}.pt"
        if raw is not None:
            path.write_bytes(raw)
        else:
            torch.save(obj, path)
        cases[name] = (path, fragment)

    save("runs-code", {"format_version": 1, "x": _RunsCode(root)}, "refused (loading it could run code)")
    save("plain-pickle", None, "not a torch checkpoint", raw=pickle.dumps({"format_version": 1}, protocol=4))
    save("truncated", None, "truncated or not a torch checkpoint",
         raw=real_file.read_bytes()[: real_file.stat().st_size // 2])
    save("text", None, "not a torch checkpoint", raw=b"this is not a checkpoint\n")
    save("empty", None, "cannot read checkpoint", raw=b"")
    save("a-list", [1, 2, 3], "not a dagan-gn training checkpoint")
    save("no-format-version", {"generator": {}}, "not a dagan-gn training checkpoint")
    save("newer-format", {**state, "format_version": 99}, "newer than this dagan-gn understands")
    save("no-generator", {k: v for k, v in state.items() if k != "generator"}, "incomplete checkpoint (no generator)")
    save("config-not-a-mapping", {**state, "config": "dagan"}, "has an invalid config")
    save("config-bad-key", {**state, "config": {"model": {"widht": 3}}}, "has an invalid config")
    shapes = {k: torch.zeros(3) for k in state["generator"]}
    save("wrong-shapes", {**state, "generator": shapes, "ema": None}, "does not fit the generator")
    empty_run = root / "empty-run"
    (empty_run / "checkpoints").mkdir(parents=True)
    cases["run-without-checkpoints"] = (empty_run, "no checkpoints/step_*.pt found")
    cases["missing"] = (root / "missing.pt", "neither a checkpoint file nor a run folder")
    return cases


@pytest.fixture(scope="module")
def checkpoint_corpus(good, tmp_path_factory):
    return _checkpoint_cases(good[1], tmp_path_factory.mktemp("ckpt-corpus"))


CHECKPOINT_CASE_NAMES = ["runs-code", "plain-pickle", "truncated", "text", "empty", "a-list", "no-format-version",
                         "newer-format", "no-generator", "config-not-a-mapping", "config-bad-key", "wrong-shapes",
                         "run-without-checkpoints", "missing"]


@pytest.mark.parametrize("case", CHECKPOINT_CASE_NAMES)
def test_malformed_checkpoint_to_augment(case, checkpoint_corpus, good, tmp_path):
    patches, _ = good
    bad, fragment = checkpoint_corpus[case]
    result = runner.invoke(app, ["augment", "--in", str(patches), "--checkpoint", str(bad), "--out",
                                 str(tmp_path / "syn.h5"), "--device", "cpu", "-q"])
    assert_one_line_error(result.exit_code, result.output, bad.name, fragment)
    assert not (bad.parent / SENTINEL).exists(), "loading the checkpoint ran code from it"


@pytest.mark.parametrize("case", CHECKPOINT_CASE_NAMES)
def test_malformed_checkpoint_to_evaluate(case, checkpoint_corpus, good, tmp_path):
    patches, _ = good
    bad, fragment = checkpoint_corpus[case]
    result = runner.invoke(app, ["evaluate", "--checkpoint", str(bad), "--data", str(patches), "--device", "cpu",
                                 "--feature-extractor", "tiny", "--num-samples", "4", "--out",
                                 str(tmp_path / "e.json")])
    assert_one_line_error(result.exit_code, result.output, bad.name, fragment)
    assert not (bad.parent / SENTINEL).exists() and not (tmp_path / "e.json").exists()


def test_corpus_covers_every_named_case(checkpoint_corpus):
    assert sorted(checkpoint_corpus) == sorted(CHECKPOINT_CASE_NAMES)
