"""The ``dipro`` console script: one entry point, one subcommand per job.

Each subcommand ``NAME`` lives in ``dipro/commands/NAME.py`` (``-`` spelled ``_``), which exposes
``register(subparsers)``: it adds the parser ``NAME`` (nothing else) and sets
``func`` (a callable taking the parsed args and returning an exit code).
Command modules import only argparse and the dependency-free defaults
(:mod:`dipro.defaults`, :mod:`data_sharding.defaults`) at module level, so
``dipro --help`` is instant; heavy imports (torch, ray, mlflow) happen inside
``func``.  A command module that is missing, fails to import, or registers
under another name is an error here, never a silently absent command.

User errors (:class:`data_sharding.errors.UserError`) print one line and exit 2; any
other exception keeps its traceback (a bug, not a user error).
"""
from __future__ import annotations

import argparse
import importlib
import sys

from data_sharding.errors import UserError

# Order = order in --help.
COMMAND_MODULES = (
    "synth",
    "prepare",
    "shard",
    "shards",
    "train",
    "evaluate",
    "experiment",
    "sweep",
    "registry",
    "predict",
    "import_authors",
    "harmonize",
    "demo",
)
"""Module names under ``dipro/commands/``; the command is the name with ``-`` for ``_`` (``import-authors``)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dipro",
        description="DiPro at scale: synth -> prepare -> shard -> train (Ray Train) -> registry (MLflow).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        module = importlib.import_module(f"dipro.commands.{name}")  # missing or broken: the error propagates
        before = set(sub.choices)
        module.register(sub)
        added = set(sub.choices) - before
        command = name.replace("_", "-")
        if added != {command}:
            raise RuntimeError(f"dipro/commands/{name}.py registered {sorted(added)}; it must register "
                               f"exactly the command {command!r}")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
    except UserError as exc:
        print(f"dipro {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dipro {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
