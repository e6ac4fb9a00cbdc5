//! The source of truth: the [`Authorizer`] plug-in point.
//!
//! ```
//! use tower_authz_cache::{Authorizer, Decision, Permission, Principal};
//!
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! let authorizer = |principal: Principal, permission: Permission| async move {
//!     let allowed = principal.id() == "alice" || permission.action() == "read";
//!     Ok::<_, std::convert::Infallible>(Decision::from_bool(allowed))
//! };
//! let bob = Principal::new("bob");
//! let delete = Permission::new("documents:1", "delete");
//! assert!(!authorizer.authorize(&bob, &delete).await.unwrap().is_allowed());
//! # });
//! ```

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::{BoxError, Decision, Permission, Principal};

/// Decides whether a principal holds a permission. Only the authorizer ever produces an allow:
/// the cache only remembers its answers.
///
/// Implemented for closures `Fn(Principal, Permission) -> impl Future<Output = Result<Decision, E>>`.
/// An `Err` means "could not decide": it is never cached, and the request gets 503 unless a
/// valid cached decision exists.
pub trait Authorizer: Send + Sync + 'static {
    /// Decides.
    fn authorize(
        &self,
        principal: &Principal,
        permission: &Permission,
    ) -> impl Future<Output = Result<Decision, BoxError>> + Send;

    /// Decides several permissions of one principal: one decision per permission, in order
    /// (the cache's batch checks, [`AuthzCache::check_many`](crate::AuthzCache::check_many), ask
    /// their misses this way). The default calls [`authorize`](Self::authorize) for each,
    /// concurrently; override it when the source of truth answers a batch in one round trip (as
    /// `PostgresRbacAuthorizer` does). An `Err` means none of them could be decided; an answer
    /// of another length is treated as one.
    fn authorize_many(
        &self,
        principal: &Principal,
        permissions: &[Permission],
    ) -> impl Future<Output = Result<Vec<Decision>, BoxError>> + Send {
        async move {
            let all = futures_util::future::join_all(permissions.iter().map(|p| self.authorize(principal, p)));
            all.await.into_iter().collect()
        }
    }
}

impl<F, Fut, E> Authorizer for F
where
    F: Fn(Principal, Permission) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Decision, E>> + Send,
    E: Into<BoxError>,
{
    fn authorize(
        &self,
        principal: &Principal,
        permission: &Permission,
    ) -> impl Future<Output = Result<Decision, BoxError>> + Send {
        let fut = self(principal.clone(), permission.clone());
        async move { fut.await.map_err(Into::into) }
    }
}

pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Object-safe form of [`Authorizer`], so the cache does not carry its type.
pub(crate) trait DynAuthorizer: Send + Sync + 'static {
    fn authorize_owned(&self, principal: Principal, permission: Permission) -> BoxFuture<Result<Decision, BoxError>>;

    fn authorize_many_owned(
        &self,
        principal: Principal,
        permissions: Vec<Permission>,
    ) -> BoxFuture<Result<Vec<Decision>, BoxError>>;
}

pub(crate) struct ErasedAuthorizer<A>(pub(crate) Arc<A>);

impl<A: Authorizer> DynAuthorizer for ErasedAuthorizer<A> {
    fn authorize_owned(&self, principal: Principal, permission: Permission) -> BoxFuture<Result<Decision, BoxError>> {
        let a = self.0.clone();
        Box::pin(async move { a.authorize(&principal, &permission).await })
    }

    fn authorize_many_owned(
        &self,
        principal: Principal,
        permissions: Vec<Permission>,
    ) -> BoxFuture<Result<Vec<Decision>, BoxError>> {
        let a = self.0.clone();
        Box::pin(async move { a.authorize_many(&principal, &permissions).await })
    }
}
