"""The Lightning callback on the shared session: the end of a run is judged, options are passed by
name, and the metrics logged at a check are that check's."""
from __future__ import annotations

import numpy as np
from boundguard.integrations.lightning import BoundGuard

import torch
from conftest import Tiny, data, fit


def test_nan_inputs_in_the_last_batches_are_seen_at_the_end_of_training(tmp_path):
    """Batches 61-64 of 64 hold NaN inputs; checks are at steps 1 and 50: the final check sees them."""
    x, y = data(n=64 * 32, kind="binary")
    x[60 * 32:, 0] = np.nan
    g = BoundGuard(bounds=(0, 1), on_violation="log", alerts_path=tmp_path / "alerts.jsonl")
    model = Tiny(head=torch.nn.Sigmoid())
    fit(model, x, y, g, max_steps=64)
    (alert,) = [a for a in g.alerts if a.code == "nonfinite_input"]
    assert alert.step == 64 and alert.severity == "critical"


def test_options_reach_the_config_by_name(tmp_path):
    g = BoundGuard(bounds="probability", on_violation="halt", actions={"nonfinite_loss": "raise"},
                   check_every_n_steps=7, alerts_path=tmp_path / "a.jsonl", input_key=0, target_key=1)
    c = g._config
    assert (c.on_violation, c.actions, c.check_every_n_steps, c.input_key, c.target_key) == (
        "halt", {"nonfinite_loss": "raise"}, 7, 0, 1)
    assert (c.bounds.lo, c.bounds.hi) == (0.0, 1.0)
