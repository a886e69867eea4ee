"""The watchdog that closes the socket of a PostgreSQL call that outlives its deadline.

libpq has no read timeout: a server that stops answering (stopped, or behind a network that
drops packets) would block a call forever. ``statement_timeout`` bounds a live server; for the
rest, one daemon thread per process checks the calls in flight every ``tick`` seconds and shuts
down the socket of a late one, so the call fails at once with a broken connection (which the
pool then discards).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time

__all__ = ["WATCHDOG", "Watchdog"]


class Watchdog:
    """Closes the socket of a call that outlives its deadline (see the module)."""

    tick = 0.05

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._due: dict[int, tuple[float, int]] = {}
        self._late: set[int] = set()
        self._next = 0
        self._pid = 0

    def reset(self) -> None:
        """Forget everything (in a forked child: the parent's calls and thread are not ours)."""
        self._lock = threading.Lock()
        self._due, self._late, self._pid = {}, set(), 0

    def arm(self, fd: int, seconds: float) -> int:
        """Watch socket ``fd`` for ``seconds``; returns a token for :meth:`disarm`."""
        with self._lock:
            if self._pid != os.getpid():
                self._pid = os.getpid()
                threading.Thread(target=self._run, name="tb_plugins-pg-watchdog",
                                 daemon=True).start()  # fmt: skip
            self._next += 1
            self._due[self._next] = (time.monotonic() + seconds, fd)
            return self._next

    def disarm(self, token: int) -> bool:
        """Stop watching; True if the call was cut for being late."""
        with self._lock:
            self._due.pop(token, None)
            if token in self._late:
                self._late.discard(token)
                return True
            return False

    def _run(self) -> None:
        import socket  # here, not at import time: `import tb_plugins` stays light

        while True:
            time.sleep(self.tick)
            now = time.monotonic()
            with self._lock:
                late = [(t, fd) for t, (due, fd) in self._due.items() if due <= now]
                for token, _ in late:
                    del self._due[token]
                    self._late.add(token)
            for _, fd in late:
                with contextlib.suppress(OSError):
                    sock = socket.socket(fileno=os.dup(fd))
                    sock.shutdown(socket.SHUT_RDWR)
                    sock.close()


WATCHDOG = Watchdog()
os.register_at_fork(after_in_child=WATCHDOG.reset)
