"""The embedded ledger: one SQLite file shared by every process on a host.

Plain :mod:`sqlite3`. Every reserve, settle and release is one ``BEGIN IMMEDIATE``
transaction, so many processes on one file never over-admit: SQLite serializes the writers,
and a writer that finds the file locked waits (busy timeout) and then retries with a bounded
backoff. The async twins run the transaction at once on the event loop's thread when the file
is free, and in a worker when it is not. The tables are described in
:mod:`tb_plugins.ledger.sqlite.schema`.

The WAL journal and ``synchronous=NORMAL`` keep a commit cheap (no fsync per call; a power
loss may drop the last few commits, never corrupt the file), and 1 KiB pages keep the WAL
small, since a settle dirties a few pages. Connections are per thread and reopened in a
forked child (by an ``os.register_at_fork`` hook, and a pid check behind it).

**The file itself.** A process that deletes or replaces the ledger file (``rm``, a restored
backup moved over it) leaves this process's connections writing to a file nobody else sees,
whose spend is gone at exit. So the ledger compares the file at its path with the one it
opened (device and inode) at most every ``FILE_CHECK_EVERY`` seconds, before the next
call, and whenever a thread opens a connection; once they differ every call raises
:class:`~tb_plugins.errors.LedgerUnavailable` naming the file (the guard's fail mode applies)
until :meth:`SQLiteLedger.reopen` is called. It never reopens by itself: a new, empty file
would silently start every budget again from zero.

**Errors.** A locked, busy, missing or unreadable file is ``LedgerUnavailable``; anything the
ledger is given that it cannot store (an amount past ``2**63 - 1``, a sum that would pass it,
a name with a lone surrogate) is a plain :class:`~tb_plugins.errors.LedgerError` raised before
anything is written. Scope and model names are stored exactly, NUL included (SQLite's JSON
functions cut strings at an escaped NUL, so reports split such scope lists in Python).

The package: :mod:`.ledger` (the class: the file, its connections, how a transaction runs),
:mod:`.operations` (each operation as one flow), :mod:`.schema` (the tables and the SQL),
:mod:`.codec` (how states are read and rows written, fast) and :mod:`.locks`.

Example:
    >>> from tb_plugins import ledger_from_url
    >>> ledger = ledger_from_url("sqlite:///tb_ledger.db")  # doctest: +SKIP
"""

from __future__ import annotations

from tb_plugins.ledger.sqlite.ledger import SQLiteLedger
from tb_plugins.ledger.sqlite.schema import SCHEMA_VERSION

__all__ = ["SCHEMA_VERSION", "SQLiteLedger"]
