"""The ``dipro`` console script: one entry point, one subcommand per job.

Each subcommand lives in ``dipro/commands/<name>.py`` and exposes
``register(subparsers)``, which adds its parser and sets ``func`` (a callable
taking the parsed args and returning an exit code).  Command modules import
only argparse at module level, so ``dipro --help`` is instant; heavy imports
(torch, ray, mlflow) happen inside ``func``.

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
    "shards",
    "train",
    "registry",
    "demo",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dipro",
        description="DiPro at scale: synth -> prepare -> shard -> train (Ray Train) -> registry (MLflow).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        module_name = f"dipro.commands.{name}"
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            # Only a command module that is absent from this checkout is tolerated
            # (tests/test_cli.py asserts all are present); a missing dependency
            # inside a command module is a real error and propagates.
            if exc.name != module_name:
                raise
            continue
        module.register(sub)
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
