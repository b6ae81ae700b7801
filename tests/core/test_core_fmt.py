"""boundguard.fmt: one number format, one strict-JSON spelling of non-finite floats (written the same in
every file, read back from files of any version), one rendering of a bounds record."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from boundguard import Alert, Bounds
from boundguard.fmt import bounds_text, g, json_default, json_float, jsonable, number
from boundguard.report import group_alerts, read_jsonl, read_stats
from boundguard.sinks import JsonLinesWriter
from boundguard.stats import COLUMNS, Snapshot, neutral_row


def strict(text):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")
    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("x,text", [(None, "-"), (0.0, "0"), (1 / 3, "0.3333"), (12345.0, "1.234e+04"),
                                    (math.nan, "nan"), (math.inf, "inf"), (-math.inf, "-inf"),
                                    (np.float32(0.5), "0.5")])
def test_g(x, text):
    assert g(x) == text


@pytest.mark.parametrize("x,out", [(1.5, 1.5), (None, None), (math.nan, "nan"), (math.inf, "inf"),
                                   (-math.inf, "-inf"), (3, 3.0)])
def test_json_float_and_number_round_trip(x, out):
    assert json_float(x) == out or (out is None and json_float(x) is None)
    back = number(json_float(x))
    assert (back is None and x is None) or back == x or (math.isnan(back) and math.isnan(x))


def test_number_reads_what_any_version_wrote():
    assert number(None) is None  # absent, or a NaN in a statistics log before this convention
    assert math.isnan(number("nan")) and number(" Infinity ") == math.inf and number("-inf") == -math.inf
    assert number(2) == 2.0 and isinstance(number(2), float)
    assert number(True) is None  # a bool is no number: skipped like an absent one
    for bad in ("x", [1], {}):
        with pytest.raises(ValueError):
            number(bad)


def test_jsonable_and_default_give_strict_json():
    o = {"a": [math.nan, (1.0, math.inf)], 2: {"b": -math.inf}, "c": "nan text", "d": None}
    assert strict(json.dumps(jsonable(o), allow_nan=False)) == {
        "a": ["nan", [1.0, "inf"]], "2": {"b": "-inf"}, "c": "nan text", "d": None}
    assert json.dumps([np.float32("nan"), np.int64(3), object], default=json_default).startswith('["nan", 3.0, "<')


def test_bounds_text_is_the_one_rendering():
    assert Bounds(0, 1).describe() == bounds_text({"lo": 0, "hi": 1}) == "[0, 1]"
    assert Bounds(-0.99999, 2.5).as_inferred().describe() == "[-0.99999, 2.5] (inferred from the targets and loss)"
    assert Bounds.distribution().describe() == "a distribution (rows in [0, 1] summing to 1)"
    assert bounds_text({"lo": "-inf", "hi": 0.0}) == "[-inf, 0]"
    for bad in ({"lo": "x", "hi": 1}, {"hi": 1}, "probability", None):
        with pytest.raises(ValueError):
            bounds_text(bad)


def test_every_file_spells_nan_the_same(tmp_path):
    """An alert's value and a statistic that are NaN are both "nan" on disk, and read back as NaN."""
    col = {c: i for i, c in enumerate(COLUMNS)}
    row = neutral_row()
    row[col["pred.min"]], row[col["pred.max"]], row[col["pred.finite"]] = math.nan, 1.0, 9
    snap = Snapshot.from_rows(row[None], {"pred": 10}, step=1, first_step=1)
    w = JsonLinesWriter(tmp_path / "stats.jsonl")
    w.write({"type": "stats", **snap.to_record()})
    w.close()
    a = JsonLinesWriter(tmp_path / "alerts.jsonl")
    a.write(Alert("nonfinite_output", "critical", 1, None, "fc", "m", "f", math.nan, 0.0).to_record())
    a.close()
    stats = strict((tmp_path / "stats.jsonl").read_text())
    alert = strict((tmp_path / "alerts.jsonl").read_text())
    assert stats["pred.min"] == alert["value"] == "nan"
    assert math.isnan(read_stats(tmp_path / "stats.jsonl").col("pred.min")[0])
    (group,), _ = group_alerts(read_jsonl(tmp_path / "alerts.jsonl").records)
    assert math.isnan(group.value)


def test_a_statistics_log_of_an_older_version_still_reads(tmp_path):
    """Before one convention the statistics log wrote a NaN as null: it reads as NaN, as before."""
    p = tmp_path / "stats.jsonl"
    p.write_text('{"schema":1,"type":"stats","step":1,"pred.n":10,"pred.min":null,"pred.max":"inf",'
                 '"bounds":{"lo":0,"hi":1,"kind":"interval","inferred":false}}\n')
    log = read_stats(p)
    assert math.isnan(log.col("pred.min")[0]) and log.col("pred.max")[0] == math.inf
