"""The `dipro` console script: every command registered, help works, user errors are one line."""
from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import repo_env

from dipro import cli

EXPECTED = ["synth", "prepare", "shard", "shards", "train", "evaluate", "experiment", "sweep", "registry", "predict",
            "import-authors", "harmonize", "demo"]


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


def test_parsers_import_nothing_heavy():
    """`dipro --help` builds every parser; none may pull in the heavy stack (it must stay instant)."""
    code = ("import sys\nfrom dipro import cli\ncli.build_parser()\n"
            "print(' '.join(m for m in ('torch', 'ray', 'mlflow', 'deepspeed', 'numpy', 'pandas', 'pyarrow',"
            " 'yaml', 'PIL') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env=repo_env(), timeout=300)
    assert proc.stdout.strip() == "", f"parsers imported: {proc.stdout.strip()}"


def test_each_command_lives_in_its_own_module():
    import argparse
    import importlib

    for name in cli.COMMAND_MODULES:
        sub = argparse.ArgumentParser().add_subparsers()
        importlib.import_module(f"dipro.commands.{name}").register(sub)
        assert set(sub.choices) == {name.replace("_", "-")}, (name, set(sub.choices))  # import_authors: import-authors
    assert {name.replace("_", "-") for name in cli.COMMAND_MODULES} == set(EXPECTED)


def test_a_missing_command_module_is_an_error(monkeypatch):
    monkeypatch.setattr(cli, "COMMAND_MODULES", (*cli.COMMAND_MODULES, "no_such_command"))
    with pytest.raises(ModuleNotFoundError, match="no_such_command"):
        cli.build_parser()


def test_a_module_registering_another_name_is_an_error(monkeypatch):
    import types

    fake = types.ModuleType("dipro.commands.fake")
    fake.register = lambda sub: sub.add_parser("something_else")
    monkeypatch.setitem(sys.modules, "dipro.commands.fake", fake)
    monkeypatch.setattr(cli, "COMMAND_MODULES", (*cli.COMMAND_MODULES, "fake"))
    with pytest.raises(RuntimeError, match="exactly the command 'fake'"):
        cli.build_parser()


def test_parser_defaults_are_the_implementations_defaults():
    """One source per default: what --help shows is what the job uses when the flag is absent."""
    import inspect

    from data_sharding import synth
    from data_sharding.manifest import ShardSettings
    from data_sharding.prepare import PrepareOptions
    from dipro.config import Config
    from dipro.tracking.predict import run_predict

    parser = cli.build_parser()

    def parse(*argv):
        return parser.parse_args(list(argv))

    s = parse("synth", "--out", "x")
    assert (s.patients, s.seed, s.image_size) == (synth.DEFAULT_PATIENTS, synth.DEFAULT_SEED, synth.DEFAULT_IMAGE_SIZE)
    p = parse("prepare", "--out", "x")
    o = PrepareOptions()
    assert (p.split_seed, p.dp_labels, p.gold_labels, p.region_names, p.norm_stats, p.block_mb << 20) == (
        o.split_seed, o.dp_labels, o.gold_labels, o.region_names, o.norm_stats, o.block_size)
    sh = parse("shard", "--processed", "p", "--out", "x")
    st = ShardSettings()
    assert (sh.crop_size, sh.max_samples_per_shard, sh.max_shard_bytes, sh.crop_resample) == (
        st.crop_size, st.max_samples_per_shard, st.max_shard_bytes, st.resample)
    shard_help = parser._subparsers._group_actions[0].choices["shard"].format_help()
    assert "(default: 512M)" in " ".join(shard_help.split())
    pr = parse("predict", "--model", "m", "--shards", "s", "--out", "o")
    assert pr.batch_size == inspect.signature(run_predict).parameters["batch_size"].default == 16
    assert parse("experiment", "--config", "c").seeds == "23,29,66"
    assert Config().trainer.storage_path == "runs"
