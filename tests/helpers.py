"""Helpers shared by the PyTorch adapters' tests (plain loop, Lightning, Fabric, the Trainer).

Imported as ``from helpers import ...``: pytest puts this folder on ``sys.path`` when it loads the root
``conftest.py`` (the default ``prepend`` import mode, no ``__init__.py`` files). The ``one_thread`` fixture
is in that ``conftest.py``.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from boundguard.alerts import severity_rank
from boundguard.config import OPTIONS
from boundguard.integrations.torch.bounding import BoundHook
from boundguard.integrations.torch.hooks import INERT

#: The severities a healthy run must never raise.
SEVERE = {"warning", "error", "critical"}


def severe(alerts) -> set[str]:
    """The codes of the alerts of severity warning or above."""
    return {a.code for a in alerts if a.severity in SEVERE}


def loud(alerts) -> list:
    """The alerts of severity warning or above."""
    return [a for a in alerts if severity_rank(a.severity) >= severity_rank("warning")]


def codes_at(alerts, step: int) -> set[str]:
    return {a.code for a in alerts if a.step == step}


def hooks_of(model: nn.Module) -> list:
    """Every forward (pre-)hook on every module of ``model``."""
    out = []
    for m in model.modules():
        out += list(m._forward_hooks.values()) + list(m._forward_pre_hooks.values())
    return out


def live_hooks(model: nn.Module) -> list:
    """The hooks of ``model`` that are neither an inert boundguard hook nor an inserted bound."""
    return [h for h in hooks_of(model) if h is not INERT and not isinstance(h, BoundHook)]


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def assert_teaches_options(make, entry: str) -> None:
    """``make(**options)`` (an entry point that takes Config's options and ``log_stats``) refuses an unknown
    option with the teaching message: the entry point, the option, the closest match and every valid option,
    as ``watch()`` says it; not Python's "__init__() got an unexpected keyword argument"."""
    with pytest.raises(TypeError) as info:
        make(check_every=10)
    assert str(info.value) == (f"{entry}() got an unknown option 'check_every' (did you mean "
                               f"'check_every_n_steps'?); valid options: {', '.join(OPTIONS)}, log_stats")
    with pytest.raises(TypeError, match=r"unknown option 'log_stat' \(did you mean 'log_stats'\?\)"):
        make(log_stat=False)


#: The end of a multi-process script whose ranks have written their results: leave the process group
#: (a barrier first, so no rank leaves while another still needs it) and skip the interpreter's teardown.
#: gloo threads still joinable in a C++ destructor at exit abort a rank now and then, under load, with
#: "terminate called without an active exception", after all its work is done.
RANK_EXIT = '''
import os as _os, sys as _sys
import torch.distributed as _dist
if _dist.is_available() and _dist.is_initialized():
    _dist.barrier()
    _dist.destroy_process_group()
_sys.stdout.flush()
_sys.stderr.flush()
_os._exit(0)
'''
