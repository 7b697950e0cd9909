"""How frames flow from the ROS callbacks to the node's worker: the keep-latest hand-over, the frame counters, and
the per-kind throttle that keeps a flood of bad input from flooding the log. No rclpy.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass

WARN_PERIOD_S = 2.0  # log lines of one kind are logged at most once per period


class FrameSlot:
    """Keep-latest hand-over from the subscription callback to the worker: one waiting frame at most."""

    def __init__(self):
        self._item = None
        self._closed = False
        self._cond = threading.Condition()

    def put(self, item) -> bool:
        """Offer a frame; True when it replaced one the worker had not taken yet (a dropped frame)."""
        with self._cond:
            replaced = self._item is not None
            self._item = item
            self._cond.notify()
            return replaced

    def take(self, timeout: float):
        """The waiting frame, or None after `timeout` seconds or once closed."""
        with self._cond:
            self._cond.wait_for(lambda: self._item is not None or self._closed, timeout=timeout)
            item, self._item = self._item, None
            return item

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class Throttle:
    """At most one log line per kind per `period` seconds; the next one logged says how many were held back."""

    def __init__(self, period: float = WARN_PERIOD_S):
        self.period = period
        self._last: dict[str, tuple[float, int]] = {}  # kind -> (time logged, lines held back since)

    def __call__(self, kind: str, message: str) -> str | None:
        """The message to log now (with the held-back count), or None to hold it back."""
        now = time.monotonic()
        logged, held = self._last.get(kind, (-math.inf, 0))
        if now - logged < self.period:
            self._last[kind] = (logged, held + 1)
            return None
        self._last[kind] = (now, 0)
        return f"{message} (+{held} similar in the last {now - logged:.1f} s)" if held else message


@dataclass
class Counters:
    """What became of the frames (and scans) the node received; published in `diagnostics`."""

    frames_in: int = 0
    frames_out: int = 0
    dropped: int = 0  # replaced in the keep-latest slot before the worker took them
    bad_input: int = 0  # malformed image or camera_info, malformed or empty LiDAR scan: skipped
    failed: int = 0  # frames whose processing raised (a bug or a broken model): skipped
    no_camera_info: int = 0
    idle: int = 0  # frames not processed because nobody subscribed (lazy)
