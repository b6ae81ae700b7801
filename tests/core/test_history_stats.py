"""The loss history's window statistics: the Python path (a few positions, one by one) and the numpy
path (many at once) give the same numbers, which are numpy's median and q90 (to rounding: both paths
interpolate as ``a + t (b - a)``)."""
from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from boundguard import history
from boundguard.history import centre_spread

losses = st.lists(st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False), min_size=2, max_size=120)


def _reference(seq: list[float], p: int, size: int) -> tuple[float, float]:
    w = np.asarray(seq[max(0, p - size): p], dtype=np.float64)
    sd = np.quantile(np.abs(np.diff(w)), 0.9) / history._DIFF_Q90 if w.size >= 2 else 0.0
    return float(np.median(w)), float(sd)


@settings(max_examples=200, deadline=None)
@given(losses, st.integers(1, 60), st.data())
def test_python_and_numpy_paths_agree_with_numpy_median_and_quantile(seq, size, data):
    pos = data.draw(st.lists(st.integers(1, len(seq) - 1), min_size=1, max_size=30))
    few = [centre_spread(seq, [p], size) for p in pos]  # one position at a time: the Python path
    many_m, many_d = centre_spread(seq, pos * (history._FEW + 1), size)  # enough positions for numpy
    for j, (p, (m, d)) in enumerate(zip(pos, few)):
        want_m, want_d = _reference(seq, p, size)
        assert m[0] == many_m[j] and d[0] == many_d[j]
        np.testing.assert_allclose([m[0], d[0]], [want_m, want_d], rtol=1e-12, atol=1e-9)


def test_spread_off_is_zero_and_short_windows_use_what_there_is():
    seq = [3.0, 1.0, 2.0, 10.0]
    assert centre_spread(seq, [1, 3], 50, spread=False) == ([3.0, 2.0], [0.0, 0.0])
    m, d = centre_spread(seq, [3] * (history._FEW + 1), 2, spread=False)
    assert m == [1.5] * (history._FEW + 1) and d == [0.0] * (history._FEW + 1)


@given(st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=40))
def test_median_is_numpys(xs):
    assert history._median(xs) == float(np.median(xs))
