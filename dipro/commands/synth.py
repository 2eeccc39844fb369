"""``dipro synth``: write a synthetic MIMIC-CXR-JPG + MIMIC-IV + Chest ImaGenome cohort.

Only argparse and the dependency-free defaults at module level; the generator is imported when the command runs.
"""
from __future__ import annotations

import argparse

from data_sharding.defaults import SYNTH_ACQUISITION_SHIFT as DEFAULT_ACQUISITION_SHIFT
from data_sharding.defaults import SYNTH_IMAGE_SIZE as DEFAULT_IMAGE_SIZE
from data_sharding.defaults import SYNTH_PATIENTS as DEFAULT_PATIENTS
from data_sharding.defaults import SYNTH_SEED as DEFAULT_SEED
from dipro.defaults import DEMO_PATIENTS


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "synth",
        help="write a synthetic cohort in the real MIMIC / ImaGenome file layout",
        description=(
            "Write DIR/mimic-cxr-jpg/2.0.0, DIR/mimiciv/2.0/{hosp,icu} and DIR/chest-imagenome/1.0.0 "
            "exactly as PhysioNet lays them out, with a planted image signal (region pixels follow the "
            "worsened/improved/no-change labels) and EHR signal (mortality and length of stay). "
            "Deterministic: the same arguments give byte-identical files."
        ),
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output root (written atomically)")
    p.add_argument("--patients", type=int, default=DEFAULT_PATIENTS, metavar="N",
                   help=f"number of subjects (default {DEFAULT_PATIENTS}; `dipro demo` uses {DEMO_PATIENTS})")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, metavar="S", help=f"random seed (default {DEFAULT_SEED})")
    p.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE, metavar="PIXELS",
                   help=f"image height in pixels; width is 82-92%% of it (default {DEFAULT_IMAGE_SIZE}; "
                        "2560 gives MIMIC-sized images for benchmarks)")
    p.add_argument("--acquisition-shift", type=float, default=DEFAULT_ACQUISITION_SHIFT, metavar="S",
                   help="plant a technical factor: each AP film erect or recumbent (recumbent more often for "
                        "sicker stays), written to PatientOrientationCodeSequence_CodeMeaning and applied to the "
                        "pixels as gamma 1 + 0.5 S plus noise sd 3 S (default 0: none, the files are byte-identical "
                        "to a cohort without the factor)")
    p.add_argument("--anatomy-types", type=int, default=0, metavar="N",
                   help="plant N discrete anatomy types (2-12): each subject's frontal films show a fine grating "
                        "of its type's orientation, biology that clusters for `dipro harmonize` (default 0: none, "
                        "the files are byte-identical to a cohort without them)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out (atomically)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from data_sharding.synth import generate

    summary = generate(
        args.out,
        patients=args.patients,
        seed=args.seed,
        image_size=args.image_size,
        overwrite=args.overwrite,
        progress=not args.quiet,
        acquisition_shift=args.acquisition_shift,
        anatomy_types=args.anatomy_types,
    )
    c = summary.counts
    print(
        f"dipro synth: wrote {summary.out_dir} in {summary.seconds:.1f} s: "
        f"{c['subjects']} subjects, {c['admissions']} admissions, {c['icu_stays']} ICU stays "
        f"({c['stays_with_death']} ending in death, {c['stays_under_48h']} under 48 h), "
        f"{c['images']} images ({c['images_ap']} AP, {c['images_pa']} PA, {c['images_lateral']} lateral), "
        f"{c['scene_graphs']} scene graphs, {c['relationships']} relationships, {c['gold_rows']} gold rows, "
        f"{c['chartevents_rows']} chartevents rows"
        + (f"; acquisition shift {summary.acquisition_shift:g}: {c['images_recumbent']} recumbent films"
           if summary.acquisition_shift > 0 else "")
        + (f"; {summary.anatomy_types} anatomy types: "
           + ", ".join(str(c[f"subjects_anatomy_type_{t}"]) for t in range(summary.anatomy_types)) + " subjects"
           if summary.anatomy_types > 0 else "")
    )
    return 0
