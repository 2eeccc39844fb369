"""Defaults and choices of the ``dipro`` commands that are not data jobs, in one place.

Standard library only: the CLI parsers import it at module level (``dipro --help``
stays instant), and the implementations (registry, predict, evaluate, experiment,
demo) read the same names, so a default has one source.  The data jobs' defaults
live in :mod:`data_sharding.defaults` (the lower layer; it never imports ``dipro``).
"""
from __future__ import annotations

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
