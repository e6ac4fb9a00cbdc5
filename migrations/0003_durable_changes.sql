-- Epochs that only rise, and revocations that cannot be lost.
--
-- 1. A bump leaves the stored value of its scope strictly greater than before, computed here,
--    atomically: max(stored + 1, caller's floor, high water + 1), where the high water is the
--    largest value ever assigned in this schema. The caller's floor (its wall clock in µs and the
--    highest value it has seen) only ever raises a value; no clock can lower one. Values
--    saturate at the largest bigint.
--
-- 2. A change to the permission tables is recorded in `authz_cache_changes`, in the changing
--    transaction, before anything is notified. The NOTIFY that follows is only a hint that makes
--    instances look sooner: every instance also polls the table, and drains it when it
--    reconnects. Draining (any instance, `FOR UPDATE SKIP LOCKED`, so two instances never apply
--    one change twice) bumps the affected epochs and deletes the rows in one transaction. While
--    a change is not applied, no L3 entry is accepted (every L3 read checks the table), and an
--    instance that has not seen the table empty for `max_staleness` trusts neither its L1 nor L2.
--
--    Which scope a change falls back to (the bulk rule): a statement naming at most
--    authz_cache_bulk_limit() principals (1000; replace the function to change it) records one
--    row per principal; a statement naming more, a role's permissions changed when the role has
--    more holders than that, and every TRUNCATE record one row without a principal, which
--    invalidates everything. A change is never recorded as less than what it touched.
--
-- 3. `authz_cache_mirror` holds Postgres epoch values that Redis (L2) has not been raised to yet,
--    so that an instance that could not reach Redis leaves the debt where every instance finds
--    and pays it; while it is not empty, no instance with L2 trusts L2.
--
-- Applications with permission tables of their own record changes with
-- `SELECT authz_cache_record_changes(ARRAY['alice', 'bob'])` (NULL: everything) from their own
-- triggers or in the changing transaction.

-- The largest value ever assigned here (one row).
CREATE TABLE IF NOT EXISTS authz_cache_epoch_high (
    id    boolean PRIMARY KEY DEFAULT true CHECK (id),
    value bigint  NOT NULL
);
INSERT INTO authz_cache_epoch_high (id, value)
SELECT true, GREATEST(COALESCE((SELECT max(value) FROM authz_cache_epochs), 0),
                      (SELECT last_value FROM authz_cache_epoch_seq))
ON CONFLICT (id) DO NOTHING;

-- v + 1, saturating at the largest bigint.
CREATE OR REPLACE FUNCTION authz_cache_succ(v bigint)
RETURNS bigint LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN v >= 9223372036854775806 THEN 9223372036854775807 ELSE v + 1 END
$$;

-- Bumps an epoch and notifies every listener ('i <scope> <hash as 16 hex digits> <value>' on
-- '<schema>.authz_cache_epochs'); returns the value stored. Bumps of one schema are serialised on
-- the high-water row, so every value assigned is larger than every value assigned before it.
CREATE OR REPLACE FUNCTION authz_cache_bump(p_scope "char", p_hash bigint, p_floor_us bigint, p_ttl_ms bigint)
RETURNS bigint LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    h bigint;
    v bigint;
BEGIN
    UPDATE authz_cache_epoch_high SET value = GREATEST(authz_cache_succ(value), p_floor_us)
    RETURNING value INTO h;
    IF h IS NULL THEN
        INSERT INTO authz_cache_epoch_high (id, value) VALUES (true, GREATEST(p_floor_us, 1))
        ON CONFLICT (id) DO UPDATE SET value = GREATEST(authz_cache_succ(authz_cache_epoch_high.value), p_floor_us)
        RETURNING value INTO h;
    END IF;
    INSERT INTO authz_cache_epochs AS e (scope, hash, value, expires_at)
    VALUES (p_scope, p_hash, h,
            CASE WHEN p_scope = 'g' OR p_ttl_ms <= 0 THEN NULL
                 ELSE now() + p_ttl_ms * interval '1 millisecond' END)
    ON CONFLICT (scope, hash) DO UPDATE
        SET value = GREATEST(authz_cache_succ(e.value), EXCLUDED.value),
            expires_at = EXCLUDED.expires_at
    RETURNING e.value INTO v;
    IF v > h THEN
        UPDATE authz_cache_epoch_high SET value = v;
    END IF;
    PERFORM pg_notify(current_schema() || '.authz_cache_epochs',
                      'i ' || p_scope::text || ' ' || lpad(to_hex(p_hash), 16, '0') || ' ' || v);
    RETURN v;
END;
$$;

-- Changes to the permission tables not applied to the epochs yet. `principal` NULL: everything.
CREATE TABLE IF NOT EXISTS authz_cache_changes (
    seq         bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    principal   text,
    recorded_at timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- Postgres epoch values Redis has not been raised to yet.
CREATE TABLE IF NOT EXISTS authz_cache_mirror (
    scope "char" NOT NULL,
    hash  bigint NOT NULL,
    value bigint NOT NULL,
    PRIMARY KEY (scope, hash)
);

-- Statements naming more principals than this invalidate everything instead.
CREATE OR REPLACE FUNCTION authz_cache_bulk_limit()
RETURNS integer LANGUAGE sql IMMUTABLE AS $$ SELECT 1000 $$;

-- Records that the permissions of `p_principals` changed (NULL, or more than
-- authz_cache_bulk_limit() of them: everything; an empty array: nobody, nothing is recorded),
-- then hints every listener.
CREATE OR REPLACE FUNCTION authz_cache_record_changes(p_principals text[])
RETURNS void LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    IF cardinality(p_principals) = 0 THEN
        RETURN;
    END IF;
    IF p_principals IS NULL OR cardinality(p_principals) > authz_cache_bulk_limit() THEN
        INSERT INTO authz_cache_changes (principal) VALUES (NULL);
    ELSE
        INSERT INTO authz_cache_changes (principal)
        SELECT DISTINCT p FROM unnest(p_principals) AS t(p) WHERE p IS NOT NULL;
    END IF;
    -- One payload for every change: Postgres folds identical notifications of a transaction
    -- into one, and no principal id has to fit in a payload.
    PERFORM pg_notify(current_schema() || '.authz_cache_changes', 'changed');
END;
$$;

-- Applies changes a drainer took (`SELECT seq, principal FROM authz_cache_changes ORDER BY seq
-- LIMIT n FOR UPDATE SKIP LOCKED`, in the same transaction): bumps each target (the drainer
-- names them by keyed hash: the hashes need the secret), records the values for Redis when
-- `p_mirror`, and deletes the changes. Returns the values stored.
CREATE OR REPLACE FUNCTION authz_cache_apply_changes(p_seqs bigint[], p_scopes "char"[], p_hashes bigint[],
                                                     p_floor_us bigint, p_ttl_ms bigint, p_mirror boolean)
RETURNS TABLE (out_scope "char", out_hash bigint, out_value bigint)
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    i integer;
    v bigint;
BEGIN
    FOR i IN 1 .. coalesce(cardinality(p_scopes), 0) LOOP
        v := authz_cache_bump(p_scopes[i], p_hashes[i], p_floor_us, p_ttl_ms);
        IF p_mirror THEN
            INSERT INTO authz_cache_mirror AS m (scope, hash, value) VALUES (p_scopes[i], p_hashes[i], v)
            ON CONFLICT (scope, hash) DO UPDATE SET value = GREATEST(m.value, EXCLUDED.value);
        END IF;
        out_scope := p_scopes[i];
        out_hash := p_hashes[i];
        out_value := v;
        RETURN NEXT;
    END LOOP;
    DELETE FROM authz_cache_changes WHERE seq = ANY (p_seqs);
END;
$$;
