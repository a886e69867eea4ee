-- The PostgreSQL ledger of tb_plugins, schema version 1.
--
-- Run (by tb_plugins.ledger.postgres, under an advisory lock, once per database and schema)
-- with search_path set to the ledger's schema: nothing below names a schema.
--
-- Long names: a scope name may be far longer than a btree entry allows (~2.7 kB), so rows are
-- found by the SHA-256 of their text (key_hash, rid_hash, scope_hash); the text itself is
-- stored beside it. Scope names are stored percent-escaped (tb_plugins.ledger.base.line_key),
-- so every byte of them survives, NUL included.
--
-- Concurrency: every change to a line's counters or live holds happens while its row in `lines`
-- is locked FOR UPDATE, and a transaction locks its lines in ascending key_hash order, in one
-- statement, before touching anything else; missing lines are added beforehand in a
-- transaction of their own (tb_add_lines). So two transactions never wait on each other in a
-- cycle: no deadlock. Pruning takes rows with SKIP LOCKED and never waits.
--
-- Expired holds stop counting at once (every read filters expires_at > now) and are deleted
-- by the periodic prune.

CREATE TABLE IF NOT EXISTS meta (
    key   text PRIMARY KEY,
    value text NOT NULL
);

-- One row per (scope, window) ever charged: the lock that serializes its reservations.
CREATE TABLE IF NOT EXISTS lines (
    key_hash bytea PRIMARY KEY,       -- sha256(key)
    key      text  NOT NULL           -- line_key(scope, window)
);

-- Settled spend per line and bucket.
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
);
CREATE INDEX IF NOT EXISTS counters_expires_at ON counters (expires_at);

-- Live reservations: one row per reservation and line.
CREATE TABLE IF NOT EXISTS holds (
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
CREATE INDEX IF NOT EXISTS holds_line ON holds (key_hash, bucket);
CREATE INDEX IF NOT EXISTS holds_expires_at ON holds (expires_at);

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

-- The states of many lines, in order: per line 12 integers, the 6 units settled then the 6
-- held by live holds other than p_exclude's, summed over buckets p_lows[i]..p_buckets[i].
-- (PL/pgSQL rather than SQL: its plan is prepared once per session.)
CREATE OR REPLACE FUNCTION tb_states(
    p_hashes bytea[], p_lows bigint[], p_buckets bigint[], p_now double precision,
    p_exclude bytea
) RETURNS bigint[] LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (
        SELECT coalesce(array_agg(x.v ORDER BY t.i, x.j), '{}')
          FROM unnest(p_hashes, p_lows, p_buckets) WITH ORDINALITY AS t(h, lo, b, i)
         CROSS JOIN LATERAL (
               SELECT coalesce(sum(tokens), 0)::bigint, coalesce(sum(input_tokens), 0)::bigint,
                      coalesce(sum(output_tokens), 0)::bigint, coalesce(sum(usd), 0)::bigint,
                      coalesce(sum(requests), 0)::bigint, coalesce(sum(calls), 0)::bigint
                 FROM counters
                WHERE key_hash = t.h AND bucket BETWEEN t.lo AND t.b) AS c(a1, a2, a3, a4, a5, a6)
         CROSS JOIN LATERAL (
               SELECT coalesce(sum(tokens), 0)::bigint, coalesce(sum(input_tokens), 0)::bigint,
                      coalesce(sum(output_tokens), 0)::bigint, coalesce(sum(usd), 0)::bigint,
                      coalesce(sum(requests), 0)::bigint, coalesce(sum(calls), 0)::bigint
                 FROM holds
                WHERE key_hash = t.h AND bucket BETWEEN t.lo AND t.b AND expires_at > p_now
                  AND rid_hash IS DISTINCT FROM p_exclude) AS h(a1, a2, a3, a4, a5, a6)
         CROSS JOIN LATERAL unnest(ARRAY[c.a1, c.a2, c.a3, c.a4, c.a5, c.a6,
                                        h.a1, h.a2, h.a3, h.a4, h.a5, h.a6])
                    WITH ORDINALITY AS x(v, j));
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

-- Lock the lines p_hashes (distinct) and the lines p_rid_hash holds on, in ascending key_hash
-- order. Returns how many holds p_rid_hash has, or -1 when one of p_hashes is not a line yet
-- (the caller then runs tb_add_lines and calls again; nothing was written meanwhile).
CREATE OR REPLACE FUNCTION tb_lock_lines(p_hashes bytea[], p_rid_hash bytea)
RETURNS int LANGUAGE plpgsql AS $$
DECLARE
    found int;
    held int;
BEGIN
    SELECT count(*) FILTER (WHERE l.key_hash = ANY (p_hashes)), count(h.key_hash)
      INTO found, held
      FROM (SELECT key_hash FROM lines
             WHERE key_hash = ANY (p_hashes)
                OR key_hash IN (SELECT key_hash FROM holds WHERE rid_hash = p_rid_hash)
             ORDER BY key_hash FOR UPDATE) AS l
      LEFT JOIN holds AS h ON h.rid_hash = p_rid_hash AND h.key_hash = l.key_hash;
    IF found < coalesce(array_length(p_hashes, 1), 0) THEN
        RETURN -1;
    END IF;
    RETURN held;
END
$$;

-- Hold p_amounts on every line (p_hashes distinct) if every limit allows it. Returns [ok, 12
-- integers per line]: the states before this reservation (without the old hold of the same
-- id, which is replaced), or [-1] when a line must be added first (see tb_add_lines).
CREATE OR REPLACE FUNCTION tb_reserve(
    p_rid_hash bytea, p_hashes bytea[], p_buckets bigint[], p_lows bigint[],
    p_limits bigint[], p_amounts bigint[], p_now double precision, p_expires_at double precision
) RETURNS bigint[] LANGUAGE plpgsql AS $$
DECLARE
    n int := coalesce(array_length(p_hashes, 1), 0);
    held int;
    st bigint[];
    lim bigint;
    ok boolean := true;
BEGIN
    -- A hold is transient (it expires by itself): its commit need not wait for the WAL flush.
    PERFORM set_config('synchronous_commit', 'off', true);
    held := tb_lock_lines(p_hashes, p_rid_hash);
    IF held < 0 THEN
        RETURN ARRAY[-1::bigint];
    END IF;
    st := tb_states(p_hashes, p_lows, p_buckets, p_now, p_rid_hash);
    FOR i IN 1..n LOOP
        FOR u IN 1..6 LOOP
            lim := p_limits[(i - 1) * 6 + u];
            IF lim IS NOT NULL
               AND st[(i - 1) * 12 + u] + st[(i - 1) * 12 + 6 + u] + p_amounts[u] > lim THEN
                ok := false;
            END IF;
        END LOOP;
    END LOOP;
    IF ok THEN
        IF held > 0 THEN
            DELETE FROM holds WHERE rid_hash = p_rid_hash;
        END IF;
        INSERT INTO holds (rid_hash, key_hash, bucket, tokens, input_tokens, output_tokens, usd,
                           requests, calls, expires_at)
        SELECT p_rid_hash, h, b, p_amounts[1], p_amounts[2], p_amounts[3], p_amounts[4],
               p_amounts[5], p_amounts[6], p_expires_at
          FROM unnest(p_hashes, p_buckets) AS t(h, b);
    END IF;
    RETURN ARRAY[CASE WHEN ok THEN 1 ELSE 0 END::bigint] || st;
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

-- Replace the hold of p_rid_hash by p_amounts on every line (p_hashes distinct) and log the
-- record, once per id. Returns [applied, 12 integers per line] (the states after settling),
-- or [-1] when a line must be added first (see tb_add_lines).
CREATE OR REPLACE FUNCTION tb_settle(
    p_rid_hash bytea, p_hashes bytea[], p_buckets bigint[], p_lows bigint[],
    p_expires double precision[], p_amounts bigint[], p_now double precision,
    p_ts double precision, p_rid text, p_scopes text, p_model text, p_requested_model text,
    p_action text, p_input bigint, p_output bigint, p_cached bigint, p_usd double precision,
    p_priced boolean, p_estimated boolean, p_extra text,
    p_scope_hashes bytea[], p_scope_names text[]
) RETURNS bigint[] LANGUAGE plpgsql AS $$
BEGIN
    IF tb_lock_lines(p_hashes, p_rid_hash) < 0 THEN
        RETURN ARRAY[-1::bigint];
    END IF;
    IF tb_log(p_rid_hash, p_ts, p_rid, p_scopes, p_model, p_requested_model, p_action, p_input,
              p_output, p_cached, p_usd, p_priced, p_estimated, p_extra, p_scope_hashes,
              p_scope_names) IS NULL THEN
        RETURN ARRAY[0::bigint] || tb_states(p_hashes, p_lows, p_buckets, p_now, NULL);
    END IF;
    WITH gone AS (DELETE FROM holds WHERE rid_hash = p_rid_hash)
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
           expires_at = CASE WHEN c.expires_at IS NULL OR excluded.expires_at IS NULL THEN NULL
                             ELSE greatest(c.expires_at, excluded.expires_at) END;
    RETURN ARRAY[1::bigint] || tb_states(p_hashes, p_lows, p_buckets, p_now, NULL);
END
$$;

-- Drop every hold of p_rid_hash; true if one of them was still live at p_now.
CREATE OR REPLACE FUNCTION tb_release(p_rid_hash bytea, p_now double precision)
RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
    live boolean;
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    IF tb_lock_lines('{}'::bytea[], p_rid_hash) = 0 THEN
        RETURN false;
    END IF;
    WITH gone AS (DELETE FROM holds WHERE rid_hash = p_rid_hash RETURNING expires_at)
    SELECT coalesce(bool_or(expires_at > p_now), false) INTO live FROM gone;
    RETURN live;
END
$$;

-- Delete what is no longer read: holds expired at p_now (an expired hold counts nowhere, so
-- deleting it needs no line lock), counters whose window ended before p_before, lines left with
-- neither, and alert claims that expired before p_before. Never waits for a row another
-- transaction holds (SKIP LOCKED); returns how many rows went.
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

INSERT INTO meta (key, value) VALUES ('schema_version', '1') ON CONFLICT (key) DO NOTHING;
