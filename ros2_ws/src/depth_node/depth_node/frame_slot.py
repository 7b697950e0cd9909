"""The keep-latest hand-over from the node's subscription callback to its inference worker. No rclpy."""

from __future__ import annotations

import threading


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
