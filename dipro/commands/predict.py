"""``dipro predict``: per-sample predictions of a registered model (or checkpoint) over a shard split.

Only argparse and the dependency-free defaults at module level; mlflow, torch and ray are
imported by the handler.
"""
from __future__ import annotations

import argparse

from dipro import defaults


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "predict", help="per-sample predictions of a registered model over a shard split",
        description="Run MODEL (models:/dipro-TASK@ALIAS, models:/NAME/VERSION, runs:/..., an MLflow model "
                    "directory or a checkpoint directory) over one split of the shards and write one row per "
                    "sample (sample_key, subject_id, stay_id, shard, probabilities, predicted class) to a "
                    "Parquet file. Uses one Ray task per shard with --ray or for large splits "
                    "(connects to $RAY_ADDRESS or starts a local Ray).",
    )
    p.add_argument("--model", required=True,
                   help="model URI, MLflow model directory, or checkpoint directory (local or s3:// / gs://)")
    p.add_argument("--shards", required=True, help="shard root (holds manifest.parquet)")
    p.add_argument("--split", default=defaults.EVAL_SPLIT, choices=defaults.SPLITS)
    p.add_argument("--out", required=True,
                   help="output .parquet file, local or s3:// / gs:// (written atomically either way)")
    p.add_argument("--ray", dest="use_ray", action="store_const", const=True, default=None,
                   help="one Ray task per shard (default: only for large splits)")
    p.add_argument("--no-ray", dest="use_ray", action="store_const", const=False, help="always in-process")
    p.add_argument("--batch-size", type=int, default=defaults.PREDICT_BATCH_SIZE)
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking/registry URI")
    p.add_argument("--remove-acquisition", metavar="DIR", default=None,
                   help="a `dipro harmonize` output (rotation.pt + rotation.json): project its technical "
                        "coordinates out of the region features before STD")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dipro.tracking.predict import run_predict

    report = run_predict(args.model, args.shards, args.split, args.out, use_ray=args.use_ray,
                         batch_size=args.batch_size, tracking_uri=args.tracking_uri,
                         remove_acquisition=args.remove_acquisition)
    how = "Ray tasks" if report.used_ray else "in-process"
    print(f"wrote {report.rows} predictions from {report.shards} shard(s) ({how}) to {report.out}"
          + (f"; skipped {report.skipped} corrupt sample(s)" if report.skipped else ""))
    return 0
