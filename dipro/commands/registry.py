"""``dipro registry list|promote``: the MLflow model registry of ``dipro-{task}``.

Only argparse and the dependency-free defaults at module level; mlflow is imported by the handlers.
"""
from __future__ import annotations

import argparse

from dipro.defaults import ALIASES, PROMOTE_MIN_DELTA, TASKS


def register(subparsers: argparse._SubParsersAction) -> None:
    reg = subparsers.add_parser(
        "registry", help="list registered model versions; promote an alias on evidence",
        description="Model registry of dipro-{task} (tracking URI: --tracking-uri, else $MLFLOW_TRACKING_URI, "
                    "else sqlite:///mlflow.db in the working directory).",
    )
    reg_sub = reg.add_subparsers(dest="registry_command", metavar="ACTION")
    reg_sub.required = True

    ls = reg_sub.add_parser("list", help="versions, aliases and their key metrics",
                            description="Show every version of dipro-{task}: aliases, validation monitor, "
                                        "test metrics, data fingerprint and run.")
    ls.add_argument("--task", required=True, choices=TASKS)
    ls.add_argument("--tracking-uri", default=None, help="MLflow tracking/registry URI")
    ls.set_defaults(func=_list)

    pr = reg_sub.add_parser(
        "promote", help="move an alias to a version if it beats the current holder",
        description="Move --alias to --version only if that version beats the alias's current holder on the "
                    "task's validation monitor (f1_macro / auprc / accuracy): both trained on the same data "
                    "fingerprint, both evaluated here on the same validation samples, and the lower bound of the "
                    "95% paired bootstrap interval of the difference above --min-delta; otherwise explain why "
                    "and exit non-zero. The difference, its interval and the sample count are recorded as version "
                    "tags. --force skips the check and records who and why in the version's tags.",
    )
    pr.add_argument("--task", required=True, choices=TASKS)
    pr.add_argument("--version", required=True, type=int)
    pr.add_argument("--alias", required=True, choices=ALIASES)
    pr.add_argument("--force", action="store_true", help="promote even if the evidence does not support it")
    pr.add_argument("--reason", default=None, help="why (required with --force; recorded in tags)")
    pr.add_argument("--min-delta", type=float, default=PROMOTE_MIN_DELTA, metavar="D",
                    help=f"the difference's lower bound must exceed D (default {PROMOTE_MIN_DELTA:g})")
    pr.add_argument("--shards", metavar="DIR", default=None,
                    help="shards to evaluate both versions on (default: the candidate's data.shards)")
    pr.add_argument("--device", default="cpu", help="device for the two validation passes (cpu | cuda)")
    pr.add_argument("--tracking-uri", default=None, help="MLflow tracking/registry URI")
    pr.set_defaults(func=_promote)


def _list(args: argparse.Namespace) -> int:
    from dipro.tracking.registry import format_versions, list_versions

    rows = list_versions(args.task, args.tracking_uri)
    print(format_versions(rows, args.task))
    return 0


def _promote(args: argparse.Namespace) -> int:
    from dipro.tracking.registry import promote

    result = promote(args.task, args.version, args.alias, force=args.force, reason=args.reason,
                     uri=args.tracking_uri, min_delta=args.min_delta, shards=args.shards, device=args.device,
                     progress=True)
    print(result.message)
    return 0
