"""The ComBat baseline: per-feature location/scale harmonisation across settings (Johnson et al. 2007).

neuroCombat 0.2.12 (Fortin et al.; the ComBat that neuroHarmonize calls) with empirical-Bayes
priors, the setting as the batch and no covariates.  Why this package: neuroHarmonize 2.5.2 pins
numpy < 2 and pandas < 3 and inmoose 0.9.1 pulls anndata, which pins pandas < 3 (and builds
Cython extensions): either would downgrade this project's stack; neuroCombat needs only numpy and
pandas.  Its progress messages go to the log, not the terminal.
"""
from __future__ import annotations

import contextlib
import io
import logging

import numpy as np

log = logging.getLogger(__name__)


def combat(x: np.ndarray, setting: np.ndarray) -> np.ndarray:
    """[N, d] features harmonised across the ``setting`` [N] batches (each needs >= 2 rows)."""
    import pandas as pd
    from neuroCombat import neuroCombat

    x = np.asarray(x, dtype=np.float64)
    varying = x.std(axis=0) > 1e-12  # a constant feature (a dead ReLU unit) would divide by zero
    out_x = x.copy()
    if not varying.any():
        return out_x
    covars = pd.DataFrame({"batch": pd.Series(np.asarray(setting)).astype(str).to_numpy()})
    chatter = io.StringIO()
    with contextlib.redirect_stdout(chatter):
        out = neuroCombat(dat=x[:, varying].T, covars=covars, batch_col="batch")
    log.debug("neuroCombat: %s", chatter.getvalue().strip())
    out_x[:, varying] = np.asarray(out["data"], dtype=np.float64).T
    return out_x
