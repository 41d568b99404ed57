"""Every command and command group answers ``-h`` and ``--help`` (set once in the app factory)."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from dagan_gn.cli import app


def _command_paths(group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = [prefix]
    for name, cmd in sorted(group.commands.items()):
        if hasattr(cmd, "commands"):  # a command group (typer may vendor its own click classes)
            paths += _command_paths(cmd, prefix + (name,))
        else:
            paths.append(prefix + (name,))
    return paths


COMMANDS = _command_paths(typer.main.get_command(app))


def test_every_command_is_listed():
    names = {" ".join(p) for p in COMMANDS}
    assert {"extract-patches", "merge-patches", "train", "augment", "demo", "benchmark cifar10", "evaluate",
            "check-memorization", "evaluate-augmentation", "report"} <= names


@pytest.mark.parametrize("flag", ["-h", "--help"])
@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "dagan")
def test_help_flag(path, flag):
    result = CliRunner().invoke(app, [*path, flag])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output
    assert "No such option" not in result.output
    command = typer.main.get_command(app)
    for name in path:
        command = command.commands[name]
    if not hasattr(command, "commands"):  # a command, not a group: every option is explained, --seed among them
        # (on a wide terminal: at 80 columns rich shortens long option names, e.g. "--max-real-per-cla…")
        result = CliRunner().invoke(app, [*path, flag], env={"COLUMNS": "250", "TERMINAL_WIDTH": "250"})
        assert "--seed" in result.output, "every command takes --seed (README)"
        for param in command.params:
            for opt in param.opts:
                if opt.startswith("--"):
                    assert opt in result.output, f"{opt} missing from {' '.join(path)} --help"


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "dagan")
def test_flags_are_shown_as_flags(path):
    """An on/off option reads ``--invert``, never ``--invert <bool>`` (which invites ``--invert true``)."""
    result = CliRunner().invoke(app, [*path, "-h"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "<bool>" not in result.output and "BOOLEAN" not in result.output


def test_a_value_after_a_flag_is_explained(tmp_path):
    result = CliRunner().invoke(app, ["import-images", "--invert", "true", "--out", str(tmp_path / "x.h5")])
    assert result.exit_code == 2
    assert "'true' is not a folder or zip" in result.output and "--invert, not --invert true" in result.output
    assert not (tmp_path / "x.h5").exists()
