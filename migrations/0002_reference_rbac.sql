-- A reference RBAC schema for the demo and the tests, its materialized views, and the change
-- feed: any change to who holds what NOTIFYs '<schema>.authz_cache_changes' with the affected
-- principal, so every instance invalidates it without anyone calling the invalidation service.
-- The views are refreshed (concurrently) by statement triggers in the same transaction as the
-- change, so by the time a notification is delivered (at commit) the views already agree.

CREATE TABLE IF NOT EXISTS users (
    id   text PRIMARY KEY
);
CREATE TABLE IF NOT EXISTS roles (
    id   text PRIMARY KEY
);
-- `resource_pattern` is a resource ('documents:7') or a prefix pattern ending in '*'
-- ('documents:*').
CREATE TABLE IF NOT EXISTS role_permissions (
    role_id          text NOT NULL REFERENCES roles (id) ON DELETE CASCADE,
    resource_pattern text NOT NULL,
    action           text NOT NULL,
    PRIMARY KEY (role_id, resource_pattern, action)
);
CREATE TABLE IF NOT EXISTS user_roles (
    user_id text NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    role_id text NOT NULL REFERENCES roles (id) ON DELETE CASCADE,
    PRIMARY KEY (user_id, role_id)
);
CREATE TABLE IF NOT EXISTS teams (
    id text PRIMARY KEY
);
CREATE TABLE IF NOT EXISTS team_members (
    team_id text NOT NULL REFERENCES teams (id) ON DELETE CASCADE,
    user_id text NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    PRIMARY KEY (team_id, user_id)
);
CREATE INDEX IF NOT EXISTS user_roles_role ON user_roles (role_id);
CREATE INDEX IF NOT EXISTS team_members_user ON team_members (user_id);

-- Pre-computed grants: (user, resource pattern, action).
CREATE MATERIALIZED VIEW IF NOT EXISTS mv_user_authorization_context AS
SELECT DISTINCT ur.user_id, rp.resource_pattern, rp.action
FROM user_roles ur
JOIN role_permissions rp ON rp.role_id = ur.role_id;
-- A unique index makes REFRESH ... CONCURRENTLY possible (readers are never blocked).
CREATE UNIQUE INDEX IF NOT EXISTS mv_user_authorization_context_key
    ON mv_user_authorization_context (user_id, resource_pattern, action);

-- Who works with whom: when a principal becomes active, its team-mates are worth warming.
CREATE MATERIALIZED VIEW IF NOT EXISTS mv_team_collaboration_patterns AS
SELECT a.user_id AS principal, b.user_id AS teammate, count(*) AS shared_teams
FROM team_members a
JOIN team_members b ON a.team_id = b.team_id AND a.user_id <> b.user_id
GROUP BY a.user_id, b.user_id;
CREATE UNIQUE INDEX IF NOT EXISTS mv_team_collaboration_patterns_key
    ON mv_team_collaboration_patterns (principal, teammate);

-- Refreshes both views without blocking readers.
CREATE OR REPLACE FUNCTION authz_refresh_authorization_views()
RETURNS void LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    REFRESH MATERIALIZED VIEW CONCURRENTLY mv_user_authorization_context;
    REFRESH MATERIALIZED VIEW CONCURRENTLY mv_team_collaboration_patterns;
END;
$$;

CREATE OR REPLACE FUNCTION authz_refresh_authorization_views_trigger()
RETURNS trigger LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    PERFORM authz_refresh_authorization_views();
    RETURN NULL;
END;
$$;

-- The change feed. Payloads: 'principal <id>'. Postgres folds identical notifications sent in
-- one transaction into one.
CREATE OR REPLACE FUNCTION authz_notify_user_roles()
RETURNS trigger LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        PERFORM pg_notify(TG_TABLE_SCHEMA || '.authz_cache_changes', 'principal ' || OLD.user_id);
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        PERFORM pg_notify(TG_TABLE_SCHEMA || '.authz_cache_changes', 'principal ' || NEW.user_id);
    END IF;
    RETURN NULL;
END;
$$;

-- A role's permissions changed: every holder of the role is affected.
CREATE OR REPLACE FUNCTION authz_notify_role_permissions()
RETURNS trigger LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    r text := CASE WHEN TG_OP = 'DELETE' THEN OLD.role_id ELSE NEW.role_id END;
    u text;
BEGIN
    FOR u IN SELECT user_id FROM user_roles WHERE role_id = r
             UNION SELECT user_id FROM user_roles WHERE TG_OP = 'UPDATE' AND role_id = OLD.role_id LOOP
        PERFORM pg_notify(TG_TABLE_SCHEMA || '.authz_cache_changes', 'principal ' || u);
    END LOOP;
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS authz_user_roles_changed ON user_roles;
CREATE TRIGGER authz_user_roles_changed
    AFTER INSERT OR UPDATE OR DELETE ON user_roles
    FOR EACH ROW EXECUTE FUNCTION authz_notify_user_roles();

DROP TRIGGER IF EXISTS authz_role_permissions_changed ON role_permissions;
CREATE TRIGGER authz_role_permissions_changed
    AFTER INSERT OR UPDATE OR DELETE ON role_permissions
    FOR EACH ROW EXECUTE FUNCTION authz_notify_role_permissions();

DROP TRIGGER IF EXISTS authz_user_roles_refresh ON user_roles;
CREATE TRIGGER authz_user_roles_refresh
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON user_roles
    FOR EACH STATEMENT EXECUTE FUNCTION authz_refresh_authorization_views_trigger();

DROP TRIGGER IF EXISTS authz_role_permissions_refresh ON role_permissions;
CREATE TRIGGER authz_role_permissions_refresh
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON role_permissions
    FOR EACH STATEMENT EXECUTE FUNCTION authz_refresh_authorization_views_trigger();

DROP TRIGGER IF EXISTS authz_team_members_refresh ON team_members;
CREATE TRIGGER authz_team_members_refresh
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON team_members
    FOR EACH STATEMENT EXECUTE FUNCTION authz_refresh_authorization_views_trigger();
