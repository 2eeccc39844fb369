"""Defaults and choices of the data jobs, in one place: the implementations and the CLI parsers read them.

Standard library only (no numpy, pandas or pyarrow), so ``dipro --help`` can import it
and still start instantly.  ``synth``, ``prepare``, ``shard`` and ``shards regenerate``
take their defaults from here; change a default here and both the job and its
``--help`` change with it.
"""
from __future__ import annotations

# ----------------------------------------------------------------------------- dipro synth
SYNTH_PATIENTS = 120
"""Subjects of a synthetic cohort (``dipro demo`` asks for more: :data:`dipro.defaults.DEMO_PATIENTS`)."""
SYNTH_SEED = 0
SYNTH_IMAGE_SIZE = 256
"""Film height in pixels (MIMIC-sized films are ~2500-3000 px; 256 keeps the demo quick)."""
SYNTH_ACQUISITION_SHIFT = 0.0
"""Strength of the planted erect/recumbent factor (:mod:`data_sharding.synth.acquisition`); 0 = none."""

# ----------------------------------------------------------------------------- dipro prepare
SPLIT_SEED = 0
"""``random_state`` of the patient-level split (the authors' value)."""
BLOCK_SIZE = 16 << 20
"""Bytes per streamed block of an event table (pyarrow parses one block at a time)."""
DP_LABEL_MODES = ("authors", "severity")
"""Disease-progression label rules (:mod:`data_sharding.dp_labels`); the first is the default."""
GOLD_MODES = ("per-disease", "first-row")
"""Gold correction of a study label; the first is the default (a deviation, docs/FIDELITY.md)."""
REGION_NAME_MODES = ("mapped", "authors")
"""Region-level finding names; the first is the default (a deviation, docs/FIDELITY.md)."""
NORM_STATS = ("train", "all")
"""Population of the normalisation statistics; the first is the default (a deviation, docs/FIDELITY.md)."""

# ----------------------------------------------------------------------------- dipro shard
CROP_SIZE = 224
"""Side of the square region crops (the paper's 224)."""
MAX_SAMPLES_PER_SHARD = 1000
MAX_SHARD_BYTES = 512 * 1024 * 1024
RESAMPLE_MODES = ("bilinear", "nearest", "bilinear-fast")
"""Crop resampling: antialiased bilinear (default), the authors' nearest, or bilinear through PIL's
``reducing_gap`` (an approximation of the default: :data:`FAST_REDUCING_GAP`, error in README "Benchmarks")."""
FAST_REDUCING_GAP = 2.0
"""``reducing_gap`` of ``--crop-resample bilinear-fast``: a box is first shrunk by whole-pixel averaging
(``Image.reduce``) to at most this many times the crop size, then resampled bilinearly."""
BUILD_WORKERS_MAX = 64
"""Upper bound of the default worker count of ``dipro shard`` (all cores, at most this many)."""

GC_MIN_AGE_S = 7 * 24 * 3600
"""``dipro shards gc --min-age``: superseded objects younger than this stay (a job may still read them)."""
