//! [`ResponseFuture`], the future of [`CachedAuthorization`](crate::CachedAuthorization).
//!
//! A state machine with no allocation on an L1 hit: the resolver's future runs inline, the L1
//! lookup is synchronous, and only a miss boxes the rest of the check (the shared tiers and the
//! authorizer) before the inner service's future runs.

use std::fmt;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::request::Parts;
use http::{HeaderValue, Request, Response};
use pin_project::pin_project;
use tower::Service;

use crate::cache::CheckError;
use crate::service::{CACHE_STATUS, Shared};
use crate::{Access, Decision, Permission, Principal, ResolvePrincipal};

/// A check past L1: its outcome, and the principal and permission it was for.
type Checked = (Result<Decision, CheckError>, Principal, Permission);
type Checking = Pin<Box<dyn Future<Output = Checked> + Send>>;

/// What the inner service gets once the request is allowed.
struct Next<S, ReqB> {
    inner: S,
    parts: Parts,
    body: ReqB,
}

/// The response future of [`CachedAuthorization`](crate::CachedAuthorization): the principal's
/// resolution, the check, then the inner service's future.
#[pin_project]
pub struct ResponseFuture<S, ReqB, R, M>
where
    S: Service<Request<ReqB>>,
    R: ResolvePrincipal,
{
    #[pin]
    state: State<S, ReqB, R, M>,
}

#[pin_project(project = StateProj)]
enum State<S, ReqB, R, M>
where
    S: Service<Request<ReqB>>,
    R: ResolvePrincipal,
{
    Resolving {
        #[pin]
        resolve: R::Future,
        shared: Option<Arc<Shared<R, M>>>,
        access: Option<Access>,
        next: Option<Next<S, ReqB>>,
    },
    Checking {
        check: Checking,
        shared: Option<Arc<Shared<R, M>>>,
        next: Option<Next<S, ReqB>>,
    },
    Calling {
        #[pin]
        fut: S::Future,
        /// The `Cache-Status` member to add to the response (when on).
        cache_status: Option<HeaderValue>,
    },
    Rejected {
        response: Option<Response<Bytes>>,
    },
    Done,
}

impl<S, ReqB, R, M> ResponseFuture<S, ReqB, R, M>
where
    S: Service<Request<ReqB>>,
    R: ResolvePrincipal,
{
    pub(crate) fn resolving(
        resolve: R::Future,
        shared: Arc<Shared<R, M>>,
        access: Access,
        inner: S,
        parts: Parts,
        body: ReqB,
    ) -> Self {
        let next = Some(Next { inner, parts, body });
        Self { state: State::Resolving { resolve, shared: Some(shared), access: Some(access), next } }
    }

    /// Answers `response` without calling the inner service.
    pub(crate) fn rejected(response: Response<Bytes>) -> Self {
        Self { state: State::Rejected { response: Some(response) } }
    }

    pub(crate) fn calling(fut: S::Future) -> Self {
        Self { state: State::Calling { fut, cache_status: None } }
    }
}

impl<S, ReqB, R, M> fmt::Debug for ResponseFuture<S, ReqB, R, M>
where
    S: Service<Request<ReqB>>,
    R: ResolvePrincipal,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

const POLLED_AFTER_COMPLETION: &str = "ResponseFuture polled after completion";

impl<S, ReqB, R, M, ResB> Future for ResponseFuture<S, ReqB, R, M>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
    R: ResolvePrincipal,
    M: Send + Sync + 'static,
    ResB: From<Bytes>,
{
    type Output = Result<Response<ResB>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            let (checked, shared, next) = match this.state.as_mut().project() {
                StateProj::Resolving { resolve, shared, access, next } => {
                    // A resolver's future that panics fails closed (503), like one that panics
                    // in `resolve`.
                    let resolved = match catch_unwind(AssertUnwindSafe(|| resolve.poll(cx))) {
                        Ok(Poll::Pending) => return Poll::Pending,
                        Ok(Poll::Ready(resolved)) => Some(resolved),
                        Err(_) => None,
                    };
                    let (Some(shared), Some(access), Some(next)) = (shared.take(), access.take(), next.take()) else {
                        panic!("{POLLED_AFTER_COMPLETION}");
                    };
                    let (principal, permission) = match shared.resolved(resolved, access, &next.parts) {
                        Ok(found) => found,
                        Err(rejection) => {
                            this.state.set(State::Done);
                            return Poll::Ready(Ok(rejection.map(ResB::from)));
                        }
                    };
                    match shared.cache.check_l1(&principal, &permission) {
                        Some(decision) => ((Ok(decision), principal, permission), shared, next),
                        None => {
                            // Past L1: the shared tiers and the authorizer, boxed (their state is
                            // large, and this is the slow path).
                            let cache = shared.cache.clone();
                            let check: Checking = Box::pin(async move {
                                let outcome = cache.check_past_l1(&principal, &permission).await;
                                (outcome, principal, permission)
                            });
                            this.state.set(State::Checking { check, shared: Some(shared), next: Some(next) });
                            continue;
                        }
                    }
                }
                StateProj::Checking { check, shared, next } => {
                    let checked = ready!(check.as_mut().poll(cx));
                    let (Some(shared), Some(next)) = (shared.take(), next.take()) else {
                        panic!("{POLLED_AFTER_COMPLETION}");
                    };
                    (checked, shared, next)
                }
                StateProj::Calling { fut, cache_status } => {
                    let mut res = ready!(fut.poll(cx));
                    if let (Ok(res), Some(status)) = (&mut res, cache_status.take()) {
                        res.headers_mut().append(&CACHE_STATUS, status);
                    }
                    this.state.set(State::Done);
                    return Poll::Ready(res);
                }
                StateProj::Rejected { response } => {
                    let response = response.take().expect(POLLED_AFTER_COMPLETION);
                    this.state.set(State::Done);
                    return Poll::Ready(Ok(response.map(ResB::from)));
                }
                StateProj::Done => panic!("{POLLED_AFTER_COMPLETION}"),
            };
            let ((outcome, principal, permission), Next { mut inner, mut parts, body }) = (checked, next);
            match shared.concluded(outcome, principal, permission, &mut parts) {
                Ok(cache_status) => {
                    let fut = inner.call(Request::from_parts(parts, body));
                    this.state.set(State::Calling { fut, cache_status });
                }
                Err(rejection) => {
                    this.state.set(State::Done);
                    return Poll::Ready(Ok(rejection.map(ResB::from)));
                }
            }
        }
    }
}
