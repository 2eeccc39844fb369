"""``dipro prepare``: raw MIMIC files -> processed Parquet tables (cohort, CXRs, tasks, EHR, demographics)."""
from __future__ import annotations

import argparse

from data_sharding import defaults


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "prepare",
        help="build the cohort, labels, hourly EHR and splits from the raw MIMIC files",
        description=(
            "Read MIMIC-CXR-JPG 2.0.0, MIMIC-IV 2.0 and Chest ImaGenome 1.0.0 as PhysioNet ships them "
            "(or as `dipro synth` writes them), apply the cohort rules as the authors' code does, build the labels of the three "
            "tasks, the 38-variable hourly EHR and the 17 demographic features, split by patient, and write "
            "the processed layout (docs/ARCHITECTURE.md section 1) atomically, with report.json (every rule's kept and "
            "dropped counts, also printed).  docs/FIDELITY.md compares each definition with the paper and the "
            "authors' code."
        ),
    )
    p.add_argument("--raw", metavar="DIR",
                   help="folder holding mimic-cxr-jpg/2.0.0, mimiciv/2.0 and chest-imagenome/1.0.0")
    p.add_argument("--cxr-root", metavar="DIR", help="MIMIC-CXR-JPG 2.0.0 root (overrides --raw)")
    p.add_argument("--mimiciv-root", metavar="DIR", help="MIMIC-IV 2.0 root with hosp/ and icu/ (overrides --raw)")
    p.add_argument("--imagenome-root", metavar="DIR", help="Chest ImaGenome 1.0.0 root (overrides --raw)")
    p.add_argument("--out", metavar="DIR", required=True, help="processed output folder (written atomically)")
    p.add_argument("--split-seed", type=int, default=defaults.SPLIT_SEED,
                   help=f"random_state of the patient-level split (default {defaults.SPLIT_SEED}: the authors' split)")
    f = p.add_argument_group("fidelity", "definitions where this project and the authors' code differ "
                                         "(docs/FIDELITY.md); the defaults follow the authors except where noted")
    f.add_argument("--dp-labels", choices=defaults.DP_LABEL_MODES, default=defaults.DP_LABEL_MODES[0],
                   help="disease-progression labels: authors (regions must agree; pairs without a label dropped; "
                        "default) or severity (worsened if any region worsened; every consecutive pair kept)")
    f.add_argument("--gold-labels", choices=defaults.GOLD_MODES, default=defaults.GOLD_MODES[0],
                   help="gold correction of a study label: per-disease (the gold rows of that disease; default, "
                        "a deviation) or first-row (the authors' code: the pair's first gold row for every disease)")
    f.add_argument("--region-names", choices=defaults.REGION_NAME_MODES, default=defaults.REGION_NAME_MODES[0],
                   help="region-level finding names: mapped (ImaGenome's 'pulmonary edema/hazy opacity' is edema; "
                        "default, a deviation) or authors (literal match: no region-level edema label)")
    f.add_argument("--norm-stats", choices=defaults.NORM_STATS, default=defaults.NORM_STATS[0],
                   help="EHR and demographic normalisation statistics: train (the training stays; EHR over their "
                        "hourly grid; default, a deviation) or all (the authors: every stay, test included; EHR over "
                        "every measurement)")
    p.add_argument("--block-mb", type=int, default=defaults.BLOCK_SIZE >> 20,
                   help=f"MB per streamed block of the event tables (default {defaults.BLOCK_SIZE >> 20})")
    p.add_argument("--full-jpeg-decode", action="store_true",
                   help="decode every pixel of each JPEG (default: header, markers and end-of-image check)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from data_sharding.prepare import PrepareOptions, format_summary, prepare
    from data_sharding.readers import resolve_roots
    from data_sharding.errors import UserError

    if args.block_mb < 1:
        raise UserError("--block-mb must be >= 1")
    roots = resolve_roots(args.raw, args.cxr_root, args.mimiciv_root, args.imagenome_root)
    opts = PrepareOptions(split_seed=args.split_seed, dp_labels=args.dp_labels, gold_labels=args.gold_labels,
                          region_names=args.region_names, norm_stats=args.norm_stats,
                          block_size=args.block_mb << 20, full_jpeg_decode=args.full_jpeg_decode,
                          overwrite=args.overwrite, progress=not args.no_progress)
    result = prepare(roots, args.out, opts)
    print(format_summary(result))
    return 0
