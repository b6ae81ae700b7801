"""Targets the loss ignores (``ignore_index``) are not targets: the void label 255 of Pascal VOC-style
segmentation masks with ``CrossEntropyLoss(ignore_index=255)`` raises no ``target_out_of_range``; class
indices past the classes that the loss does not ignore still do."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from boundguard.integrations.torch import watch
from torch import nn

from boundguard.alerts import severity_rank


def _seg_batches(steps: int, void: int, classes: int = 3):
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randn(4, 2, 8, 8, generator=g)
        y = (x[:, 0] > 0).long() + (x[:, 1] > 1).long()  # 0..2
        y[:, :2, :] = void  # a void border, as VOC masks have
        yield x, y


@pytest.mark.parametrize("every", [1, 3])
def test_void_label_255_is_not_a_class(tmp_path, every):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loss_fn = nn.CrossEntropyLoss(ignore_index=255)
    with watch(model, alerts_path=tmp_path / "a.jsonl", check_every_n_steps=every) as guard:
        for x, y in _seg_batches(6, void=255):
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            guard.step(loss=loss, inputs=x, targets=y)
            opt.zero_grad()
    assert guard.engine.session.facts.target_ignore == 255
    loud = [a for a in guard.alerts if severity_rank(a.severity) >= severity_rank("warning")]
    assert loud == [], loud
    assert guard.engine.last_snapshot.values["target.max"] == 2  # the void pixels left out


def test_labels_past_the_classes_still_fire(tmp_path):
    """The same model with labels 1..3 for 3 classes (ignore_index=255 covers none of them): the loss refuses
    label 3, and boundguard explains why."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 1))
    with pytest.raises((IndexError, RuntimeError)):
        with watch(model, alerts_path=tmp_path / "a.jsonl") as guard:
            for x, y in _seg_batches(2, void=255):
                y = torch.where(y == 255, 0, y) + 1  # labels 1..3, no void
                loss = F.cross_entropy(model(x), y, ignore_index=255)
                loss.backward()
                guard.step(loss=loss, inputs=x, targets=y)
    assert "target_out_of_range" in {a.code for a in guard.alerts}, guard.alerts
