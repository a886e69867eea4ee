"""The Redis ledger: one Redis (or one Redis Cluster slot) shared by every host.

``redis://[[user]:password@]host:port/db`` or ``rediss://…`` (TLS). Options, in the URL query or
as keywords: ``prefix`` (the ledger's namespace, default ``tb``), ``timeout`` (seconds, default
2), ``settled_ttl`` (how long a settled id is remembered, default ``7d``) and ``usage_ttl`` (how
long the usage log is kept, default forever). Other query options go to redis-py unchanged
(e.g. ``?client_name=proxy-1``).

**Atomicity.** A reservation across every budget of every scope of a call is one Lua script
(``ledger.lua``, sent with ``EVALSHA``, or ``EVAL`` when the server lost its script cache):
one round trip, all lines held or none. Settle and release are scripts too, idempotent by
reservation id for ``settled_ttl`` (a settled id is remembered that long). Each line keeps a
held counter (the sum of its live holds) and each hold with its expiry; once a hold's expiry
passes, the next reserve, settle or status that touches the line deletes it and subtracts its
amount from the held counter, so the hold of a process that died really returns after its TTL.
A settle that comes after the hold expired still records the spend, and reads back (and
sends) only the states of the lines it is asked to ``watch``.

**Durability.** The ledger is exactly as durable as the Redis server's persistence settings.
A Redis started with ``--save ""`` and ``--appendonly no`` keeps the ledger in memory only:
a restart or crash of that server loses every counter, hold and usage record, and budgets start
again from zero. With RDB snapshots (``save``) a crash loses the writes since the last
snapshot; with ``appendonly yes`` and ``appendfsync everysec`` (the usual production setting)
it loses at most about one second of writes; ``appendfsync always`` loses none, at the cost of
an fsync per write. A replica that is promoted after a failover may miss the last writes that
had not reached it. Use PostgreSQL (``postgresql://``) when the spend record must survive
anything the database survives.

**Memory.** Counters and holds take a few hundred bytes per line. The usage log lives in
Redis memory too: each settled call keeps its record (about 0.4 kB for a four-scope path) and
its settled mark (about 0.1 kB, for ``settled_ttl``), so a million calls a day grow Redis by
about half a gigabyte a day unless ``usage_ttl`` bounds how long the log is kept.

**Redis Cluster.** Every key of one ledger carries the hash tag ``{tb:<prefix>}``, so all of
them live in one hash slot and the scripts are legal on a cluster. It also means one ledger is
one slot, hence one shard: a cluster adds capacity for *several* ledgers (different
``prefix`` values land on different slots), not for one. To scale a single ledger, give its
shard a faster machine; ``benchmarks/bench_shared_ledgers.py`` measures what one serves.

**Time.** :meth:`RedisLedger.server_time` is Redis's ``TIME``, so guards on hosts with skewed
clocks agree on window boundaries.

**Failures.** ``timeout`` bounds connecting and every reply (``socket_connect_timeout`` and
``socket_timeout``). A dropped connection is retried once at once (a pooled connection that a
restart or ``CLIENT KILL`` closed); a timeout is never retried. Connection errors and timeouts
raise :class:`~tb_plugins.errors.LedgerUnavailable` naming ``host:port`` (never the password);
other Redis errors raise :class:`~tb_plugins.errors.LedgerError`, and so does anything the
ledger cannot store: an amount above ``2**53`` (the script adds doubles, exact to there) or a
sum an int64 cannot return (``amount out of range``), refused before anything is written.

A call whose reply was lost may still have run. A reserve (or release) that times out or loses
its connection is remembered, and its hold is released right after the ledger's next
successful call (one more round trip then, and only then), so no phantom hold outlives an
outage by more than a call; settling or releasing that id later is harmless. A settle sent
again by the retry above carries the same random token as its first run: if that run went
through, the script recognizes it and still answers ``applied``, while a second ``settle``
call of the id answers ``applied=False`` and charges nothing.

Keys (``P`` is ``{tb:<prefix>}``; scope names appear only percent-escaped, see
:func:`~tb_plugins.ledger.base.line_key`)::

    P:l:<line>            one hash per line: settled spend per bucket, the held counter,
                          each live hold (expires a day after the line's newest bucket)
    P:r:<id>, P:s:<id>    the lines a reservation holds on; the mark (the settle call's
                          token) of a settled id
    P:lines               every line with spend (for ``tb status``)
    P:log:<day>, P:logdays, P:seq  the usage log, one sorted set per UTC day
    P:a:<alert>           alerts already claimed

The package: :mod:`.ledger` (the class: URL, clients, the two executors), :mod:`.operations`
(each operation as one flow), :mod:`.codec` (what goes to the script and back) and
``ledger.lua`` (the script).

Example:
    >>> from tb_plugins import ledger_from_url
    >>> ledger = ledger_from_url("redis://127.0.0.1:6379/0?prefix=myapp")  # doctest: +SKIP
"""

from __future__ import annotations

from tb_plugins.ledger.redis.ledger import RedisLedger

__all__ = ["RedisLedger"]
