"""The constructor options shared by every adapter, validated once with errors that name the option."""
from __future__ import annotations

import difflib
import numbers
import os
from dataclasses import dataclass, fields
from pathlib import Path
from collections.abc import Mapping
from typing import Any, Literal, Optional, Union

from boundguard.bounds import Bounds, resolve_bounds
from boundguard.catalogue import BOUND_CODES, CATALOGUE, CODES
from boundguard.rules import default_rules

__all__ = ["Config", "ACTIONS", "OPTIONS", "Action"]

ACTIONS = ("log", "warn", "halt", "raise", "bound")
#: The type of ``on_violation`` and of the values of ``actions`` (LightningCLI and type checkers list the choices).
Action = Literal["log", "warn", "halt", "raise", "bound"]
#: Codes whose alerts are only ever ``info`` (never escalated): no action other than ``log`` can apply.
INFO_ONLY = frozenset(c for c, e in CATALOGUE.items() if e.severity == "info")


@dataclass
class Config:
    """Validated options. See the README's option table; adapters pass their keyword arguments here."""

    bounds: Any = "auto"  # a BoundsSpec as given; a Bounds, "auto" or None once validated
    on_violation: str = "warn"
    actions: Optional[Mapping[str, str]] = None
    check_every_n_steps: int = 50
    alerts_path: Union[str, os.PathLike, None] = None  # a Path once validated
    thresholds: Optional[dict[str, dict[str, float]]] = None
    input_key: Union[int, str, None] = None
    target_key: Union[int, str, None] = None
    output_key: Union[int, str, None] = None
    name: Optional[str] = None
    strict: bool = False

    @classmethod
    def from_options(cls, entry: str, options: dict[str, Any], *, accepted: Optional[tuple[str, ...]] = None) -> "Config":
        """Validate the keyword options an entry point (``watch()``, ``BoundGuard(...)``) was given.

        An unknown option raises a TypeError naming ``entry``, the option, the closest valid one, and
        every valid option; ``accepted`` narrows the valid options to those ``entry`` takes.

        Example:
            >>> Config.from_options("watch()", {"check_every": 10})
            Traceback (most recent call last):
            ...
            TypeError: watch() got an unknown option 'check_every' (did you mean 'check_every_n_steps'?); valid options: bounds, on_violation, actions, check_every_n_steps, alerts_path, thresholds, input_key, target_key, output_key, name, strict
        """
        valid = accepted or OPTIONS
        for name in options:
            if name not in valid:
                close = difflib.get_close_matches(str(name), valid, n=1, cutoff=0.5)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise TypeError(f"{entry} got an unknown option {name!r}{hint}; valid options: {', '.join(valid)}")
        return cls(**options)

    def __post_init__(self) -> None:
        self.bounds = resolve_bounds(self.bounds)
        _choice("on_violation", self.on_violation, ACTIONS)
        if self.actions is not None:
            if not isinstance(self.actions, dict):
                raise TypeError(f"actions must be a dict mapping alert codes to actions or None, got {type(self.actions).__name__}")
            for code, act in self.actions.items():
                if code not in CODES:
                    raise ValueError(f"actions has unknown alert code {code!r}; expected one of {list(CODES)}")
                _choice(f"actions[{code!r}]", act, ACTIONS)
                if code in INFO_ONLY and act != "log":
                    raise ValueError(f"actions[{code!r}] = {act!r} can never act: {code} alerts are info, and "
                                     f"actions apply to warnings and above; use 'log' or drop the entry")
                if act == "bound" and code not in BOUND_CODES:
                    raise ValueError(f"actions[{code!r}] = 'bound' can never act: a bounding activation answers "
                                     f"only {sorted(BOUND_CODES)}; choose one of "
                                     f"{[a for a in ACTIONS if a != 'bound']}")
            self.actions = dict(self.actions)
        n = self.check_every_n_steps
        if isinstance(n, bool) or not isinstance(n, numbers.Integral):  # (a numpy integer is one too)
            raise TypeError(f"check_every_n_steps must be an int >= 1, got {type(n).__name__} {n!r}")
        n = self.check_every_n_steps = int(n)
        if n < 1:
            raise ValueError(f"check_every_n_steps must be an int >= 1, got {n!r}")
        if self.alerts_path is not None:
            if not isinstance(self.alerts_path, (str, os.PathLike)):
                raise TypeError(f"alerts_path must be a file path or None, got {type(self.alerts_path).__name__} {self.alerts_path!r}")
            if str(self.alerts_path) == "":
                raise ValueError("alerts_path must be a file path or None, got an empty string")
            if "\x00" in os.fspath(self.alerts_path):
                raise ValueError(f"alerts_path must be a file path without NUL characters, got {self.alerts_path!r}")
            self.alerts_path = Path(self.alerts_path)
            if self.alerts_path.is_dir():
                raise ValueError(f"alerts_path must be a file path, got the directory {str(self.alerts_path)!r}")
        if self.thresholds is not None and not isinstance(self.thresholds, dict):
            raise TypeError(f"thresholds must be a dict like {{'loss_spike': {{'factor': 5}}}} or None, got {self.thresholds!r}")
        default_rules(self.thresholds)  # validates codes and keys
        for name in ("input_key", "target_key", "output_key"):
            v = getattr(self, name)
            if isinstance(v, numbers.Integral) and not isinstance(v, bool):  # (a numpy integer too)
                v = int(v)
                setattr(self, name, v)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, str))):
                what = "an output index (int), an output name or dict key (str)" if name == "output_key" \
                    else "a batch index (int), a dict key (str)"
                raise TypeError(f"{name} must be {what} or None, got {v!r}")
        if self.name is not None and (not isinstance(self.name, str) or not self.name.strip()):
            raise TypeError(f"name must be a non-empty str or None, got {self.name!r}")
        if not isinstance(self.strict, bool):
            raise TypeError(f"strict must be a bool, got {self.strict!r}")

    def action_for(self, code: str) -> str:
        return (self.actions or {}).get(code, self.on_violation)

    def describe(self) -> dict[str, Any]:
        """Plain values for a state key and the run record."""
        b = self.bounds
        return {
            "bounds": b.to_dict() if isinstance(b, Bounds) else b,
            "on_violation": self.on_violation,
            "actions": self.actions,
            "check_every_n_steps": self.check_every_n_steps,
            **({"name": self.name} if self.name is not None else {}),
        }


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


#: The options every adapter takes (the user-facing names, in the README's order).
OPTIONS: tuple[str, ...] = tuple(f.name for f in fields(Config))
