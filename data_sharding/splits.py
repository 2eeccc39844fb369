"""Patient-level train/val/test split, exactly as the authors draw it.

github.com/Chenliu-svg/DiPro ``mimic_data_extract/mimic3benchmark/scripts/split_train_and_test.py:
split_dataset_for_each_task``:

1. the subject list is the cohort's subjects in ascending id order (the authors take
   ``cxr_stay.subject_id.unique()`` of a table sorted by subject_id) -- every stay left by
   the cohort rules counts, also one left with a single CXR;
2. gold subjects in that list go to test;
3. the others are split with scikit-learn's ``train_test_split(left, test_size=(0.2 N -
   n_gold) / N, random_state=seed)``, N = all subjects, and the rest again with
   ``test_size=1/8`` and the same ``random_state`` into train and val.

With the authors' seed (0, the default) this reproduces their split on the same subject
list.  Every stay of a subject lands in the subject's split, so the same split serves all
three tasks.  When the gold subjects alone reach 20 % (the authors' code would fail),
test is the gold subjects and only the train/val draw is made.
"""
from __future__ import annotations

import numpy as np

from data_sharding import defaults
from data_sharding.errors import DataError

TEST_FRACTION = 0.2
VAL_FRACTION_OF_REST = 1 / 8
DEFAULT_SPLIT_SEED = defaults.SPLIT_SEED


def split_subjects(subject_ids, gold_subjects=(), seed: int = DEFAULT_SPLIT_SEED) -> dict[int, str]:
    """subject_id -> "train" | "val" | "test"."""
    from sklearn.model_selection import train_test_split

    subjects = [int(s) for s in np.unique(np.asarray(list(subject_ids), dtype=np.int64))]
    gold = {int(s) for s in gold_subjects}
    n = len(subjects)
    fixed = [s for s in subjects if s in gold]
    left = [s for s in subjects if s not in gold]
    ratio = (n * TEST_FRACTION - len(fixed)) / n if n else 0.0
    try:
        if ratio > 0:
            train_val, test = train_test_split(left, test_size=ratio, random_state=seed)
        else:
            train_val, test = left, []
        train, val = train_test_split(train_val, test_size=VAL_FRACTION_OF_REST, random_state=seed)
    except ValueError:
        raise DataError(f"the cohort has {n} subject(s) ({len(fixed)} gold): too few for a "
                        f"train/val/test split by subject") from None
    out = {int(s): "train" for s in train}
    out.update({int(s): "val" for s in val})
    out.update({int(s): "test" for s in [*test, *fixed]})
    return out
