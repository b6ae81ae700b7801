"""The run lifecycle every adapter shares: steps, the check cadence, judging, acting, state.

An adapter *measures* and *acts*; the :class:`Session` does everything in between:

- **Steps and cadence.** :meth:`Session.count_steps` counts training batches (from 1) and says when a
  check is due: at the first step and every ``check_every_n_steps``.
- **Judging.** At a check the adapter hands over its rows (one transfer from the device) and the
  element counts; :meth:`Session.check` builds the :class:`~boundguard.stats.Snapshot`, lets the
  :class:`~boundguard.monitor.Monitor` judge it, carries out the decisions and publishes the alerts.
- **Acting.** ``halt`` sets :attr:`Session.should_stop` (the adapter stops its loop); ``raise``
  releases the adapter's hooks, closes the files and raises :class:`~boundguard.BoundGuardError`;
  ``bound`` plans a :class:`~boundguard.surgery.BoundRecord` from the bounds in force (at most one per
  run, decided by the core) and asks the adapter to insert it (:meth:`Adapter.insert_bound`).
- **Several processes.** An adapter whose run has several ranks gives the session one collective,
  ``any_rank(flag) -> bool`` (:meth:`Session.join`); the session then owns the protocol:
  :meth:`Session.count_batch` counts every batch (also while switched off) and, before a scheduled check's
  collectives, has the ranks agree that the monitor is on everywhere (:meth:`Session.agreed`);
  :meth:`Session.settle_stop` decides the stop collectively at every scheduled check, so
  :attr:`Session.halted` is the same on every rank at every step; rank 0 alone writes files.
- **Safety.** :func:`guarded` wraps an adapter's hooks: an internal error switches the monitor off with
  one warning (:meth:`Session.disable`) and never reaches the user's training (``strict=True``
  re-raises, for tests).
- **State.** :meth:`Session.state_dict` / :meth:`Session.load_state_dict` round-trip alerts, history,
  inferred bounds, inserted bounds and the step; the adapter replays :attr:`Session.records` on resume.

The adapter interface is :class:`Adapter`: two methods. Read-only views for users are
:attr:`Session.alerts` and :attr:`Session.bounds_inserted` (copies) and :attr:`Session.alerts_path`.

Example:
    >>> import numpy as np
    >>> from boundguard.config import Config
    >>> from boundguard.stats import neutral_row
    >>> s = Session(Config(bounds=(0, 1), on_violation="log"), write=False)
    >>> s.count_steps()  # step 1 is always checked
    True
    >>> rows = neutral_row()[None].copy()
    >>> s.check(rows, {"pred": 0}, [False])
    []
    >>> s.step, s.count_steps(), s.step
    (1, False, 2)
"""
from __future__ import annotations

import functools
import math
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, TypeVar

import numpy as np

from boundguard.alerts import Alert, BoundGuardError
from boundguard.bounds import Bounds
from boundguard.catalogue import SOFTCAP_CODES
from boundguard.config import Config
from boundguard.fmt import BOUND_DIGITS, g
from boundguard.model_facts import LossInfo, ModelFacts
from boundguard.monitor import Decision, Monitor
from boundguard.sinks import above_progress_bars, logger, warn_user
from boundguard.stats import CountingPlan, Snapshot
from boundguard.surgery import BoundRecord, CannotBound, apply_record, plan_bound, plan_softcap

__all__ = ["Session", "Adapter", "SessionViews", "guarded", "DEFAULT_ALERTS_PATH"]

#: Where alerts go when neither ``alerts_path`` nor a logger's directory says otherwise.
DEFAULT_ALERTS_PATH = Path("boundguard") / "alerts.jsonl"


class Adapter(Protocol):
    """What a session asks of an adapter besides measuring."""

    def insert_bound(self, record: BoundRecord) -> BoundRecord:
        """Insert the planned bounding activation on the raw output that feeds the prediction and return
        the record placed (``record.at(module, path, ...)``); raise :class:`CannotBound` if impossible."""
        ...

    def release(self) -> None:
        """Remove every hook and wrapper from the model (the monitor stops; an inserted bound stays)."""
        ...


class SessionViews:
    """The read-only views every adapter gives its users, from its ``_session``."""

    _session: "Session"

    @property
    def alerts(self) -> list[Alert]:
        """Every alert so far, oldest first."""
        return self._session.alerts

    @property
    def bounds_inserted(self) -> list[dict]:
        """Records of the bounding activations inserted (copies; replayed on resume; see ``apply_bounds``)."""
        return self._session.bounds_inserted

    @property
    def alerts_path(self) -> Optional[Path]:
        """The alerts file in use (known once training has started)."""
        return self._session.alerts_path


F = TypeVar("F", bound=Callable[..., Any])


def guarded(method: F) -> F:
    """Wrap an adapter method (whose object has ``_session``): an internal error switches the monitor
    off instead of breaking training; ``BoundGuardError`` (``on_violation="raise"``) passes through."""

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        session: Session = self._session
        if session.disabled:
            return None
        try:
            return method(self, *args, **kwargs)
        except BoundGuardError:
            raise
        except Exception as err:
            if session.config.strict:
                raise
            session.disable(err)
            return None

    return wrapper  # type: ignore[return-value]


class Session:
    """One monitored run: the monitor, the step counter, the check cadence, actions and state."""

    def __init__(self, config: Config, adapter: Optional[Adapter] = None, *, write: bool = True) -> None:
        self.config = config
        self.adapter = adapter
        self.monitor = Monitor(config, write=write)
        self.step = 0  #: training batches seen so far
        self.epoch: Optional[int] = None
        self.interval_start = 1  #: first step of the interval the next check judges
        self.disabled = False
        self.should_stop = False  #: set by a ``halt`` decision; the adapter stops its loop
        self.last_snapshot: Optional[Snapshot] = None
        self._warned_error = False
        self._summary_printed = 0
        self._described = False
        self.batches = 0  #: training batches this process saw, counted even while switched off
        self._any_rank: Optional[Callable[[bool], bool]] = None  # the adapter's collective (several ranks)
        self._checking = False  # the batch in progress is a scheduled check
        self._off_everywhere = False
        self._halt = False  # the (collective) stop decided at the last check

    # ------------------------------------------------------------------ read-only views
    @property
    def alerts(self) -> list[Alert]:
        """Every alert so far, oldest first (a new list; the alerts are the recorded ones)."""
        return list(self.monitor.alerts)

    @property
    def bounds_inserted(self) -> list[dict]:
        """The inserted bounds as plain dicts (copies: changing one changes nothing the session replays)."""
        return [r.to_dict() for r in self.monitor.inserted]

    @property
    def records(self) -> list[BoundRecord]:
        """The inserted bounds, for the adapter to replay on a model (immutable records)."""
        return list(self.monitor.inserted)

    @property
    def alerts_path(self) -> Optional[Path]:
        return self.monitor.alerts_path

    @property
    def facts(self) -> ModelFacts:
        return self.monitor.facts

    @property
    def bounds(self) -> Optional[Bounds]:
        return self.monitor.bounds

    # ------------------------------------------------------------------ files
    def open(self, default_path: Optional[Path] = None, *, write: bool = True) -> None:
        """Open the alerts file once: ``alerts_path``, else ``default_path``, else :data:`DEFAULT_ALERTS_PATH`.
        ``write=False`` (a non-zero rank) keeps alerts in memory only."""
        if self.monitor.alerts_path is not None:
            return
        path = Path(self.config.alerts_path) if self.config.alerts_path else (default_path or DEFAULT_ALERTS_PATH)
        self.monitor.write = self.monitor.write and write
        self.monitor.open_files(path)

    # ------------------------------------------------------------------ cadence
    def is_check_step(self, step: int) -> bool:
        """Statistics are judged at the first step and every ``check_every_n_steps``."""
        return step == 1 or step % self.config.check_every_n_steps == 0

    def count_steps(self, n: int = 1, epoch: Optional[int] = None) -> bool:
        """Count ``n`` finished training batches; True when a check is due (a check step was reached or,
        for ``n`` > 1 such as Keras' ``steps_per_execution``, passed)."""
        prev = self.step
        self.step += max(1, int(n))
        if epoch is not None:
            self.epoch = epoch
        every = self.config.check_every_n_steps
        return prev == 0 or self.step // every > prev // every

    def set_epoch(self, epoch: Optional[int]) -> None:
        """The epoch in progress (alerts carry it)."""
        self.epoch = epoch

    def restart_interval(self) -> None:
        """Forget the steps not yet judged: the next check judges from the next step on (the step counter
        was restored, or a new fit starts)."""
        self.interval_start = self.step + 1

    def begin_fit(self) -> None:
        """A new fit with the same monitor: a halt decided in an earlier one does not carry over."""
        self.should_stop = self._halt = False

    def refuse(self, message: str) -> None:
        """The adapter cannot monitor this run at all (an unsupported backend, say): switched off with one
        warning saying why; training goes on untouched."""
        self.disabled = True
        warn_user(message)

    # ------------------------------------------------------------------ several processes
    def join(self, any_rank: Optional[Callable[[bool], bool]]) -> None:
        """Run as one rank of several: ``any_rank(flag)`` is a collective that is True when ``flag`` is True
        on any rank (Lightning's ``strategy.reduce_boolean_decision(flag, all=False)``, or one all-reduce of
        one element). ``None``: a single process."""
        self._any_rank = any_rank

    @property
    def distributed(self) -> bool:
        """Several ranks run this training (see :meth:`join`)."""
        return self._any_rank is not None

    @property
    def halted(self) -> bool:
        """Training should stop: an alert decided ``halt`` (with several ranks, decided together at each
        check, so the same on every rank at every step)."""
        return self._halt if self._any_rank is not None else self.should_stop

    def count_batch(self) -> bool:
        """Count one training batch, also while switched off (so every rank keeps the same check schedule).
        Returns whether the monitor does this batch's work: with several ranks, at a scheduled check, every
        rank first agrees that the monitor is still on everywhere (:meth:`agreed`)."""
        self.batches += 1
        self._checking = self.is_check_step(self.batches)
        if self._any_rank is not None and self._checking:
            return self.agreed()
        return not self.disabled

    def settle_stop(self) -> bool:
        """After the batch's work (and its check, if one was due): decide the stop; with several ranks
        together, at every scheduled check, whatever this rank's monitor did, so the collectives stay
        matched. Returns whether this batch was a check (a scheduled one, or on one process the NaN
        tripwire's)."""
        snap = self.last_snapshot
        checked = self._checking or (snap is not None and snap.step == self.step)
        if checked:
            stop = self.should_stop
            self._halt = self._any_rank(stop) if self._any_rank is not None else stop
        return checked

    def agreed(self) -> bool:
        """With several ranks, before a check's collectives: is the monitor still on everywhere? A rank
        that switched itself off (an internal error) still takes part in this one collective, so no rank
        waits for ever in a collective another skipped; then every rank switches off together. Call it on
        every rank at the same steps (:meth:`count_batch` and the final check do)."""
        if self._any_rank is None:
            return not self.disabled
        if self._off_everywhere:
            return False
        if self._any_rank(self.disabled):
            self._off_everywhere = True
            if not self.disabled:
                self.disable(RuntimeError("another rank's monitor hit an internal error; switched off on every "
                                          "rank so that the ranks' collectives stay matched"))
            return False
        return True

    # ------------------------------------------------------------------ facts
    def set_facts(self, facts: ModelFacts) -> None:
        """What the probe found; an inserted bound (restored from a checkpoint) stays the activation."""
        for record in self.monitor.inserted:
            apply_record(facts, record)
        self.monitor.set_facts(facts)

    def observe_targets(self, tmin: float, tmax: float, *, onehot: bool = False) -> None:
        self.monitor.observe_targets(tmin, tmax, onehot=onehot)

    def counting_plan(self, provisional_loss: Optional[LossInfo] = None,
                      facts: Optional[ModelFacts] = None) -> CountingPlan:
        """What the device should count now. ``provisional_loss``: before the first targets are seen
        (``bounds="auto"``), count against the bounds that loss implies (probability losses). ``facts``:
        what an adapter knows before its facts are final (Keras: the activation found at install, before
        the first check); default the session's facts."""
        b = self.bounds
        if b is None and self.config.bounds == "auto" and provisional_loss is not None \
                and provisional_loss.family in ("probability", "logits"):
            b = Bounds.distribution() if provisional_loss.multiclass else Bounds.probability()
        return CountingPlan.of(b, self.facts if facts is None else facts)

    def note(self, key: str, message: str, fix: str, step: Optional[int] = None) -> Optional[Alert]:
        """A one-time ``probe_incomplete`` info alert: something was not found, and the option that fixes it.
        ``step`` defaults to the current step (the step being trained, when called mid-step)."""
        return self.monitor.note(key, message, fix, step=step if step is not None else max(self.step, 1),
                                 epoch=self.epoch)

    # ------------------------------------------------------------------ judging and acting
    def check(self, rows: np.ndarray, counts: dict[str, int], loss_seen: Any,
              losses: Optional[np.ndarray] = None, *, act: bool = True) -> list[Decision]:
        """Judge the interval ending at the current step and carry out the decisions (``rows``, ``losses``:
        see :meth:`~boundguard.stats.Snapshot.from_rows`). ``act=False``: the run is unwinding from an
        exception (a crashed step): the alerts are recorded, marked ``during_exception`` and warned about,
        and no action (halt, raise, bound) is taken.

        Returns the decisions (alerts new or escalated at this check). Raises
        :class:`~boundguard.BoundGuardError` for a ``raise`` decision, after publishing every alert.
        """
        snap = Snapshot.from_rows(rows, counts, step=self.step, first_step=self.interval_start,
                                  epoch=self.epoch, loss_seen=loss_seen, losses=losses)
        self.interval_start = self.step + 1
        self.last_snapshot = snap
        decisions = self.monitor.judge(snap)
        if not act:
            for d in decisions:
                d.alert.details["during_exception"] = True
                if d.action in ("halt", "raise", "bound"):
                    d.action = d.alert.action = "warn"
            self.monitor.publish(decisions)
            return decisions
        if not self._described:  # the first check: say in words what is watched
            self._described = True
            logger.info("%s", self.facts.describe(self.bounds))
        inserted = [msg for d in decisions if d.action == "bound" for msg in [self._bound(d)] if msg]
        self.monitor.publish(decisions)
        for msg in inserted:  # after the alerts that caused it
            warn_user(msg)
            logger.warning(msg)
        for d in decisions:
            if d.action == "halt":
                self.should_stop = True
            elif d.action == "raise":
                self._release()
                self.monitor.finish()
                raise BoundGuardError(d.alert)
        return decisions

    def _bound(self, d: Decision) -> Optional[str]:
        """Plan the bound, have the adapter insert it, record it; returns the message to show, or None
        (the decision became ``warn`` with a note saying why)."""
        cap = d.alert.details.get("cap") if d.alert.code in SOFTCAP_CODES else None
        plan = plan_softcap(cap, self.step) if cap is not None else plan_bound(self.bounds, self.step)
        try:
            if plan is None:
                raise CannotBound(f"on_violation='bound' cannot bound to "
                                  f"{self.bounds.describe() if self.bounds else 'no bounds'} (not finite).",
                                  "Declare finite bounds=(lo, hi).")
            if self.adapter is None:
                raise CannotBound("on_violation='bound' has no model to insert a bound into.")
            rec = self.adapter.insert_bound(plan)
        except CannotBound as why:
            d.action = d.alert.action = "warn"
            self.note("bound", str(why), why.fix)
            return None
        self.monitor.record_bound(rec)
        d.alert.details["inserted"] = rec.to_dict()
        b = self.bounds
        if rec.kind == "softcap":
            cap = g(rec.hi, BOUND_DIGITS)  # (a bound is shown as it is: fmt.bounds_text)
            return (f"boundguard inserted a soft cap {cap} * tanh(z / {cap}) on the logits of "
                    f"{rec.module or 'the model'} at step {self.step}: the loss now reads logits within "
                    f"(-{cap}, {cap}).")
        return (f"boundguard inserted {rec.kind} on the output of {rec.module or 'the model'} at step {self.step}: "
                f"predictions are now in {b.describe() if b else '[lo, hi]'}.")

    # ------------------------------------------------------------------ switching off
    def disable(self, error: BaseException) -> None:
        """Switch the monitor off after an internal error: one warning, the adapter's hooks removed,
        training untouched. Alerts recorded so far stay readable."""
        self.disabled = True
        self._release()
        if not self._warned_error:
            self._warned_error = True
            warn_user(f"boundguard hit an internal error and switched itself off; training goes on "
                      f"unmonitored: {type(error).__name__}: {error}")

    def _release(self) -> None:
        if self.adapter is None:
            return
        try:
            self.adapter.release()
        except Exception as err:  # never break the user's run while cleaning up
            if self.config.strict:
                raise
            if not self._warned_error:
                self._warned_error = True
                warnings.warn(f"boundguard could not remove its hooks: {type(err).__name__}: {err}",
                              RuntimeWarning, stacklevel=2)

    def finish(self) -> None:
        """Write the summary records, close the files, and print the end-of-run table on stderr when the
        run raised alerts of severity warning or above (once; rank 0 only). Idempotent."""
        self.monitor.finish()
        alerts = self.monitor.alerts
        loud = any(a.severity != "info" for a in alerts)
        if loud and self.monitor.write and self._summary_printed != len(alerts):
            self._summary_printed = len(alerts)
            with above_progress_bars():
                print(self.monitor.summary(), file=sys.stderr)

    def close(self) -> None:
        """End of a run: release the adapter (an error while removing its hooks warns, never reaches the
        user's run; ``strict=True`` re-raises) and :meth:`finish`. Idempotent."""
        self._release()
        self.finish()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"monitor": self.monitor.state_dict(), "step": self.step, "config": self.config.describe()}

    def load_state_dict(self, state: dict[str, Any]) -> list[BoundRecord]:
        """Restore a saved state; returns the inserted bounds the adapter must replay on its model."""
        if not isinstance(state, dict):
            raise TypeError(f"load_state_dict needs the dict from state_dict(), got {type(state).__name__}")
        self.monitor.load_state_dict(state.get("monitor", {}))
        step = state.get("step", 0)
        self.step = int(step) if isinstance(step, (int, float)) and math.isfinite(step) else 0
        self.interval_start = self.step + 1
        self.batches = self.step  # the ranks' check schedule resumes with the restored step
        return self.records
