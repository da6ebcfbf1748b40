"""One circuit breaker per host, shared by everything in the process that fetches.

pybreaker supplies the state machine (closed → open after ``fail_max``
consecutive failures → half-open after ``reset_timeout`` → closed on a
successful probe). Its own async support is Tornado-based, and wrapping an
awaited call in ``breaker.calling()`` would count a cancellation as a failure
and let every concurrent caller through in half-open. So the wrapper here
splits a request in two synchronous steps around the await:

* :meth:`HostBreaker.admit` before the request: raises :class:`BreakerOpen`
  while the breaker is open, and in half-open admits exactly one probe;
* :meth:`HostBreaker.record` after it: feeds success or failure through
  pybreaker's ``call`` so its transitions and listeners run unchanged.

Both steps run without awaiting, so on one event loop they are atomic.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import pybreaker
import structlog

from trawl.errors import BreakerOpen
from trawl.metrics import METRICS

__all__ = ["BreakerRegistry", "HostBreaker"]

log = structlog.get_logger("trawl.breakers")


class _Failure(Exception):
    """Stands in for a failed request when replaying its result into pybreaker."""


def _ok() -> None:
    return None


def _fail() -> None:
    raise _Failure


class _Listener(pybreaker.CircuitBreakerListener):
    def __init__(self, on_change: Callable[[str, str, str], None]) -> None:
        self._on_change = on_change

    def state_change(
        self,
        cb: pybreaker.CircuitBreaker,
        old_state: pybreaker.CircuitBreakerState | None,
        new_state: pybreaker.CircuitBreakerState,
    ) -> None:
        self._on_change(cb.name or "", old_state.name if old_state else "", new_state.name)


class HostBreaker:
    """The breaker of one host."""

    def __init__(
        self, host: str, fail_max: int, reset_timeout: float, on_change: Callable[[str, str, str], None]
    ) -> None:
        self.host = host
        self._cb = pybreaker.CircuitBreaker(
            fail_max=fail_max,
            reset_timeout=reset_timeout,
            name=host,
            throw_new_error_on_trip=False,
            listeners=[_Listener(on_change)],
        )
        self._probing = False

    @property
    def state(self) -> str:
        """``closed``, ``open`` or ``half-open``."""
        return str(self._cb.current_state)

    def _remaining(self) -> float:
        opened = self._cb._state_storage.opened_at
        if opened is None:
            return 0.0
        return max(0.0, self._cb.reset_timeout - (datetime.now(UTC) - opened).total_seconds())

    def admit(self, url: str) -> bool:
        """Let a request through, or raise BreakerOpen; True when it is the half-open probe."""
        state = self._cb.current_state
        if state == pybreaker.STATE_CLOSED:
            return False
        remaining = self._remaining() if state == pybreaker.STATE_OPEN else 0.0
        if remaining > 0:
            raise BreakerOpen(self.host, url, remaining)
        if self._probing:
            # One probe at a time; the others wait for its verdict rather than pile onto a sick host.
            raise BreakerOpen(self.host, url, min(1.0, self._cb.reset_timeout))
        self._probing = True
        if state == pybreaker.STATE_OPEN:
            # pybreaker would pass through half-open inside the probe's `record` only; enter it now, so the
            # state (and its gauge) says half-open while the probe is out.
            self._cb.half_open()
        return True

    def saved(self) -> dict[str, Any]:
        """The breaker as JSON, for another process to take over (:meth:`restore`)."""
        return {
            "state": self.state,
            "failures": self._cb.fail_counter,
            "open_s": self._remaining() if self.state == pybreaker.STATE_OPEN else None,
        }

    def restore(self, saved: Mapping[str, Any]) -> None:
        """Continue from another process's breaker of this host: its consecutive failures, and an open breaker's
        remaining time (a half-open one is open with nothing left: the next request is the probe)."""
        storage = self._cb._state_storage
        for _ in range(max(0, int(saved.get("failures", 0)) - self._cb.fail_counter)):
            storage.increment_counter()
        if saved.get("state") in (pybreaker.STATE_OPEN, pybreaker.STATE_HALF_OPEN) and self.state == "closed":
            self._cb.open()
            left = float(saved.get("open_s") or 0.0)
            storage.opened_at = datetime.now(UTC) - timedelta(seconds=max(0.0, self._cb.reset_timeout - left))

    def release(self, probe: bool) -> None:
        """End an admitted request that has no verdict (it was cancelled)."""
        if probe:
            self._probing = False

    def record(self, success: bool, probe: bool) -> None:
        """Feed a request's result to the state machine (and end the probe it was, if any)."""
        if probe:
            self._probing = False
        elif success and self._cb._state_storage.counter == 0 and self._cb.current_state == pybreaker.STATE_CLOSED:
            return  # a healthy host's success changes nothing: no lock, no pybreaker state call per request
        # A failure is counted by pybreaker as it re-raises; results arriving while open change nothing.
        with contextlib.suppress(_Failure, pybreaker.CircuitBreakerError):
            self._cb.call(_ok if success else _fail)


class BreakerRegistry:
    """The process's breakers, one per host, created on first use."""

    def __init__(self, fail_max: int, reset_timeout: float) -> None:
        self.fail_max = fail_max
        self.reset_timeout = reset_timeout
        self._breakers: dict[str, HostBreaker] = {}
        self.transitions: Counter[tuple[str, str]] = Counter()
        self.opened_at: dict[str, float] = {}

    def _changed(self, host: str, old: str, new: str) -> None:
        self.transitions[(host, new)] += 1
        if new == pybreaker.STATE_OPEN:
            self.opened_at[host] = time.monotonic()
        log.warning("breaker state changed", host=host, old=old, new=new)
        METRICS.breaker_changed(host, new)

    def get(self, host: str) -> HostBreaker:
        breaker = self._breakers.get(host)
        if breaker is None:
            breaker = self._breakers[host] = HostBreaker(host, self.fail_max, self.reset_timeout, self._changed)
            METRICS.breaker_added(host)  # the series exists from the first request
        return breaker

    def known(self, host: str) -> HostBreaker | None:
        """The host's breaker if a request made one (None: nothing learned of it here)."""
        return self._breakers.get(host)

    def states(self) -> dict[str, str]:
        """Every known host's breaker state."""
        return {host: b.state for host, b in self._breakers.items()}

    def trips(self, host: str | None = None) -> int:
        """How many times breakers opened (for one host, or in all)."""
        return sum(n for (h, state), n in self.transitions.items() if state == "open" and host in (None, h))
