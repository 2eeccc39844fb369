"""``dipro import-authors``: the authors' released checkpoints as checkpoint directories of this project.

Only argparse and the dependency-free defaults at module level; torch is imported by the handler.
"""
from __future__ import annotations

import argparse

from dipro.commands._args import allow_intermixed_positionals
from dipro.defaults import TASKS


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "import-authors", help="import the authors' released checkpoints (Lightning .ckpt)",
        description="Read an authors' checkpoint (github.com/Chenliu-svg/DiPro, the README's <task>/seed_N.ckpt) "
                    "without running code from it, map every key onto this project's model (checked against "
                    "the task config and the shards) and write a checkpoint directory that dipro evaluate "
                    "--checkpoint, dipro predict --model, model.init_from=DIR and the registry accept. CKPT may "
                    "be the release's folder: every <task>/seed_N.ckpt is imported to OUT/seed_N.",
    )
    allow_intermixed_positionals(p)  # CKPT --task T --shards S --out D key=value ...
    p.add_argument("ckpt", metavar="CKPT", help="an authors' .ckpt file, or the folder holding <task>/seed_N.ckpt")
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--shards", required=True, metavar="SHARDS",
                   help="shard root: label_stats.json (class weights), ehr_stats.json and crops of the file's size")
    p.add_argument("--out", required=True, metavar="DIR", help="output checkpoint directory (OUT/seed_N per file "
                                                             "when CKPT is a folder)")
    p.add_argument("--config", metavar="FILE", default=None,
                   help="config the import is checked against (default: this checkout's configs/TASK.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. model.d_model=256")
    p.add_argument("--register", action="store_true",
                   help="evaluate on the val split and register a version of dipro-TASK tagged with the source")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking/registry URI (with --register)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from data_sharding.errors import UserError
    from dipro.authors.importer import format_report, import_authors

    if args.tracking_uri and not args.register:
        raise UserError("--tracking-uri is for --register")
    results = import_authors(args.ckpt, args.task, args.shards, args.out, args.overrides, config=args.config,
                             register=args.register, tracking_uri=args.tracking_uri, overwrite=args.overwrite,
                             progress=True)
    for r in results:
        print(format_report(r))
    return 0
