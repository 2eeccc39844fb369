"""The `dipro` console script: every command registered, help works, user errors are one line."""
from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import repo_env

from dipro import cli

EXPECTED = ["synth", "prepare", "shard", "shards", "train", "evaluate", "experiment", "registry", "predict", "demo"]


def test_every_command_module_is_present():
    import importlib

    for name in cli.COMMAND_MODULES:
        importlib.import_module(f"dipro.commands.{name}")


def test_every_contract_command_is_registered():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(EXPECTED) <= set(sub.choices), set(EXPECTED) - set(sub.choices)


@pytest.mark.parametrize("command", EXPECTED)
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([command, "--help"])
    assert exc.value.code == 0
    assert "usage" in capsys.readouterr().out


def test_user_error_is_one_line_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "dipro", "train", "--config", str(tmp_path / "missing.yaml")],
        capture_output=True, text=True, env=repo_env(), timeout=300,
    )
    assert proc.returncode == 2  # the CLI's contract for a user error
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "missing.yaml" in lines[0], proc.stderr
