"""Defaults and choices of the ``dipro`` commands that are not data jobs, in one place.

Standard library only: the CLI parsers import it at module level (``dipro --help``
stays instant), and the implementations (registry, predict, evaluate, experiment,
demo) read the same names, so a default has one source.  The data jobs' defaults
live in :mod:`data_sharding.defaults` (the lower layer; it never imports ``dipro``).
"""
from __future__ import annotations

from pathlib import Path

from data_sharding.constants import SPLITS, TASKS  # noqa: F401 (re-exported for the parsers)

ALIASES = ("champion", "challenger", "staging")
"""Registry aliases ``dipro registry promote`` may move."""
PROMOTE_MIN_DELTA = 0.0
"""``dipro registry promote --min-delta``: the lower bound of the candidate's paired-bootstrap
difference over the alias's holder must be above this."""
PRECISIONS = ("fp32", "bf16", "fp16")
"""Numeric precisions of training and evaluation; the first is ``dipro evaluate``'s default."""
EVAL_SPLIT = "test"
PREDICT_BATCH_SIZE = 16
"""Samples per forward pass of ``dipro predict``."""
PAPER_SEEDS = (23, 29, 66)
"""The paper's three seeds: ``dipro experiment``'s default (mean ± std over them)."""
STORAGE_PATH = "runs"
"""``trainer.storage_path``: where run directories (checkpoints, ``train.log``) go."""
DEMO_PATIENTS = 300
"""``dipro demo``'s cohort: ~240 ICU stays, enough for defined test metrics; the whole demo stays
well under 15 minutes on 2 cores (synth, prepare and shard take under a minute of it)."""
DEMO_OUT = "demo_output"
"""``dipro demo``'s folder for everything it writes."""
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
"""This checkout's ``configs/`` (one YAML per task): ``dipro import-authors``' default ``--config`` is
``CONFIG_DIR/<task>.yaml``."""
AUTHORS_SOURCE = "authors' release"
"""The ``source`` tag of a registry version imported from the authors' released checkpoints."""

# ----------------------------------------------------------------------------- dipro harmonize
HARMONIZE_SPLIT = "val"
"""Split whose region features the rotation is fitted on and reported for."""
HARMONIZE_FACTOR = "orientation"
"""Acquisition factor (a column of processed/acquisition.parquet) whose coordinates are rotated apart."""
HARMONIZE_K = 3
"""Technical coordinates of the rotation (the first k): the acquisition moves each region its own way, so
one direction rarely holds it all (the planted cohort: probe AUROC 0.81 -> 0.78 with k=1, 0.57 with k=3)."""
HARMONIZE_CLUSTERS = 4
"""K of the k-means whose assignments are compared across settings."""
HARMONIZE_MAX_PAIR_HOURS = 48.0
"""Two films of one stay in two settings form a proxy twin when at most this many hours apart."""
HARMONIZE_MIN_PAIRS = 20
"""Fewest film pairs to fit on (else stay-centred contrasts, needing as many stays; else a refusal)."""
HARMONIZE_OUT = "harmonize"
