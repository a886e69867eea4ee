"""The SQLite ledger's tables (schema version 2), and the SQL of its operations.

Tables::

    counters(key, bucket, scope, window, <6 units>, expires_at)  PK (key, bucket)
    holds(key, bucket, reservation_id, <6 units>, expires_at)     live reservations,
        PK (key, bucket, reservation_id), and an index by reservation_id
    usage(id, ts, reservation_id, settled_id UNIQUE, scopes, model, ...)  the usage log;
        settled_id is the reservation id of a settle (NULL for refused calls), so the log
        is also the set of settled ids that makes settle idempotent; scopes is a JSON list
    alerts(key, expires_at)                                       alerts already claimed
    meta(key, value)                                              schema_version
    overrides(version, body)                                      the runtime overrides' log

``counters`` and ``holds`` are ``WITHOUT ROWID`` tables: reading a line's state is one range
of a primary key that holds the sums itself. A version 1 file (tb-plugins 0.1) is migrated
in place the first time a newer process opens it (:data:`MIGRATE_FROM_1`); ``overrides``
is created in any file that lacks it (:data:`ALWAYS`), so it needs no version of its own.
The statements that read line states are built by :mod:`tb_plugins.ledger.sqlite.codec`.
"""

from __future__ import annotations

import contextlib
import sqlite3

from tb_plugins.core.usage import UNITS
from tb_plugins.ledger.checks import RECORD_COLUMNS

SCHEMA_VERSION = 2
PAGE_SIZE = 1024  # bytes, for new files: a settle dirties a few pages, the WAL writes them whole
UNIT_COLUMNS = ", ".join(UNITS)

# -- the tables ------------------------------------------------------------------------------

_UNIT_DEFS = ", ".join(f"{u} INTEGER NOT NULL" for u in UNITS)
_COUNTERS = f"""
CREATE TABLE counters (
  key TEXT NOT NULL, bucket INTEGER NOT NULL, scope TEXT NOT NULL, window TEXT NOT NULL,
  {_UNIT_DEFS}, expires_at REAL,
  PRIMARY KEY (key, bucket)
) WITHOUT ROWID
"""
# Keyed by line first: a state read is a range of the primary key, holding its own sums.
_HOLDS = f"""
CREATE TABLE holds (
  key TEXT NOT NULL, bucket INTEGER NOT NULL, reservation_id TEXT NOT NULL,
  {_UNIT_DEFS}, expires_at REAL NOT NULL,
  PRIMARY KEY (key, bucket, reservation_id)
) WITHOUT ROWID
"""
_HOLDS_INDEX = "CREATE INDEX idx_holds_reservation_id ON holds (reservation_id)"
SCHEMA = (
    _COUNTERS,
    _HOLDS,
    _HOLDS_INDEX,
    """
CREATE TABLE usage (
  id INTEGER PRIMARY KEY, ts REAL NOT NULL, reservation_id TEXT, settled_id TEXT,
  scopes TEXT, model TEXT, requested_model TEXT, action TEXT NOT NULL,
  input_tokens INTEGER, output_tokens INTEGER, cached_input_tokens INTEGER,
  usd REAL, priced INTEGER, estimated INTEGER, extra TEXT
)
""",
    "CREATE UNIQUE INDEX idx_usage_settled_id ON usage (settled_id)",
    "CREATE INDEX idx_usage_ts ON usage (ts)",
    "CREATE TABLE alerts (key TEXT PRIMARY KEY, expires_at REAL)",
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)",
)
# Version 1 (tb-plugins 0.1): rowid tables with secondary indexes, and a usage_scopes table.
MIGRATE_FROM_1 = (
    "ALTER TABLE counters RENAME TO counters_v1",
    _COUNTERS,
    f"INSERT INTO counters SELECT key, bucket, scope, window, {UNIT_COLUMNS}, expires_at"
    " FROM counters_v1",
    "DROP TABLE counters_v1",
    "ALTER TABLE holds RENAME TO holds_v1",
    _HOLDS,
    f"INSERT OR REPLACE INTO holds SELECT key, bucket, reservation_id, {UNIT_COLUMNS},"
    " expires_at FROM holds_v1",
    "DROP TABLE holds_v1",
    _HOLDS_INDEX,
    "DROP TABLE IF EXISTS usage_scopes",
)
# Run on every open: tables added since version 2 that older files may lack.
ALWAYS = ("CREATE TABLE IF NOT EXISTS overrides (version INTEGER PRIMARY KEY, body TEXT NOT NULL)",)
HAS_OVERRIDES = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'overrides'"
VERSION = "SELECT value FROM meta WHERE key = 'schema_version'"
SET_VERSION = "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)"


def create_or_migrate(conn: sqlite3.Connection) -> int:
    """Create the tables in a new file, or migrate a version 1 file (in the caller's
    transaction); returns the file's schema version after."""
    row = None
    with contextlib.suppress(sqlite3.OperationalError):  # no meta table yet
        row = conn.execute(VERSION).fetchone()
    statements = SCHEMA if row is None else MIGRATE_FROM_1 if int(row[0]) == 1 else ()
    for statement in (*statements, *ALWAYS):
        conn.execute(statement)
    if statements:
        conn.execute(SET_VERSION, (str(SCHEMA_VERSION),))
    return int(conn.execute(VERSION).fetchone()[0])


def create_always(conn: sqlite3.Connection) -> None:
    """Create the tables of :data:`ALWAYS` that a file of the current version lacks."""
    for statement in ALWAYS:
        conn.execute(statement)


# -- the operations ------------------------------------------------------------------------

# Expired holds never count (the state read skips them); dropping them is housekeeping.
PURGE_HOLDS = "DELETE FROM holds WHERE expires_at <= ?"
DELETE_HOLDS = "DELETE FROM holds WHERE reservation_id = ?"
DELETE_LIVE_HOLDS = "DELETE FROM holds WHERE reservation_id = ? AND expires_at > ?"
INSERT_HOLDS = (
    f"INSERT INTO holds (reservation_id, key, bucket, {UNIT_COLUMNS}, expires_at) VALUES "
)
HOLD_ROW = "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
UPSERT_COUNTERS = (
    f"INSERT INTO counters (key, bucket, scope, window, {UNIT_COLUMNS}, expires_at) VALUES "
)
COUNTER_ROW = "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
# SQLite turns an integer overflow of `+` into a float, silently; abs(-2**63) raises "integer
# overflow" instead, so a sum that would pass 2**63 - 1 fails the transaction (and the ledger
# reports it as "amount out of range").
_CHECKED_ADD = (
    "{u} = CASE WHEN excluded.{u} > 9223372036854775807 - {u}"
    " THEN abs(-9223372036854775807 - 1 - 0 * {u}) ELSE {u} + excluded.{u} END"
)
ON_COUNTER = f"""
ON CONFLICT (key, bucket) DO UPDATE SET
  {", ".join(_CHECKED_ADD.format(u=u) for u in UNITS)},
  expires_at = CASE WHEN expires_at IS NULL OR excluded.expires_at IS NULL THEN NULL
                    ELSE max(expires_at, excluded.expires_at) END
"""
INSERT_USAGE = f"""
INSERT INTO usage (settled_id, {RECORD_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (settled_id) DO NOTHING
"""
PRUNE = (
    "DELETE FROM counters WHERE expires_at < ?",
    "DELETE FROM alerts WHERE expires_at < ?",
)
CLAIM_ALERT = "INSERT INTO alerts (key, expires_at) VALUES (?, ?) ON CONFLICT (key) DO NOTHING"
SCOPES = "SELECT DISTINCT scope, window FROM counters ORDER BY scope, window"
# One writer at a time (the write lock), so versions are handed out in commit order.
APPEND_OVERRIDE = (
    "INSERT INTO overrides (version, body)"
    " VALUES ((SELECT ifnull(max(version), 0) + 1 FROM overrides), ?) RETURNING version"
)
OVERRIDES = "SELECT version, body FROM overrides WHERE version > ? ORDER BY version"
# A range of the ts index, however late `since` is: a page read from the middle of a long log
# (tb replay reads it a page at a time) does not scan the index from its start.
RECORDS = f"""
SELECT {RECORD_COLUMNS} FROM usage
 WHERE ts >= ifnull(:since, -1e308) AND ts < ifnull(:until, 1e308)
 ORDER BY ts, id LIMIT :limit
"""
# SQLite's JSON functions cut a string at an escaped NUL (json_each reads "a\u0000b" as "a"),
# so a record whose scope list holds a NUL is never split by json_each: such records are
# grouped by their whole list in SQL, and the lists split in Python (exactly), then merged.
_NUL = "'\\u0000'"  # JSON's escape of NUL as SQL text; only such lists can hold a NUL
_SUMS = """sum(u.action != 'deny'), sum(u.action = 'deny'),
       sum(CASE WHEN u.action != 'deny' THEN u.input_tokens ELSE 0 END),
       sum(CASE WHEN u.action != 'deny' THEN u.output_tokens ELSE 0 END),
       sum(CASE WHEN u.action != 'deny' THEN u.cached_input_tokens ELSE 0 END),
       sum(CASE WHEN u.action != 'deny' THEN u.usd ELSE 0 END),
       sum(u.action = 'clamp'), sum(u.action = 'downgrade')"""
_PERIOD = "(:since IS NULL OR u.ts >= :since) AND (:until IS NULL OR u.ts < :until)"
_USAGE_TEMPLATE = f"""
SELECT {{key}} AS k, {_SUMS}
  FROM usage u {{join}}
 WHERE {_PERIOD} AND ifnull(instr(u.scopes, {_NUL}), 0) = 0
   AND (:scope IS NULL OR EXISTS (SELECT 1 FROM json_each(u.scopes) f WHERE f.value = :scope))
 GROUP BY k
"""
_USAGE_NUL_TEMPLATE = f"""
SELECT {{key}} AS k, u.scopes, {_SUMS}
  FROM usage u
 WHERE {_PERIOD} AND instr(u.scopes, {_NUL}) > 0
 GROUP BY k, u.scopes
"""
# By scope, in two steps: the records summed per scope list first (one sort of the log), then
# those sums per scope of each list: a log repeats its lists, so this sorts far fewer rows than
# a row per (record, scope) would (benchmarks/bench_report.py; slower only when nearly every
# call has a list of its own).
_USAGE_BY_SCOPE = f"""
WITH p(scopes, n, d, i, o, c, usd, cl, dg) AS (
  SELECT u.scopes, {_SUMS}
    FROM usage u
   WHERE {_PERIOD} AND ifnull(instr(u.scopes, {_NUL}), 0) = 0
     AND (:scope IS NULL OR EXISTS (SELECT 1 FROM json_each(u.scopes) f WHERE f.value = :scope))
   GROUP BY u.scopes
)
SELECT s.value AS k, sum(p.n), sum(p.d), sum(p.i), sum(p.o), sum(p.c), sum(p.usd), sum(p.cl),
       sum(p.dg)
  FROM p JOIN json_each(p.scopes) s
 GROUP BY k
"""
_DAY = "strftime('%Y-%m-%d', u.ts, 'unixepoch')"
USAGE: dict[str, tuple[str, str]] = {
    "scope": (
        _USAGE_BY_SCOPE,
        _USAGE_NUL_TEMPLATE.format(key="NULL"),
    ),
    "model": (
        _USAGE_TEMPLATE.format(key="u.model", join=""),
        _USAGE_NUL_TEMPLATE.format(key="u.model"),
    ),
    "day": (
        _USAGE_TEMPLATE.format(key=_DAY, join=""),
        _USAGE_NUL_TEMPLATE.format(key=_DAY),
    ),
}
