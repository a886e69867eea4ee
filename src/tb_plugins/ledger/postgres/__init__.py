"""The PostgreSQL ledger: one database shared by every host, with the database's durability.

``postgresql://user:password@host:port/dbname`` (or ``postgres://``). Options, in the URL query
or as keywords: ``schema`` (default ``tb_plugins``), ``timeout`` (seconds, default 2),
``pool_min`` and ``pool_max`` (connections per process, default 1 and 4), and
``synchronous_commit`` (see *Durability*). Other query parameters go to libpq unchanged (e.g.
``?sslmode=require&application_name=proxy-1``).

**Atomicity.** Each operation is one call of a PL/pgSQL function (``schema.sql``):
one round trip, one transaction, one server-side prepared statement. Only a reservation checks
limits, so only reservations must see each other: a reservation first locks the rows of its
lines in ``lines`` with one ``SELECT … ORDER BY key_hash FOR UPDATE``, always in ascending
order of the key's hash, then reads settled spend plus live holds in one snapshot taken after
the locks, checks every limit and holds on every line or on none. Concurrent reservations of a
line therefore queue, never admit more than a limit allows, and never deadlock. A settle or a
release only removes a hold and adds spend, in one transaction that a reservation sees entirely
or not at all, so it takes no line lock: its commit (a WAL flush, for a settle) never holds up
the reservations of its lines. Settles of one line queue on its counter rows, locked in
key-hash order. A line seen for the first time is added by ``INSERT … ON CONFLICT DO NOTHING``
in a short transaction of its own (holding no other lock), then the call is made again. Settle
is idempotent through a unique index on the settled reservation id in the usage log, and reads
back only the lines it is asked to ``watch``. A hold stops counting the moment its
``expires_at`` passes (every read filters on it), so the hold of a process that died returns
after its TTL; expired holds are deleted by a prune that runs every ten minutes.

**Schema.** Created on first use under an advisory lock, inside the schema ``schema`` (created
too), and versioned in its ``meta`` table: a schema of an older version is upgraded in place
(under the same lock; the functions of the older version stay, so processes still running the
older code keep working until they restart), a newer one is refused. Long scope names are found
by the SHA-256 of their text (a btree entry holds at most ~2.7 kB), so a 10 kB scope name works
like a short one. The usage log is indexed by time for reports.

**Durability.** A settle commits synchronously by default: once ``settle`` returns, the spend
survives anything the database survives (a crash, a restart, a failover to a synchronous
replica). A reservation or release commits with ``synchronous_commit = off`` (set for its own
transaction only), and the holds live in an ``UNLOGGED`` table (not written to the WAL, not
replicated): a hold is transient, so a database crash or failover only forgets the holds of the
calls in flight (the calls they admitted still settle their real spend). The synchronous commit
is most of a settle's latency (one WAL flush). A deployment that prefers speed can open the
ledger with ``synchronous_commit=off`` (``?synchronous_commit=off`` or the keyword; ``on``,
``local``, ``remote_write`` and ``remote_apply`` are PostgreSQL's other values): every write of
its sessions, settles included, then returns before its WAL record is flushed, and a crash of
the *database server* (not of a client) may lose the spend settled in the last fraction of a
second before it (up to three times ``wal_writer_delay``, 600 ms by default), like Redis
without ``appendfsync always``. Without the option the server's own setting applies (``on``
unless the DBA changed it).

**Time.** :meth:`PostgresLedger.server_time` is the database's ``clock_timestamp()``, so guards
on hosts with skewed clocks agree on window boundaries.

**Failures.** ``timeout`` bounds waiting for a pooled connection, connecting (libpq's
``connect_timeout``, at least 2 s) and each statement (``statement_timeout``, lock waits
included). libpq has no read timeout of its own, so a call still unanswered after 1.5 times
``timeout`` (a server that stopped, a network that drops packets) has its connection closed
under it by a watchdog thread. A connection found broken (the server restarted, the session was
terminated) is dropped and the call retried at once on another. After a wait for a connection
timed out, calls fail at once for the next second instead of each waiting again. Unreachable,
late or cancelled calls raise :class:`~tb_plugins.errors.LedgerUnavailable` naming
``host:port`` (never the password); other database errors raise
:class:`~tb_plugins.errors.LedgerError`, and so does anything the ledger cannot store (an
amount or sum past ``2**63 - 1``: ``amount out of range``), refused before anything is
written.

A call whose reply was lost may still have committed. A reserve (or release) whose connection
broke or was cut by the watchdog is remembered, and its hold is released right after the
ledger's next successful call (one more round trip then, and only then), so no phantom hold
outlives an outage by more than a call; settling or releasing that id later is harmless. A
settle retried on a new connection carries the same random token as its first run, kept in the
usage log: if that run committed, the retry still answers ``applied``, while a second
``settle`` call of the id answers ``applied=False`` and charges nothing.

**Names.** Scope names are stored percent-escaped and found by hash, so every character
survives. Text columns cannot hold NUL, so the reservation id, model names and action keep it
as U+FDD0 ``"0"`` (a noncharacter, itself doubled), read back exactly.

The package: :mod:`.ledger` (the class: URL, pools, sessions and the two executors),
:mod:`.operations` (each operation as one flow, and its statement), :mod:`.codec` (the binary
parameters and replies), :mod:`.watchdog` and ``schema.sql`` (tables and functions).

Example:
    >>> from tb_plugins import ledger_from_url
    >>> ledger = ledger_from_url("postgresql://tb@db.internal/app?schema=budgets")  # doctest: +SKIP
"""

from __future__ import annotations

from tb_plugins.ledger.postgres.ledger import SCHEMA_SQL, SCHEMA_VERSION, PostgresLedger

__all__ = ["SCHEMA_SQL", "SCHEMA_VERSION", "PostgresLedger"]
