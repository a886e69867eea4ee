-- The PostgreSQL ledger of tb_plugins, schema version 5.
--
-- Run (by tb_plugins.ledger.postgres, under an advisory lock, once per database and schema, and
-- again to upgrade a schema of an older version) with search_path set to the ledger's schema:
-- nothing below names a schema. Every statement is idempotent.
--
-- Long names: a scope name may be far longer than a btree entry allows (~2.7 kB), so rows are
-- found by the SHA-256 of their text (key_hash, rid_hash, scope_hash); the text itself is
-- stored beside it. Scope names are stored percent-escaped (tb_plugins.ledger.base.line_key),
-- so every byte of them survives, NUL included.
--
-- Concurrency. Only a reservation checks limits, so only reservations need to see each other:
-- a reservation locks the rows of its lines in `lines` FOR UPDATE, in ascending key_hash order,
-- in one statement, before it reads anything; it then reads spend and live holds in one
-- snapshot, checks, and inserts its holds. Reservations of a line therefore queue, and never
-- admit more than a limit allows. A settle, a release and the prune only *remove* holds and
-- *add* spend (as does a reservation replacing the old hold of its own id); each does so in one
-- transaction that any reservation sees entirely or not at all (a reservation that still sees
-- a hold that is being settled counts its estimate instead of its actual amount: as if it had
-- come just before the settle). So they take no line lock, and a settle's synchronous commit
-- (its WAL flush) never holds up the reservations of its lines. Settles of one line queue on
-- its counter rows, which they lock in key_hash order. A transaction waits only for locks
-- taken in one global order (line rows, then counter rows, each by key_hash) or for the rows of
-- its own reservation id, so no two transactions wait on each other in a cycle: no deadlock.
-- Lines are added beforehand in a transaction of their own (tb_add_lines), holding no other
-- lock. Pruning takes rows with SKIP LOCKED and never waits.
--
-- Expired holds stop counting at once (every read filters expires_at > now) and are deleted
-- by the periodic prune.
--
-- Which holds count: settled spend counts in the buckets p_lows[i]..p_buckets[i] of a line.
-- On a line that sums one bucket (calendar windows, total: low = bucket) a hold counts in the
-- bucket it was made in, so last period's holds do not count against the new period. On a
-- rolling line (low < bucket) every live hold counts, whatever bucket it was made in: a call
-- may run longer than the window, and its hold must count until it is settled, released or
-- expired (its spend is then charged in the bucket of the settle).
--
-- Version 1 -> 2: settles and releases take no line lock (see above); holds live in an
-- UNLOGGED table and lost their index on expires_at (only the prune read it, and holds are
-- few); counters leave room on their pages for in-place (HOT) updates; the hot-path functions
-- (tb_reserve2, tb_settle2, tb_release2, tb_states2) check limits in SQL instead of a PL/pgSQL
-- loop, sum with tb_sum instead of numeric sums, return 2-D arrays, and a settle reads back
-- only the lines it is asked to watch. Version 1's functions are left in place by the upgrade,
-- so processes still running the older code keep working until they restart.
--
-- Version 2 -> 3: the usage log keeps the token of the settle call that wrote each settled
-- record (usage.settle_token), and tb_settle2 gains an overload taking that token: a settle
-- run again because its reply was lost (the client retried on a new connection) finds its
-- own token and still answers "applied", while a second settle call of the id does not. The
-- overload keeps the name tb_settle2 (one more argument), so per-function statistics still
-- find the hot path under one name; the older tb_settle2 and tb_log stay for older processes.
--
-- Version 3 -> 4: on a rolling line every live hold counts, whatever bucket it was made in
-- (tb_states2 and tb_reserve2; see "Which holds count" above). Only the function bodies
-- change, not their signatures, so processes still running older code get the fix too.
--
-- Version 4 -> 5: the runtime budget overrides' log (overrides, tb_append_override). Nothing
-- else changes.

CREATE TABLE IF NOT EXISTS meta (
    key   text PRIMARY KEY,
    value text NOT NULL
);

-- One row per (scope, window) ever charged: the lock that serializes its reservations.
CREATE TABLE IF NOT EXISTS lines (
    key_hash bytea PRIMARY KEY,       -- sha256(key)
    key      text  NOT NULL           -- line_key(scope, window)
);

-- Settled spend per line and bucket. Every settle updates its buckets' rows in place; the free
-- space left on each page lets those updates stay on the page (HOT, no index update).
CREATE TABLE IF NOT EXISTS counters (
    key_hash      bytea  NOT NULL,
    bucket        bigint NOT NULL,
    tokens        bigint NOT NULL,
    input_tokens  bigint NOT NULL,
    output_tokens bigint NOT NULL,
    usd           bigint NOT NULL,    -- nano-dollars
    requests      bigint NOT NULL,
    calls         bigint NOT NULL,
    expires_at    double precision,   -- after this the bucket is no longer read (NULL: never)
    PRIMARY KEY (key_hash, bucket)
) WITH (fillfactor = 70);
ALTER TABLE counters SET (fillfactor = 70);
CREATE INDEX IF NOT EXISTS counters_expires_at ON counters (expires_at);

-- Live reservations: one row per reservation and line. UNLOGGED: a hold is transient (it
-- expires by itself, and a settle records the spend whether or not its hold is still there),
-- so holds are not written to the WAL, not replicated, and emptied by a server crash, which
-- only forgets the holds of the calls in flight at that moment.
CREATE UNLOGGED TABLE IF NOT EXISTS holds (
    rid_hash      bytea  NOT NULL,    -- sha256(reservation id)
    key_hash      bytea  NOT NULL,
    bucket        bigint NOT NULL,
    tokens        bigint NOT NULL,
    input_tokens  bigint NOT NULL,
    output_tokens bigint NOT NULL,
    usd           bigint NOT NULL,
    requests      bigint NOT NULL,
    calls         bigint NOT NULL,
    expires_at    double precision NOT NULL,
    PRIMARY KEY (rid_hash, key_hash)
);
ALTER TABLE holds SET UNLOGGED;
CREATE INDEX IF NOT EXISTS holds_line ON holds (key_hash, bucket);
DROP INDEX IF EXISTS holds_expires_at;

-- The usage log. settled_hash is sha256 of the reservation id of a settle (NULL for a refused
-- call): its unique index makes settle idempotent.
CREATE TABLE IF NOT EXISTS usage (
    id                  bigserial PRIMARY KEY,
    ts                  double precision NOT NULL,
    reservation_id      text,
    settled_hash        bytea UNIQUE,
    scopes              text NOT NULL,  -- JSON list, ASCII-escaped
    model               text,
    requested_model     text,
    action              text NOT NULL,
    input_tokens        bigint NOT NULL,
    output_tokens       bigint NOT NULL,
    cached_input_tokens bigint NOT NULL,
    usd                 double precision NOT NULL,
    priced              boolean NOT NULL,
    estimated           boolean NOT NULL,
    extra               text NOT NULL   -- JSON object, ASCII-escaped
);
CREATE INDEX IF NOT EXISTS usage_ts ON usage (ts);
-- The random token of the settle call that wrote a settled record (version 3; NULL before).
ALTER TABLE usage ADD COLUMN IF NOT EXISTS settle_token bytea;

-- One row per scope of a usage record, for grouping and filtering by scope.
CREATE TABLE IF NOT EXISTS usage_scopes (
    usage_id   bigint NOT NULL,
    scope_hash bytea  NOT NULL,       -- sha256(escaped scope)
    scope      text   NOT NULL,       -- percent-escaped scope
    PRIMARY KEY (usage_id, scope_hash)
);
CREATE INDEX IF NOT EXISTS usage_scopes_scope ON usage_scopes (scope_hash);

CREATE TABLE IF NOT EXISTS alerts (
    key_hash   bytea PRIMARY KEY,
    key        text  NOT NULL,
    expires_at double precision
);

-- The runtime budget overrides: an append-only log read in version order. Appends take the
-- table's lock, so versions commit in the order they are handed out and a reader that has
-- seen version n never misses a version below it that commits later.
CREATE TABLE IF NOT EXISTS overrides (
    version bigint PRIMARY KEY,
    body    text   NOT NULL
);

CREATE OR REPLACE FUNCTION tb_append_override(p_body text) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v bigint;
BEGIN
    LOCK TABLE overrides IN EXCLUSIVE MODE;
    SELECT coalesce(max(version), 0) + 1 INTO v FROM overrides;
    INSERT INTO overrides (version, body) VALUES (v, p_body);
    RETURN v;
END
$$;

-- sum() of bigints without the detour through numeric (and 0 for no rows): a plain int8
-- addition per row, which also errors out on overflow.
CREATE OR REPLACE AGGREGATE tb_sum(bigint) (SFUNC = int8pl, STYPE = bigint, INITCOND = '0');

-- The states of the lines p_pick names (1-based indexes into p_hashes, p_lows and p_buckets),
-- in that order, as a 2-D array: per line one row of 12 integers, the 6 units settled (summed
-- over buckets p_lows[i]..p_buckets[i]) then the 6 held by live holds (in that range, or
-- all of them on a rolling line: see "Which holds count"). NULL when p_pick is empty.
-- (PL/pgSQL rather than SQL: its plan is prepared once per session.)
CREATE OR REPLACE FUNCTION tb_states2(
    p_hashes bytea[], p_lows bigint[], p_buckets bigint[], p_now double precision,
    p_pick int[]
) RETURNS bigint[] LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (
        SELECT array_agg(ARRAY[c.a1, c.a2, c.a3, c.a4, c.a5, c.a6,
                               h.a1, h.a2, h.a3, h.a4, h.a5, h.a6] ORDER BY t.o)
          FROM unnest(p_pick) WITH ORDINALITY AS t(i, o)
         CROSS JOIN LATERAL (
               SELECT tb_sum(tokens), tb_sum(input_tokens), tb_sum(output_tokens), tb_sum(usd),
                      tb_sum(requests), tb_sum(calls)
                 FROM counters
                WHERE key_hash = p_hashes[t.i]
                  AND bucket BETWEEN p_lows[t.i] AND p_buckets[t.i]) AS c(a1, a2, a3, a4, a5, a6)
         CROSS JOIN LATERAL (
               SELECT tb_sum(tokens), tb_sum(input_tokens), tb_sum(output_tokens), tb_sum(usd),
                      tb_sum(requests), tb_sum(calls)
                 FROM holds
                WHERE key_hash = p_hashes[t.i]
                  AND (p_lows[t.i] < p_buckets[t.i]
                       OR bucket BETWEEN p_lows[t.i] AND p_buckets[t.i])
                  AND expires_at > p_now) AS h(a1, a2, a3, a4, a5, a6));
END
$$;

-- Add the lines that do not exist yet, in ascending key_hash order. Runs in a transaction of
-- its own, holding no other lock, so inserting can never be part of a lock cycle.
CREATE OR REPLACE FUNCTION tb_add_lines(p_hashes bytea[], p_keys text[])
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO lines (key_hash, key)
    SELECT h, k FROM unnest(p_hashes, p_keys) AS t(h, k) ORDER BY h
        ON CONFLICT (key_hash) DO NOTHING;
END
$$;

-- Hold p_amounts (6 units) on every line (p_hashes distinct) if every limit allows it;
-- p_limits is n x 6, -1 for no limit. Returns a 2-D array: the row [ok, 0 x 11], then one row
-- of 12 integers per line, its state before this reservation (without the old hold of the same
-- id, which is replaced); or {{-1}} when a line must be added first (see tb_add_lines; nothing
-- was written). Only the lines of this reservation are locked: the old holds of a retried id
-- are dropped like a release drops them (see the top of this file).
CREATE OR REPLACE FUNCTION tb_reserve2(
    p_rid_hash bytea, p_hashes bytea[], p_buckets bigint[], p_lows bigint[],
    p_limits bigint[], p_amounts bigint[], p_now double precision, p_expires_at double precision
) RETURNS bigint[] LANGUAGE plpgsql AS $$
DECLARE
    found int;
    st bigint[];
    ok boolean;
BEGIN
    -- A hold is transient (it expires by itself): its commit need not wait for the WAL flush.
    PERFORM set_config('synchronous_commit', 'off', true);
    PERFORM 1 FROM lines WHERE key_hash = ANY (p_hashes) ORDER BY key_hash FOR UPDATE;
    GET DIAGNOSTICS found = ROW_COUNT;
    IF found < cardinality(p_hashes) THEN
        RETURN '{{-1}}';
    END IF;
    -- Read (in a snapshot taken after the locks) and check, in one statement.
    SELECT array_agg(ARRAY[c.a1, c.a2, c.a3, c.a4, c.a5, c.a6,
                           h.a1, h.a2, h.a3, h.a4, h.a5, h.a6] ORDER BY t.i),
           coalesce(bool_and(
               (p_limits[t.i][1] < 0 OR c.a1 + h.a1 + p_amounts[1] <= p_limits[t.i][1]) AND
               (p_limits[t.i][2] < 0 OR c.a2 + h.a2 + p_amounts[2] <= p_limits[t.i][2]) AND
               (p_limits[t.i][3] < 0 OR c.a3 + h.a3 + p_amounts[3] <= p_limits[t.i][3]) AND
               (p_limits[t.i][4] < 0 OR c.a4 + h.a4 + p_amounts[4] <= p_limits[t.i][4]) AND
               (p_limits[t.i][5] < 0 OR c.a5 + h.a5 + p_amounts[5] <= p_limits[t.i][5]) AND
               (p_limits[t.i][6] < 0 OR c.a6 + h.a6 + p_amounts[6] <= p_limits[t.i][6])), true)
      INTO st, ok
      FROM unnest(p_hashes, p_lows, p_buckets) WITH ORDINALITY AS t(h, lo, b, i)
     CROSS JOIN LATERAL (
           SELECT tb_sum(tokens), tb_sum(input_tokens), tb_sum(output_tokens), tb_sum(usd),
                  tb_sum(requests), tb_sum(calls)
             FROM counters
            WHERE key_hash = t.h AND bucket BETWEEN t.lo AND t.b) AS c(a1, a2, a3, a4, a5, a6)
     CROSS JOIN LATERAL (
           SELECT tb_sum(tokens), tb_sum(input_tokens), tb_sum(output_tokens), tb_sum(usd),
                  tb_sum(requests), tb_sum(calls)
             FROM holds
            WHERE key_hash = t.h AND (t.lo < t.b OR bucket BETWEEN t.lo AND t.b)
              AND expires_at > p_now AND rid_hash <> p_rid_hash) AS h(a1, a2, a3, a4, a5, a6);
    IF ok THEN
        DELETE FROM holds WHERE rid_hash = p_rid_hash;  -- a retried id: its old hold goes
        INSERT INTO holds (rid_hash, key_hash, bucket, tokens, input_tokens, output_tokens, usd,
                           requests, calls, expires_at)
        SELECT p_rid_hash, h, b, p_amounts[1], p_amounts[2], p_amounts[3], p_amounts[4],
               p_amounts[5], p_amounts[6], p_expires_at
          FROM unnest(p_hashes, p_buckets) AS t(h, b);
    END IF;
    RETURN array_cat(ARRAY[ARRAY[ok::int::bigint, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]], st);
END
$$;

-- Log one usage record (with its scopes); returns its id, or NULL when p_settled_hash was
-- logged before.
CREATE OR REPLACE FUNCTION tb_log(
    p_settled_hash bytea, p_ts double precision, p_rid text, p_scopes text, p_model text,
    p_requested_model text, p_action text, p_input bigint, p_output bigint, p_cached bigint,
    p_usd double precision, p_priced boolean, p_estimated boolean, p_extra text,
    p_scope_hashes bytea[], p_scope_names text[]
) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    uid bigint;
BEGIN
    WITH u AS (
        INSERT INTO usage (settled_hash, ts, reservation_id, scopes, model, requested_model,
                           action, input_tokens, output_tokens, cached_input_tokens, usd,
                           priced, estimated, extra)
        VALUES (p_settled_hash, p_ts, p_rid, p_scopes, p_model, p_requested_model, p_action,
                p_input, p_output, p_cached, p_usd, p_priced, p_estimated, p_extra)
            ON CONFLICT (settled_hash) DO NOTHING
        RETURNING id
    ), s AS (
        INSERT INTO usage_scopes (usage_id, scope_hash, scope)
        SELECT u.id, t.h, t.s FROM u, unnest(p_scope_hashes, p_scope_names) AS t(h, s)
    )
    SELECT id INTO uid FROM u;
    RETURN uid;
END
$$;

-- tb_log that also keeps p_token, the token of the settle call logging the record.
CREATE OR REPLACE FUNCTION tb_log(
    p_settled_hash bytea, p_ts double precision, p_rid text, p_scopes text, p_model text,
    p_requested_model text, p_action text, p_input bigint, p_output bigint, p_cached bigint,
    p_usd double precision, p_priced boolean, p_estimated boolean, p_extra text,
    p_scope_hashes bytea[], p_scope_names text[], p_token bytea
) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    uid bigint;
BEGIN
    WITH u AS (
        INSERT INTO usage (settled_hash, settle_token, ts, reservation_id, scopes, model,
                           requested_model, action, input_tokens, output_tokens,
                           cached_input_tokens, usd, priced, estimated, extra)
        VALUES (p_settled_hash, p_token, p_ts, p_rid, p_scopes, p_model, p_requested_model,
                p_action, p_input, p_output, p_cached, p_usd, p_priced, p_estimated, p_extra)
            ON CONFLICT (settled_hash) DO NOTHING
        RETURNING id
    ), s AS (
        INSERT INTO usage_scopes (usage_id, scope_hash, scope)
        SELECT u.id, t.h, t.s FROM u, unnest(p_scope_hashes, p_scope_names) AS t(h, s)
    )
    SELECT id INTO uid FROM u;
    RETURN uid;
END
$$;

-- Replace the hold of p_rid_hash by p_amounts on every line (p_hashes distinct) and log the
-- record (with tb_log, keeping p_token, the settle call's random token), once per id: the log
-- entry comes first, so a second settle of the id waits for the first on the unique index,
-- then changes nothing (and answers applied only if it carries the same token: the same call,
-- run again after its reply was lost). Returns a 2-D array: the row [applied, 0 x 11], then the states after settling of the lines p_watch names (from
-- tb_states2); or {{-1}} when a line must be added first (see tb_add_lines; nothing was
-- written). Takes no line lock (see the top of this file); the counter rows are
-- locked in key_hash order.
CREATE OR REPLACE FUNCTION tb_settle2(
    p_rid_hash bytea, p_hashes bytea[], p_buckets bigint[], p_lows bigint[],
    p_expires double precision[], p_amounts bigint[], p_now double precision, p_watch int[],
    p_ts double precision, p_rid text, p_scopes text, p_model text, p_requested_model text,
    p_action text, p_input bigint, p_output bigint, p_cached bigint, p_usd double precision,
    p_priced boolean, p_estimated boolean, p_extra text,
    p_scope_hashes bytea[], p_scope_names text[], p_token bytea
) RETURNS bigint[] LANGUAGE plpgsql AS $$
DECLARE
    found int;
    uid bigint;
    mine boolean;
    head bigint[];
    st bigint[];
BEGIN
    PERFORM 1 FROM lines WHERE key_hash = ANY (p_hashes);
    GET DIAGNOSTICS found = ROW_COUNT;
    IF found < cardinality(p_hashes) THEN
        RETURN '{{-1}}';
    END IF;
    uid := tb_log(p_rid_hash, p_ts, p_rid, p_scopes, p_model, p_requested_model, p_action,
                  p_input, p_output, p_cached, p_usd, p_priced, p_estimated, p_extra,
                  p_scope_hashes, p_scope_names, p_token);
    IF uid IS NULL THEN
        -- Settled before: by this very call (run again after its reply was lost) it still
        -- counts as applied; by another call, not. Nothing changes either way.
        SELECT coalesce(u.settle_token = p_token, false) INTO mine
          FROM usage AS u WHERE u.settled_hash = p_rid_hash;
        head := CASE WHEN mine THEN '{{1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}}'::bigint[]
                     ELSE '{{0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}}'::bigint[] END;
    ELSE
        head := '{{1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}}';
        DELETE FROM holds WHERE rid_hash = p_rid_hash;
        INSERT INTO counters AS c (key_hash, bucket, tokens, input_tokens, output_tokens, usd,
                                   requests, calls, expires_at)
        SELECT h, b, p_amounts[1], p_amounts[2], p_amounts[3], p_amounts[4], p_amounts[5],
               p_amounts[6], e
          FROM unnest(p_hashes, p_buckets, p_expires) AS t(h, b, e)
         ORDER BY h
            ON CONFLICT (key_hash, bucket) DO UPDATE SET
               tokens = c.tokens + excluded.tokens,
               input_tokens = c.input_tokens + excluded.input_tokens,
               output_tokens = c.output_tokens + excluded.output_tokens,
               usd = c.usd + excluded.usd,
               requests = c.requests + excluded.requests,
               calls = c.calls + excluded.calls,
               expires_at = CASE WHEN c.expires_at IS NULL OR excluded.expires_at IS NULL
                                 THEN NULL
                                 ELSE greatest(c.expires_at, excluded.expires_at) END;
    END IF;
    IF cardinality(p_watch) = 0 THEN
        RETURN head;
    END IF;
    st := tb_states2(p_hashes, p_lows, p_buckets, p_now, p_watch);  -- sees this settle's writes
    RETURN array_cat(head, st);
END
$$;

-- Drop every hold of p_rid_hash; true if one of them was still live at p_now.
CREATE OR REPLACE FUNCTION tb_release2(p_rid_hash bytea, p_now double precision)
RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
    live boolean;
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    WITH gone AS (DELETE FROM holds WHERE rid_hash = p_rid_hash RETURNING expires_at)
    SELECT coalesce(bool_or(expires_at > p_now), false) INTO live FROM gone;
    RETURN live;
END
$$;

-- Delete what is no longer read: holds expired at p_now (an expired hold counts nowhere, so
-- deleting it needs no line lock), counters whose window ended before p_before, lines left with
-- neither, and alert claims that expired before p_before. Never waits for a row another
-- transaction holds (SKIP LOCKED); returns how many rows went. (A line is deleted only once it
-- has had no counter for a day and holds nothing; should a settle without a reservation give
-- it a new counter at that very moment, the line is missing from scopes() until its next
-- reservation adds it back: its spend itself is kept and counted.)
CREATE OR REPLACE FUNCTION tb_prune(p_now double precision, p_before double precision,
                                    p_batch int)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    idle bytea[];
    n bigint;
    total bigint := 0;
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    DELETE FROM holds WHERE ctid = ANY (ARRAY(
        SELECT ctid FROM holds WHERE expires_at <= p_now
         LIMIT p_batch FOR UPDATE SKIP LOCKED));
    GET DIAGNOSTICS n = ROW_COUNT;
    total := total + n;
    WITH gone AS (
        DELETE FROM counters WHERE ctid = ANY (ARRAY(
            SELECT ctid FROM counters WHERE expires_at < p_before
             LIMIT p_batch FOR UPDATE SKIP LOCKED))
        RETURNING key_hash)
    SELECT count(*), array_agg(DISTINCT key_hash) INTO n, idle FROM gone;
    total := total + n;
    IF idle IS NOT NULL THEN
        DELETE FROM lines WHERE ctid = ANY (ARRAY(
            SELECT ctid FROM lines AS l
             WHERE l.key_hash = ANY (idle)
               AND NOT EXISTS (SELECT 1 FROM counters c WHERE c.key_hash = l.key_hash)
               AND NOT EXISTS (SELECT 1 FROM holds h WHERE h.key_hash = l.key_hash)
               FOR UPDATE SKIP LOCKED));
        GET DIAGNOSTICS n = ROW_COUNT;
        total := total + n;
    END IF;
    DELETE FROM alerts WHERE expires_at < p_before;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN total + n;
END
$$;

INSERT INTO meta (key, value) VALUES ('schema_version', '5') ON CONFLICT (key) DO NOTHING;
