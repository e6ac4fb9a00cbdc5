//! [`PostgresRbacAuthorizer`] (feature `postgres`): an [`Authorizer`](crate::Authorizer) that
//! answers from the reference RBAC schema's materialized view `mv_user_authorization_context`
//! (see `migrations/0002_reference_rbac.sql`).
//!
//! A principal holds `resource:action` when one of its roles grants `action` on a pattern equal
//! to the resource, on `*`, or on a prefix pattern ending in `*` (`documents:*` covers
//! `documents:7`). The view is refreshed in the same transaction as every change to the
//! permission tables, and the tables' triggers notify the change feed, so a cache in front of
//! this authorizer forgets a changed principal everywhere and asks again, and gets the new
//! answer.
//!
//! ```no_run
//! use tower_authz_cache::{AuthzCache, PostgresRbacAuthorizer, PostgresTier};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let url = "postgres://app@127.0.0.1/app";
//! let l3 = PostgresTier::builder(url).schema("authz_cache").build()?;
//! l3.migrate_with_reference_rbac().await?;
//! let cache = AuthzCache::builder(PostgresRbacAuthorizer::new(url, "authz_cache")?)
//!     .secret(std::env::var("AUTHZ_CACHE_SECRET")?)
//!     .l3(l3)
//!     .build();
//! # Ok(()) }
//! ```

use std::fmt;

use diesel::pg::Pg;
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};
use diesel::sql_types::{Bool, Text};
use diesel_async::RunQueryDsl;
use diesel_async::pooled_connection::AsyncDieselConnectionManager;

use crate::tier::pool::{self, Checked};

use crate::tier::postgres::{Manager, PgFailure, PostgresTierError};
use crate::{BoxError, Decision, Permission, Principal};

/// Answers from `mv_user_authorization_context` in a schema migrated by
/// [`PostgresTier::migrate`](crate::PostgresTier::migrate). Holds its own small pool (10
/// connections, made lazily).
pub struct PostgresRbacAuthorizer {
    pool: bb8::Pool<Manager>,
    sql: [String; 4],
    batch_sql: String,
    teammates_sql: String,
}

impl fmt::Debug for PostgresRbacAuthorizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresRbacAuthorizer").finish_non_exhaustive()
    }
}

impl PostgresRbacAuthorizer {
    /// An authorizer on the database at `url`, reading the view in `schema`.
    pub fn new(url: &str, schema: &str) -> Result<Self, PostgresTierError> {
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(PostgresTierError::config("database url must start with postgres:// or postgresql://"));
        }
        if !crate::tier::names::schema_ok(schema) {
            return Err(PostgresTierError::config("schema must be 1-40 of [a-z0-9_], not starting with a digit"));
        }
        let pool = bb8::Pool::builder()
            .max_size(10)
            .connection_timeout(std::time::Duration::from_secs(2))
            .test_on_check_out(false)
            .retry_connection(false)
            .build_unchecked(Checked(AsyncDieselConnectionManager::new(url)));
        Ok(Self {
            pool,
            batch_sql: format!(
                "SELECT EXISTS (SELECT 1 FROM {schema}.mv_user_authorization_context c WHERE c.user_id = $1 \
                 AND c.action = t.action AND (c.resource_pattern = '*' OR c.resource_pattern = t.resource \
                 OR (right(c.resource_pattern, 1) = '*' AND starts_with(t.resource, left(c.resource_pattern, -1))))) \
                 AS granted FROM unnest($2, $3) WITH ORDINALITY AS t(resource, action, n) ORDER BY t.n"
            ),
            teammates_sql: format!(
                "SELECT teammate FROM {schema}.mv_team_collaboration_patterns WHERE principal = $1 \
                 ORDER BY shared_teams DESC, teammate LIMIT $2"
            ),
            sql: [
                format!("SELECT EXISTS (SELECT 1 FROM {schema}.mv_user_authorization_context WHERE user_id = "),
                " AND action = ".to_owned(),
                " AND (resource_pattern = '*' OR resource_pattern = ".to_owned(),
                " OR (right(resource_pattern, 1) = '*' AND starts_with(".to_owned(),
            ],
        })
    }
}

/// The grant lookup, prepared once per connection (a hand-built query so that diesel caches it).
struct GrantQuery<'a> {
    sql: &'a [String; 4],
    principal: &'a str,
    resource: &'a str,
    action: &'a str,
}

impl QueryId for GrantQuery<'_> {
    type QueryId = ();
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl Query for GrantQuery<'_> {
    type SqlType = Bool;
}

impl QueryFragment<Pg> for GrantQuery<'_> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> diesel::QueryResult<()> {
        out.push_sql(&self.sql[0]);
        out.push_bind_param::<Text, _>(&self.principal)?;
        out.push_sql(&self.sql[1]);
        out.push_bind_param::<Text, _>(&self.action)?;
        out.push_sql(&self.sql[2]);
        out.push_bind_param::<Text, _>(&self.resource)?;
        out.push_sql(&self.sql[3]);
        out.push_bind_param::<Text, _>(&self.resource)?;
        out.push_sql(", left(resource_pattern, -1)))))");
        Ok(())
    }
}

impl crate::Authorizer for PostgresRbacAuthorizer {
    async fn authorize(&self, principal: &Principal, permission: &Permission) -> Result<Decision, BoxError> {
        let query = GrantQuery {
            sql: &self.sql,
            principal: principal.id(),
            resource: permission.resource(),
            action: permission.action(),
        };
        let granted = pool::with_conn(&self.pool, connect_error("postgres authorizer"), Result::is_ok, async |conn| {
            query.get_result::<bool>(conn).await.map_err(|e| format!("postgres authorizer: {}", PgFailure::from(e)))
        })
        .await
        .map_err(BoxError::from)?;
        Ok(Self::decision(granted, permission))
    }

    /// One statement for the whole batch.
    async fn authorize_many(
        &self,
        principal: &Principal,
        permissions: &[Permission],
    ) -> Result<Vec<Decision>, BoxError> {
        self.authorize_batch(principal, permissions).await
    }
}

/// Team-mates from the reference schema's `mv_team_collaboration_patterns` (the principals who
/// share the most teams), for
/// [`AuthzCacheBuilder::warm_teammates`](crate::AuthzCacheBuilder::warm_teammates).
impl PostgresRbacAuthorizer {
    /// What a grant lookup turns into: the allow, or the deny with its reason.
    fn decision(granted: bool, permission: &Permission) -> Decision {
        if granted {
            Decision::allow()
        } else {
            Decision::deny().with_reason(format!("no role grants {} on {}", permission.action(), permission.resource()))
        }
    }

    /// The batch: one statement over the permissions as two arrays (`unnest ... WITH
    /// ORDINALITY`), one row per permission, in order.
    async fn authorize_batch(
        &self,
        principal: &Principal,
        permissions: &[Permission],
    ) -> Result<Vec<Decision>, BoxError> {
        #[derive(diesel::QueryableByName)]
        struct Granted {
            #[diesel(sql_type = Bool)]
            granted: bool,
        }
        let resources: Vec<&str> = permissions.iter().map(Permission::resource).collect();
        let actions: Vec<&str> = permissions.iter().map(Permission::action).collect();
        let rows = pool::with_conn(&self.pool, connect_error("postgres authorizer"), Result::is_ok, async |conn| {
            diesel::sql_query(self.batch_sql.as_str())
                .bind::<Text, _>(principal.id())
                .bind::<diesel::sql_types::Array<Text>, _>(&resources)
                .bind::<diesel::sql_types::Array<Text>, _>(&actions)
                .load::<Granted>(conn)
                .await
                .map_err(|e| format!("postgres authorizer: {}", PgFailure::from(e)))
        })
        .await
        .map_err(BoxError::from)?;
        if rows.len() != permissions.len() {
            return Err(
                format!("postgres authorizer: {} rows for {} permissions", rows.len(), permissions.len()).into()
            );
        }
        Ok(rows.into_iter().zip(permissions).map(|(row, p)| Self::decision(row.granted, p)).collect())
    }
}

/// How a pooled connection that could not be had reads in `what`'s error.
fn connect_error<E: fmt::Display>(what: &'static str) -> impl FnOnce(bb8::RunError<E>) -> String {
    move |e| match e {
        bb8::RunError::User(e) => format!("{what}: connect: {e}"),
        bb8::RunError::TimedOut => format!("{what}: timed out waiting for a connection"),
    }
}

impl crate::tier::Teammates for PostgresRbacAuthorizer {
    fn teammates<'a>(&'a self, principal: &'a str, limit: usize) -> crate::tier::TierFuture<'a, Vec<String>> {
        #[derive(diesel::QueryableByName)]
        struct Mate {
            #[diesel(sql_type = Text)]
            teammate: String,
        }
        Box::pin(async move {
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            let mates =
                pool::with_conn(&self.pool, connect_error("postgres team-mates"), Result::is_ok, async |conn| {
                    diesel::sql_query(self.teammates_sql.as_str())
                        .bind::<Text, _>(principal)
                        .bind::<diesel::sql_types::BigInt, _>(limit)
                        .load::<Mate>(conn)
                        .await
                        .map_err(|e| format!("postgres team-mates: {}", PgFailure::from(e)))
                })
                .await
                .map_err(crate::tier::TierError::new)?;
            Ok(mates.into_iter().map(|m| m.teammate).collect())
        })
    }
}
