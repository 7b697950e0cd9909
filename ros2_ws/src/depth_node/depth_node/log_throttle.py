"""The per-kind throttle that keeps a flood of bad input from flooding the node's log. No rclpy."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

WARN_PERIOD_S = 2.0  # log lines of one kind are logged at most once per period


class Throttle:
    """At most one log line per kind per `period` seconds; the next one logged says how many were held back.

    Args:
        period: seconds between two lines of one kind.
        clock: monotonic seconds (time.monotonic; tests pass their own).
    """

    def __init__(self, period: float = WARN_PERIOD_S, clock: Callable[[], float] = time.monotonic):
        self.period = period
        self._clock = clock
        self._last: dict[str, tuple[float, int]] = {}  # kind -> (time logged, lines held back since)

    def __call__(self, kind: str, message: str) -> str | None:
        """The message to log now (with the held-back count), or None to hold it back."""
        now = self._clock()
        logged, held = self._last.get(kind, (-math.inf, 0))
        if now - logged < self.period:
            self._last[kind] = (logged, held + 1)
            return None
        self._last[kind] = (now, 0)
        return f"{message} (+{held} similar in the last {now - logged:.1f} s)" if held else message
