"""A planted technical factor: how each AP film was taken (``dipro synth --acquisition-shift S``).

ICU films are taken erect or recumbent; in MIMIC the recumbent (supine) portable film is the
sicker patient's film, so the setting correlates with the outcome and a model can learn the
acquisition instead of the disease.  With ``S > 0`` the generator plants exactly that:

* **setting per film** (:func:`draw_settings`): every AP film of a stay is ``Recumbent`` with
  probability ``0.2 + 0.55 * sickness`` (``sickness`` = the stay's pre-death drift scaled to [0, 1],
  so ~0.26 for most survivors and 0.45-0.75 for most deaths), else ``Erect``; PA and lateral films are
  erect.  Stays mix both settings, so a stay often has films in two settings hours apart (the
  pairs ``dipro harmonize`` fits on).  Written to ``PatientOrientationCodeSequence_CodeMeaning``.
* **pixels** (:func:`apply_setting`): a gamma on the whole film, ``1 + S (m + 0.25 z)`` with ``z`` a
  per-film standard normal (the exposure technique varies from film to film) and ``m`` = 0.5 for a
  recumbent film, 0 for an erect one (so recumbent films have darker mid-tones on average: lungs
  lose more than bone), clipped at 0.4; recumbent films also get extra Gaussian noise of sd
  ``3 S`` gray.  A gamma is not affine, so the loader's per-region contrast/brightness jitter
  (``dipro/data/augment.py``) cannot undo it, and noise cannot be undone at all.

The draws come from their own seeded streams (``SeedSequence([seed, 7])`` for the settings,
``[seed, 8, film]`` for the noise), so the rest of the cohort is drawn exactly as without the
factor; ``S = 0`` draws nothing and writes what the generator always wrote (byte-identical files).
"""
from __future__ import annotations

import numpy as np

ERECT, RECUMBENT = "Erect", "Recumbent"
SETTINGS = (ERECT, RECUMBENT)
RECUMBENT_BASE_P = 0.2
RECUMBENT_SICKNESS_P = 0.55
GAMMA_PER_SHIFT = {ERECT: 0.0, RECUMBENT: 0.5}
"""Mean of the gamma's excess over 1, per unit of shift, by setting."""
GAMMA_SPREAD = 0.25
"""Per-film standard deviation of that excess (per unit of shift): the exposure varies."""
MIN_GAMMA = 0.4
NOISE_SD_PER_SHIFT = 3.0
MAX_SHIFT = 4.0


def recumbent_probability(drift: float) -> float:
    """P(Recumbent) of an AP film of a stay with pre-death drift ``drift`` (0 .. 1.4, see ``cohort._new_stay``)."""
    sickness = float(np.clip(drift / 1.4, 0.0, 1.0))
    return RECUMBENT_BASE_P + RECUMBENT_SICKNESS_P * sickness


def draw_settings(cohort, seed: int) -> dict[int, str]:
    """Film index -> setting for every film of ``cohort`` (AP films of a stay drawn; the rest erect)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 7]))
    out: dict[int, str] = {}
    for film in cohort.films:
        if film.view == "AP" and film.stay_index is not None:
            p = recumbent_probability(cohort.stays[film.stay_index].drift)
            out[film.index] = RECUMBENT if rng.random() < p else ERECT
        else:
            out[film.index] = ERECT
    return out


def apply_setting(pixels: np.ndarray, setting: str, shift: float, seed: int, film_index: int) -> np.ndarray:
    """The film as taken in ``setting`` (see module doc); ``shift`` 0 returns it unchanged."""
    if shift <= 0:
        return pixels
    rng = np.random.default_rng(np.random.SeedSequence([seed, 8, film_index]))
    gamma = max(MIN_GAMMA, 1.0 + shift * (GAMMA_PER_SHIFT[setting] + GAMMA_SPREAD * float(rng.standard_normal())))
    x = pixels.astype(np.float32) / 255.0
    y = 255.0 * np.power(x, gamma)
    if setting == RECUMBENT:
        y += NOISE_SD_PER_SHIFT * shift * rng.standard_normal(size=y.shape, dtype=np.float32)
    return np.clip(np.rint(y), 0, 255).astype(np.uint8)
