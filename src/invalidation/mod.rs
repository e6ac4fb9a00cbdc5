//! Invalidation: [`Invalidation`] and [`InvalidationService`], a tower `Service<Invalidation>`.
//!
//! Invalidating bumps an epoch (O(1), no scans): every cached decision the invalidation covers,
//! including one being computed at that moment, is a miss from the moment the call returns.
//!
//! ```
//! use tower::{Service, ServiceExt};
//! use tower_authz_cache::{AuthzCache, Decision, Invalidation, Permission, Principal};
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let cache = AuthzCache::builder(|_: Principal, _: Permission| async {
//!     Ok::<_, std::convert::Infallible>(Decision::allow())
//! })
//! .build();
//! let mut invalidations = cache.invalidation_service();
//! invalidations.ready().await.unwrap().call(Invalidation::principal("bob")).await.unwrap();
//! invalidations.ready().await.unwrap().call(Invalidation::resource("documents:7")).await.unwrap();
//! invalidations.ready().await.unwrap().call(Invalidation::All).await.unwrap();
//! assert_eq!(cache.stats().invalidations.principal, 1);
//! # });
//! ```

pub(crate) mod backplane;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tower::Service;

use crate::consistency::ConsistencyToken;
use crate::{AuthzCache, Permission, Principal};

/// What to forget.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Invalidation {
    /// Every decision about this principal id ("bob's roles changed").
    Principal(String),
    /// Every decision about this resource ("document 7 was re-shared").
    Resource(String),
    /// One decision.
    Entry {
        /// The principal id.
        principal: String,
        /// The permission.
        permission: Permission,
    },
    /// Everything.
    All,
}

impl Invalidation {
    /// Every decision about principal `id`.
    pub fn principal(id: impl Into<String>) -> Self {
        Invalidation::Principal(id.into())
    }

    /// Every decision about `resource`.
    pub fn resource(resource: impl Into<String>) -> Self {
        Invalidation::Resource(resource.into())
    }

    /// The decision for `principal` on `permission`.
    pub fn entry(principal: impl Into<String>, permission: Permission) -> Self {
        Invalidation::Entry { principal: principal.into(), permission }
    }
}

/// An invalidation could not be delivered to the other instances (the shared tier was
/// unreachable). It has been applied to this process before this error is returned; retry it
/// to reach the others.
#[derive(Debug)]
pub struct InvalidationError {
    _private: (),
}

impl fmt::Display for InvalidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("invalidation not delivered")
    }
}

impl std::error::Error for InvalidationError {}

impl AuthzCache {
    /// Applies an invalidation. When this returns, no decision it covers is served by this
    /// cache, including decisions whose computation was already under way.
    ///
    /// With shared tiers, the invalidation also goes to the shared epochs and the backplane, so
    /// every instance stops serving what it covers; if the tiers cannot be reached it is applied
    /// to this process only and an [`InvalidationError`] says so.
    ///
    /// The [`ConsistencyToken`] returned proves the invalidation: a check on any instance that
    /// shares the secret and requires it ([`AuthzCache::check_at_least_as_fresh`], or the layer's
    /// `authz-consistency` header) serves nothing computed before it, whatever the backplane has
    /// delivered yet. Give it to the client whose next request must see the change.
    pub async fn invalidate(&self, invalidation: &Invalidation) -> Result<ConsistencyToken, InvalidationError> {
        self.apply_invalidation(invalidation, None).await.map_err(|()| InvalidationError { _private: () })
    }

    /// [`invalidate`](AuthzCache::invalidate), recording who asked in the audit event (as a
    /// short keyed hash of their id, like every principal in logs).
    pub async fn invalidate_as(
        &self,
        invalidation: &Invalidation,
        requested_by: &Principal,
    ) -> Result<ConsistencyToken, InvalidationError> {
        self.apply_invalidation(invalidation, Some(requested_by.id()))
            .await
            .map_err(|()| InvalidationError { _private: () })
    }

    /// A tower service that applies invalidations to this cache.
    pub fn invalidation_service(&self) -> InvalidationService {
        InvalidationService { cache: self.clone() }
    }
}

/// `tower::Service<Invalidation>` over an [`AuthzCache`]: answers each invalidation with its
/// [`ConsistencyToken`]. Always ready; cheap to clone.
#[derive(Clone, Debug)]
pub struct InvalidationService {
    cache: AuthzCache,
}

impl Service<Invalidation> for InvalidationService {
    type Response = ConsistencyToken;
    type Error = InvalidationError;
    type Future = InvalidationFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, invalidation: Invalidation) -> Self::Future {
        let cache = self.cache.clone();
        InvalidationFuture { inner: Box::pin(async move { cache.invalidate(&invalidation).await }) }
    }
}

/// The future returned by [`InvalidationService`].
pub struct InvalidationFuture {
    inner: Pin<Box<dyn Future<Output = Result<ConsistencyToken, InvalidationError>> + Send>>,
}

impl fmt::Debug for InvalidationFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InvalidationFuture").finish_non_exhaustive()
    }
}

impl Future for InvalidationFuture {
    type Output = Result<ConsistencyToken, InvalidationError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}
