"""``dipro evaluate``: a checkpoint's or registered model's metrics on one split (several checkpoints:
each one's metrics and the paper's mean ± std table over them).

Only argparse and the dependency-free defaults at module level; torch and mlflow are
imported by the handler.
"""
from __future__ import annotations

import argparse

from dipro import defaults


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("evaluate", help="evaluate a checkpoint or registered model on a split",
                              description="Print and write the task's metrics (metrics.json and metrics.txt).")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="PATH", nargs="+",
                     help="checkpoint directory (e.g. runs/RUN/best, s3://BUCKET/runs/RUN/best, a dipro import-authors "
                          "output) or its model.pt; several (e.g. the three seeds' imports) print the paper's mean ± std "
                          "table over them")
    src.add_argument("--model", metavar="URI", help="MLflow model URI, e.g. models:/dipro-mortality@champion")
    p.add_argument("--split", default=defaults.EVAL_SPLIT, choices=defaults.SPLITS)
    p.add_argument("--shards", metavar="DIR", help="shard directory (default: the checkpoint config's data.shards)")
    p.add_argument("--out", metavar="DIR",
                   help="where to write metrics.json / metrics.txt: a directory or an s3:// / gs:// prefix "
                        "(default: ./eval-SPLIT)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--precision", default=defaults.PRECISIONS[0], choices=defaults.PRECISIONS)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--remove-acquisition", metavar="DIR", default=None,
                   help="a `dipro harmonize` output (rotation.pt + rotation.json): project its technical "
                        "coordinates out of the region features before STD")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from data_sharding.errors import UserError
    from dipro.train.evaluate import (checkpoint_from_model_uri, evaluate_checkpoint, format_metrics,
                                      write_eval_outputs)

    if args.batch_size is not None and args.batch_size < 1:
        raise UserError("--batch-size must be >= 1")
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.precision == "fp16" and not device.startswith("cuda"):
        raise UserError("--precision fp16 needs a GPU (--device cuda); on CPU use bf16 or fp32")
    out = args.out or f"eval-{args.split}"
    kwargs = dict(shard_dir=args.shards, device=device, precision=args.precision, batch_size=args.batch_size,
                  progress=True, remove_acquisition=args.remove_acquisition)
    if args.checkpoint and len(args.checkpoint) > 1:
        from dipro.train.evaluate import evaluate_over_checkpoints

        summary = evaluate_over_checkpoints([Path(c) for c in args.checkpoint], args.split, Path(out), **kwargs)
        print(summary.table)
        print(f"wrote {summary.json_path} and {summary.json_path.with_suffix('.txt')}")
        return 0
    path = args.checkpoint[0] if args.checkpoint else checkpoint_from_model_uri(args.model)
    source = args.checkpoint[0] if args.checkpoint else args.model
    if args.remove_acquisition:
        source += f" (acquisition removed: {args.remove_acquisition})"
    result = evaluate_checkpoint(path, args.split, **kwargs)
    from dipro.bootstrap import bootstrap_run, format_intervals

    intervals = bootstrap_run(result.task, result.y_true, result.y_prob)
    jpath, tpath = write_eval_outputs(result, out, source, intervals=intervals)
    print(format_metrics(result.metrics, f"{result.task} / {args.split} / {result.num_samples} samples / {source}"))
    print(format_intervals({source: intervals}, result.task))
    print(f"wrote {jpath} and {tpath}")
    return 0
