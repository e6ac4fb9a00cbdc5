-- tower-authz-cache L3: entries, shared epochs, and the epoch bump that doubles as the
-- LISTEN/NOTIFY backplane. Plain SQL, applied explicitly (never at request time) with
-- `search_path` set to the target schema; functions keep that schema (`SET search_path FROM
-- CURRENT`) and notify channels named after it ('<schema>.authz_cache_epochs'), so several
-- schemas in one database never hear each other.

-- What was applied, and when (for `authz-cache init` reports).
CREATE TABLE IF NOT EXISTS authz_cache_migrations (
    name       text        PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- One row per cached decision. `key` is the 32-byte HMAC-SHA256 key id (no principal id,
-- token or resource id appears here); `value` is the MAC-protected envelope, the same bytes as
-- in Redis; `expires_at` is the entry's deadline, fixed when the authorizer answered.
-- `subject` is the (principal, resource, action) tuple sealed with an AEAD key derived from the
-- secret, so warming can rebuild in-process entries without Postgres ever holding the ids in
-- clear; `principal_hash` is the keyed scope hash of the principal (warming a team-mate reads
-- that principal's most-hit rows).
CREATE TABLE IF NOT EXISTS authz_cache_entries (
    key            bytea       PRIMARY KEY CHECK (octet_length(key) = 32),
    value          bytea       NOT NULL CHECK (octet_length(value) BETWEEN 45 AND 1200),
    subject        bytea       NOT NULL CHECK (octet_length(subject) <= 8192),
    principal_hash bigint      NOT NULL,
    expires_at     timestamptz NOT NULL,
    hits           bigint      NOT NULL DEFAULT 0,
    written_at     timestamptz NOT NULL DEFAULT now()
);
-- Sweeps delete expired rows in batches by this index.
CREATE INDEX IF NOT EXISTS authz_cache_entries_expires_at ON authz_cache_entries (expires_at);
-- Warming reads the most-hit entries.
CREATE INDEX IF NOT EXISTS authz_cache_entries_hits ON authz_cache_entries (hits DESC);
-- Warming one principal's entries.
CREATE INDEX IF NOT EXISTS authz_cache_entries_principal ON authz_cache_entries (principal_hash, hits DESC);

-- Shared epochs when Postgres is the only shared store: scope 'g' (global, hash 0), 'p'
-- (principal), 'r' (resource), 'k' (entry), keyed by the 64-bit keyed scope hash.
CREATE TABLE IF NOT EXISTS authz_cache_epochs (
    scope      "char"      NOT NULL CHECK (scope IN ('g', 'p', 'r', 'k')),
    hash       bigint      NOT NULL,
    value      bigint      NOT NULL,
    expires_at timestamptz,
    PRIMARY KEY (scope, hash)
);

CREATE SEQUENCE IF NOT EXISTS authz_cache_epoch_seq;

-- Bumps an epoch: the next value of the sequence, floored at the caller's clock in microseconds
-- so that values keep increasing across a restore; stores it (with an expiry, except the global
-- one) and notifies every listener with the same message format as the Redis backplane:
-- 'i <scope> <hash as 16 hex digits> <value>' on '<schema>.authz_cache_epochs'. Returns the new
-- value.
CREATE OR REPLACE FUNCTION authz_cache_bump(p_scope "char", p_hash bigint, p_floor_us bigint, p_ttl_ms bigint)
RETURNS bigint LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v bigint := nextval('authz_cache_epoch_seq');
BEGIN
    IF v < p_floor_us THEN
        PERFORM setval('authz_cache_epoch_seq', p_floor_us);
        v := p_floor_us;
    END IF;
    INSERT INTO authz_cache_epochs (scope, hash, value, expires_at)
    VALUES (p_scope, p_hash, v,
            CASE WHEN p_scope = 'g' OR p_ttl_ms <= 0 THEN NULL
                 ELSE now() + p_ttl_ms * interval '1 millisecond' END)
    ON CONFLICT (scope, hash) DO UPDATE
        SET value = GREATEST(authz_cache_epochs.value, EXCLUDED.value),
            expires_at = EXCLUDED.expires_at;
    PERFORM pg_notify(current_schema() || '.authz_cache_epochs',
                      'i ' || p_scope::text || ' ' || lpad(to_hex(p_hash), 16, '0') || ' ' || v);
    RETURN v;
END;
$$;

-- Removes at most `p_batch` expired entries and forgettable epochs; returns how many rows went.
-- Call it until it returns less than `p_batch`.
CREATE OR REPLACE FUNCTION authz_cache_sweep(p_batch integer)
RETURNS integer LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    n integer;
    m integer;
BEGIN
    DELETE FROM authz_cache_entries
    WHERE key IN (SELECT key FROM authz_cache_entries WHERE expires_at < now() LIMIT p_batch);
    GET DIAGNOSTICS n = ROW_COUNT;
    DELETE FROM authz_cache_epochs
    WHERE (scope, hash) IN (SELECT scope, hash FROM authz_cache_epochs
                            WHERE expires_at IS NOT NULL AND expires_at < now() LIMIT p_batch);
    GET DIAGNOSTICS m = ROW_COUNT;
    RETURN n + m;
END;
$$;
