"""The in-process writer lock of a SQLite file, first come, first served.

One writer lock per file and process: threads of a process queue here, in memory, instead of
starving each other on the file lock with sleep-backoff; only one connection per process
competes with other processes for the file.
"""

from __future__ import annotations

import collections
import threading

__all__ = ["FairLock"]


class FairLock:
    """A first-come, first-served lock with direct hand-off: release wakes only the oldest
    waiter, so a wait is bounded by the queue ahead of it (``threading.Lock`` lets a releasing
    thread take it straight back, and a busy thread can starve the others)."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._held = False
        self._waiters: collections.deque[threading.Lock] = collections.deque()

    def acquire(self, timeout: float) -> bool:
        with self._guard:
            if not self._held:
                self._held = True
                return True
            waiter = threading.Lock()
            waiter.acquire()
            self._waiters.append(waiter)
        if waiter.acquire(timeout=max(timeout, 0.0)):
            return True  # handed over by release(); the lock stayed held
        with self._guard:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
                return False
        waiter.acquire()  # release() handed it over just as the wait timed out
        return True

    def try_acquire(self) -> bool:
        """Take the lock only if it is free and nobody waits for it."""
        with self._guard:
            if self._held:
                return False
            self._held = True
            return True

    def release(self) -> None:
        with self._guard:
            if self._waiters:
                self._waiters.popleft().release()
            else:
                self._held = False
