"""The constructor options shared by every adapter, validated once with errors that name the option."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from boundguard.bounds import Bounds, resolve_bounds
from boundguard.catalogue import CODES
from boundguard.rules import default_rules

__all__ = ["Config", "ACTIONS"]

ACTIONS = ("log", "warn", "halt", "raise", "bound")


@dataclass
class Config:
    """Validated options. See the README's option table; adapters pass their keyword arguments here."""

    bounds: Union[Bounds, str, None] = "auto"
    on_violation: str = "warn"
    actions: Optional[dict[str, str]] = None
    check_every_n_steps: int = 50
    alerts_path: Optional[Path] = None
    thresholds: Optional[dict[str, dict[str, float]]] = None
    input_key: Union[int, str, None] = None
    target_key: Union[int, str, None] = None
    strict: bool = False
    extra: dict = field(default_factory=dict)

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
            self.actions = dict(self.actions)
        n = self.check_every_n_steps
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"check_every_n_steps must be an int >= 1, got {type(n).__name__} {n!r}")
        if n < 1:
            raise ValueError(f"check_every_n_steps must be an int >= 1, got {n!r}")
        if self.alerts_path is not None:
            if not isinstance(self.alerts_path, (str, os.PathLike)):
                raise TypeError(f"alerts_path must be a file path or None, got {type(self.alerts_path).__name__} {self.alerts_path!r}")
            if str(self.alerts_path) == "":
                raise ValueError("alerts_path must be a file path or None, got an empty string")
            self.alerts_path = Path(self.alerts_path)
            if self.alerts_path.is_dir():
                raise ValueError(f"alerts_path must be a file path, got the directory {str(self.alerts_path)!r}")
        if self.thresholds is not None and not isinstance(self.thresholds, dict):
            raise TypeError(f"thresholds must be a dict like {{'loss_spike': {{'factor': 5}}}} or None, got {self.thresholds!r}")
        default_rules(self.thresholds)  # validates codes and keys
        for name in ("input_key", "target_key"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, str))):
                raise TypeError(f"{name} must be a batch index (int), a dict key (str) or None, got {v!r}")
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
        }


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")
