"""Unit conversions of chartevents values as MIMIC-IV stores them."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pandas as pd

from data_sharding.constants import ITEMID_TO_VARIABLE
from data_sharding.ehr import parse_values


def _events(rows):
    return pd.DataFrame(rows, columns=["itemid", "value", "valuenum", "valueuom"])


def test_fio2_percent_becomes_fraction_and_fraction_is_kept():
    counts: Counter = Counter()
    var, value = parse_values(
        _events([(223835, "50", 50.0, "%"), (223835, "0.4", 0.4, ""), (223835, "100", 100.0, "%")]),
        "chartevents", counts,
    )
    assert (var == ITEMID_TO_VARIABLE[223835]).all()
    np.testing.assert_allclose(value, [0.5, 0.4, 1.0])
    assert counts["FiO2 converted %->fraction"] == 2


def test_temperature_fahrenheit_and_gcs_text():
    counts: Counter = Counter()
    _, value = parse_values(
        _events([(223761, "98.6", 98.6, "°F"), (220739, "4 Spontaneously", np.nan, ""), (223900, "No Response-ETT", np.nan, "")]),
        "chartevents", counts,
    )
    np.testing.assert_allclose(value, [37.0, 4.0, 1.0], rtol=1e-6)
