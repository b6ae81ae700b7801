"""How boundguard writes numbers: in text, in strict JSON, and the bounds a record holds.

One convention for the files (alerts, statistics log, ``boundguard report --format json``): a value that
is absent is ``null``; a non-finite float is the string ``"nan"``, ``"inf"`` or ``"-inf"``, so every line
stays strict JSON and a NaN is not mistaken for a missing value. :func:`number` reads both that and what
older versions wrote (the statistics log wrote a NaN as ``null``).

Example:
    >>> g(2 / 3), g(float("nan")), g(None), g(1e21)
    ('0.6667', 'nan', '-', '1e+21')
    >>> json_float(float("-inf")), number("-inf"), number(None)
    ('-inf', -inf, None)
    >>> bounds_text({"lo": 0, "hi": "inf", "kind": "interval", "inferred": True})
    '[0, inf] (inferred from the targets and loss)'
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Optional, Union

__all__ = ["g", "json_float", "jsonable", "json_default", "number", "bounds_text", "md_cell", "BOUND_DIGITS"]

#: Significant digits of a bound in text: a declared bound is shown as given (0.99999 is not "1").
BOUND_DIGITS = 6

_SPELLED = {"nan": math.nan, "inf": math.inf, "+inf": math.inf, "-inf": -math.inf,
            "infinity": math.inf, "+infinity": math.inf, "-infinity": -math.inf}


def g(x: Optional[float], digits: int = 4) -> str:
    """A number for a message or a table: ``digits`` significant digits, ``nan``/``inf``/``-inf`` spelled,
    ``None`` as ``-``."""
    if x is None:
        return "-"
    return f"{float(x):.{digits}g}"


def json_float(x: Optional[float]) -> Union[float, str, None]:
    """``x`` for strict JSON: a finite float as it is, NaN/Inf as ``"nan"``/``"inf"``/``"-inf"``, None as None."""
    if x is None:
        return None
    x = float(x)
    if x - x == 0.0:  # finite (inf - inf and nan - nan are NaN)
        return x
    return "nan" if x != x else ("inf" if x > 0 else "-inf")


def jsonable(o: Any) -> Any:
    """``o`` with every non-finite float inside it (dict values, list and tuple items) spelled as
    :func:`json_float` spells it, and dict keys as text."""
    if isinstance(o, float):
        return json_float(o)
    if isinstance(o, Mapping):
        return {str(k): jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [jsonable(v) for v in o]
    return o


def json_default(o: Any) -> Any:
    """The ``default=`` of ``json.dumps``: a number JSON does not know (a numpy scalar, a 0-d tensor) as a
    float spelled by :func:`json_float`; anything else as its ``str``."""
    try:
        return json_float(float(o))
    except (TypeError, ValueError):
        return str(o)


def number(x: Any) -> Optional[float]:
    """Read a number written by any version: a JSON number, ``None`` (absent, or an older NaN) or a spelled
    non-finite value. Raises ``ValueError`` for anything else (a bool, other text)."""
    if x is None or isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return float(x)
    if isinstance(x, str) and x.strip().lower() in _SPELLED:
        return _SPELLED[x.strip().lower()]
    raise ValueError(f"not a number: {x!r}")


def bounds_text(b: Mapping) -> str:
    """A bounds record (:meth:`boundguard.Bounds.to_dict`, as the files hold it) in words. Raises
    ``ValueError`` when the record cannot be read.

    >>> bounds_text({"kind": "distribution", "lo": 0, "hi": 1})
    'a distribution (rows in [0, 1] summing to 1)'
    """
    if not isinstance(b, Mapping):
        raise ValueError(f"not a bounds record: {b!r}")
    if b.get("kind") == "distribution":
        text = "a distribution (rows in [0, 1] summing to 1)"
    else:
        lo, hi = number(b.get("lo")), number(b.get("hi"))
        if lo is None or hi is None:
            raise ValueError(f"a bounds record without lo and hi: {dict(b)!r}")
        text = f"[{g(lo, BOUND_DIGITS)}, {g(hi, BOUND_DIGITS)}]"
    return text + (" (inferred from the targets and loss)" if b.get("inferred") else "")


def md_cell(text: str) -> str:
    r"""One Markdown table cell: on one line, with ``|`` and ``\`` escaped.

    >>> md_cell("a | b\n  c")
    'a \\| b c'
    """
    return " ".join(str(text).split()).replace("\\", "\\\\").replace("|", "\\|")
