"""``dipro registry list|promote`` and ``dipro predict``: the MLflow model registry and batch inference.

Heavy imports (mlflow, torch, ray) happen inside the handlers.
"""
from __future__ import annotations

import argparse

TASK_CHOICES = ("disease_progression", "mortality", "length_of_stay")
ALIAS_CHOICES = ("champion", "challenger", "staging")


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
    ls.add_argument("--task", required=True, choices=TASK_CHOICES)
    ls.add_argument("--tracking-uri", default=None, help="MLflow tracking/registry URI")
    ls.set_defaults(func=_list)

    pr = reg_sub.add_parser(
        "promote", help="move an alias to a version if it beats the current holder",
        description="Move --alias to --version only if that version beats the alias's current holder on the "
                    "task's validation monitor (f1_macro / auprc / accuracy), computed on the same data "
                    "fingerprint; otherwise explain why and exit non-zero. --force skips the check and records "
                    "who and why in the version's tags.",
    )
    pr.add_argument("--task", required=True, choices=TASK_CHOICES)
    pr.add_argument("--version", required=True, type=int)
    pr.add_argument("--alias", required=True, choices=ALIAS_CHOICES)
    pr.add_argument("--force", action="store_true", help="promote even if the evidence does not support it")
    pr.add_argument("--reason", default=None, help="why (required with --force; recorded in tags)")
    pr.add_argument("--tracking-uri", default=None, help="MLflow tracking/registry URI")
    pr.set_defaults(func=_promote)

    pd_ = subparsers.add_parser(
        "predict", help="per-sample predictions of a registered model over a shard split",
        description="Run MODEL (models:/dipro-TASK@ALIAS, models:/NAME/VERSION, runs:/..., an MLflow model "
                    "directory or a checkpoint directory) over one split of the shards and write one row per "
                    "sample (sample_key, subject_id, stay_id, shard, probabilities, predicted class) to a "
                    "Parquet file. Uses one Ray task per shard with --ray or for large splits "
                    "(connects to $RAY_ADDRESS or starts a local Ray).",
    )
    pd_.add_argument("--model", required=True, help="model URI or directory")
    pd_.add_argument("--shards", required=True, help="shard root (holds manifest.parquet)")
    pd_.add_argument("--split", default="test", choices=("train", "val", "test"))
    pd_.add_argument("--out", required=True, help="output .parquet file (written atomically)")
    pd_.add_argument("--ray", dest="use_ray", action="store_const", const=True, default=None,
                     help="one Ray task per shard (default: only for large splits)")
    pd_.add_argument("--no-ray", dest="use_ray", action="store_const", const=False, help="always in-process")
    pd_.add_argument("--batch-size", type=int, default=16)
    pd_.add_argument("--tracking-uri", default=None, help="MLflow tracking/registry URI")
    pd_.set_defaults(func=_predict)


def _list(args: argparse.Namespace) -> int:
    from dipro.tracking.registry import format_versions, list_versions

    rows = list_versions(args.task, args.tracking_uri)
    print(format_versions(rows, args.task))
    return 0


def _promote(args: argparse.Namespace) -> int:
    from dipro.tracking.registry import promote

    result = promote(args.task, args.version, args.alias, force=args.force, reason=args.reason,
                     uri=args.tracking_uri)
    print(result.message)
    return 0


def _predict(args: argparse.Namespace) -> int:
    from dipro.tracking.predict import run_predict

    report = run_predict(args.model, args.shards, args.split, args.out, use_ray=args.use_ray,
                         batch_size=args.batch_size, tracking_uri=args.tracking_uri)
    how = "Ray tasks" if report.used_ray else "in-process"
    print(f"wrote {report.rows} predictions from {report.shards} shard(s) ({how}) to {report.out}"
          + (f"; skipped {report.skipped} corrupt sample(s)" if report.skipped else ""))
    return 0
