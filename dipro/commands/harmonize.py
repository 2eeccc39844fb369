"""``dipro harmonize``: a rotation of a trained model's region features that keeps acquisition apart.

Only argparse and the dependency-free defaults at module level; torch, scikit-learn and mlflow are
imported by the handler.  The method and its metrics: :mod:`dipro.harmonize.run`, docs/FIDELITY.md.
"""
from __future__ import annotations

import argparse

from dipro import defaults


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "harmonize", help="rotate a model's region features so k coordinates carry the acquisition setting",
        description="Collect the region features of a checkpoint or registered model on a split (region encoder "
                    "per CXR and region, STD per pair), fit an orthogonal rotation whose first k coordinates carry "
                    "the acquisition factor (from films of one stay taken in two settings close in time, else "
                    "stay-centred contrasts), and report entangled vs rotated-biological vs ComBat: probe AUROC "
                    "of the setting, ARI / NMI / Dice of the clusters across settings, and the task metric with "
                    "the technical coordinates projected out. Writes OUT/rotation.pt + rotation.json (for "
                    "--remove-acquisition in dipro evaluate and dipro predict), harmonize.txt/.json, projection.png, "
                    "and an MLflow run nested under the model's training run.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="PATH", help="checkpoint directory (e.g. runs/RUN/best)")
    src.add_argument("--model", metavar="URI", help="MLflow model URI, e.g. models:/dipro-mortality@champion")
    p.add_argument("--processed", required=True, metavar="DIR", help="the processed directory the shards were cut "
                   "from (reads its acquisition.parquet)")
    p.add_argument("--shards", metavar="DIR", help="shard directory (default: the model config's data.shards)")
    p.add_argument("--split", default=defaults.HARMONIZE_SPLIT, choices=defaults.SPLITS)
    p.add_argument("--factor", default=defaults.HARMONIZE_FACTOR, choices=("orientation", "procedure", "detector"),
                   help=f"acquisition factor (default {defaults.HARMONIZE_FACTOR})")
    p.add_argument("--k", type=int, default=defaults.HARMONIZE_K, help=f"technical coordinates (default {defaults.HARMONIZE_K})")
    p.add_argument("--clusters", type=int, default=defaults.HARMONIZE_CLUSTERS, metavar="K",
                   help=f"k-means clusters (default {defaults.HARMONIZE_CLUSTERS})")
    p.add_argument("--seed", type=int, default=0, help="seed of the classifiers, probes and k-means (default 0)")
    p.add_argument("--max-pair-hours", type=float, default=defaults.HARMONIZE_MAX_PAIR_HOURS, metavar="H",
                   help=f"largest gap between a proxy twin's two films (default {defaults.HARMONIZE_MAX_PAIR_HOURS:g})")
    p.add_argument("--min-pairs", type=int, default=defaults.HARMONIZE_MIN_PAIRS, metavar="N",
                   help=f"fewest film pairs (or stays) to fit on (default {defaults.HARMONIZE_MIN_PAIRS})")
    p.add_argument("--out", default=defaults.HARMONIZE_OUT, metavar="DIR",
                   help=f"output directory (default ./{defaults.HARMONIZE_OUT})")
    p.add_argument("--batch-size", type=int, default=defaults.PREDICT_BATCH_SIZE)
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: the config's / environment's)")
    p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from data_sharding.errors import UserError
    from dipro.harmonize.run import run_harmonize
    from dipro.train.checkpoint import load_model
    from dipro.train.evaluate import checkpoint_from_model_uri

    if args.batch_size < 1:
        raise UserError("--batch-size must be >= 1")
    source = args.checkpoint or args.model
    path = Path(args.checkpoint) if args.checkpoint else checkpoint_from_model_uri(args.model)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, cfg = load_model(path, device=device)
    shards = args.shards or cfg.data.shards

    def say(line: str) -> None:
        print(f"[dipro harmonize] {line}", flush=True)

    result = run_harmonize(model, cfg, shards, args.processed, split=args.split, factor=args.factor, k=args.k,
                           clusters=args.clusters, seed=args.seed, max_pair_hours=args.max_pair_hours,
                           min_pairs=args.min_pairs, out=args.out, batch_size=args.batch_size, device=device,
                           progress=not args.quiet, say=say, source=source)
    print(result.table)
    if not args.no_tracking:
        from dipro.harmonize.tracking import log_harmonize

        rid = log_harmonize(result, cfg, source, path if args.checkpoint else None, args.tracking_uri, say=say)
        say(f"MLflow run {rid}")
    say(f"wrote {result.rotation_files[0]}, {result.rotation_files[1]}, {result.out / 'harmonize.txt'}, "
        f"{result.figure}")
    return 0
