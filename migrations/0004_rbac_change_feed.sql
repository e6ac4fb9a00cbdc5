-- The reference RBAC schema records its changes durably (see 0003_durable_changes.sql): statement
-- triggers with transition tables name every principal a statement touched, in the changing
-- transaction, through authz_cache_record_changes. Replaces 0002's row triggers, which only sent
-- a NOTIFY per row (lost while no instance listened, and one per holder of a changed role).
--
-- The rule for wide changes (stated in 0003 too): more than authz_cache_bulk_limit() principals
-- in one statement, a permission change of a role with more holders than that, and TRUNCATE of
-- either table invalidate everything.

DROP TRIGGER IF EXISTS authz_user_roles_changed ON user_roles;
DROP TRIGGER IF EXISTS authz_role_permissions_changed ON role_permissions;
DROP FUNCTION IF EXISTS authz_notify_user_roles();
DROP FUNCTION IF EXISTS authz_notify_role_permissions();
DROP FUNCTION IF EXISTS authz_role_permissions_holders(text[]);

-- user_roles: the principals in the rows the statement inserted, deleted or updated (old and
-- new); a statement that touched no row (an INSERT ... ON CONFLICT DO NOTHING that found every
-- row there) records nothing. One function for the three statement triggers: each branch reads only the transition
-- tables its event has (PL/pgSQL plans a statement when it first runs it).
CREATE OR REPLACE FUNCTION authz_user_roles_changed() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    touched text[];
BEGIN
    IF TG_OP = 'INSERT' THEN
        touched := ARRAY(SELECT DISTINCT user_id FROM new_rows LIMIT authz_cache_bulk_limit() + 1);
    ELSIF TG_OP = 'DELETE' THEN
        touched := ARRAY(SELECT DISTINCT user_id FROM old_rows LIMIT authz_cache_bulk_limit() + 1);
    ELSE
        touched := ARRAY(SELECT user_id FROM old_rows UNION SELECT user_id FROM new_rows
                         LIMIT authz_cache_bulk_limit() + 1);
    END IF;
    PERFORM authz_cache_record_changes(touched);
    RETURN NULL;
END;
$$;

-- role_permissions: every holder of every role whose rows the statement touched. A role without
-- holders changes nobody's permissions: nothing is recorded.
CREATE OR REPLACE FUNCTION authz_role_permissions_changed() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    roles text[];
    holders text[];
BEGIN
    IF TG_OP = 'INSERT' THEN
        roles := ARRAY(SELECT DISTINCT role_id FROM new_rows);
    ELSIF TG_OP = 'DELETE' THEN
        roles := ARRAY(SELECT DISTINCT role_id FROM old_rows);
    ELSE
        roles := ARRAY(SELECT role_id FROM old_rows UNION SELECT role_id FROM new_rows);
    END IF;
    holders := ARRAY(SELECT DISTINCT user_id FROM user_roles WHERE role_id = ANY (roles)
                     LIMIT authz_cache_bulk_limit() + 1);
    IF cardinality(holders) > 0 THEN
        PERFORM authz_cache_record_changes(holders);
    END IF;
    RETURN NULL;
END;
$$;

-- TRUNCATE names no rows: everything.
CREATE OR REPLACE FUNCTION authz_permissions_truncated() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    PERFORM authz_cache_record_changes(NULL);
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS authz_user_roles_ins ON user_roles;
CREATE TRIGGER authz_user_roles_ins AFTER INSERT ON user_roles
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION authz_user_roles_changed();
DROP TRIGGER IF EXISTS authz_user_roles_del ON user_roles;
CREATE TRIGGER authz_user_roles_del AFTER DELETE ON user_roles
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION authz_user_roles_changed();
DROP TRIGGER IF EXISTS authz_user_roles_upd ON user_roles;
CREATE TRIGGER authz_user_roles_upd AFTER UPDATE ON user_roles
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION authz_user_roles_changed();
DROP TRIGGER IF EXISTS authz_user_roles_trunc ON user_roles;
CREATE TRIGGER authz_user_roles_trunc AFTER TRUNCATE ON user_roles
    FOR EACH STATEMENT EXECUTE FUNCTION authz_permissions_truncated();

DROP TRIGGER IF EXISTS authz_role_permissions_ins ON role_permissions;
CREATE TRIGGER authz_role_permissions_ins AFTER INSERT ON role_permissions
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION authz_role_permissions_changed();
DROP TRIGGER IF EXISTS authz_role_permissions_del ON role_permissions;
CREATE TRIGGER authz_role_permissions_del AFTER DELETE ON role_permissions
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION authz_role_permissions_changed();
DROP TRIGGER IF EXISTS authz_role_permissions_upd ON role_permissions;
CREATE TRIGGER authz_role_permissions_upd AFTER UPDATE ON role_permissions
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION authz_role_permissions_changed();
DROP TRIGGER IF EXISTS authz_role_permissions_trunc ON role_permissions;
CREATE TRIGGER authz_role_permissions_trunc AFTER TRUNCATE ON role_permissions
    FOR EACH STATEMENT EXECUTE FUNCTION authz_permissions_truncated();
