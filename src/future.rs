//! [`ResponseFuture`], the future of [`CachedAuthorization`](crate::CachedAuthorization).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use pin_project::pin_project;
use tower::Service;

use crate::response::ResponseBody;
use crate::service::{Authorized, CACHE_STATUS};

type Authorizing = Pin<Box<dyn Future<Output = Result<Authorized, Response<Bytes>>> + Send>>;

/// The response future of [`CachedAuthorization`](crate::CachedAuthorization): first the
/// authorization, then the inner service's future.
#[pin_project]
pub struct ResponseFuture<S, ReqB>
where
    S: Service<Request<ReqB>>,
{
    #[pin]
    state: State<S, ReqB>,
}

#[pin_project(project = StateProj)]
enum State<S, ReqB>
where
    S: Service<Request<ReqB>>,
{
    Authorizing {
        check: Authorizing,
        next: Option<(S, ReqB)>,
    },
    Calling {
        #[pin]
        fut: S::Future,
        /// The `Cache-Status` member to add to the response (when on).
        cache_status: Option<HeaderValue>,
    },
    Done,
}

impl<S, ReqB> ResponseFuture<S, ReqB>
where
    S: Service<Request<ReqB>>,
{
    pub(crate) fn authorizing(check: Authorizing, inner: S, body: ReqB) -> Self {
        Self { state: State::Authorizing { check, next: Some((inner, body)) } }
    }

    /// Answers `rejection` without calling `inner` (a rare path: it allocates).
    pub(crate) fn rejected(rejection: Response<Bytes>, inner: S, body: ReqB) -> Self {
        Self::authorizing(Box::pin(std::future::ready(Err(rejection))), inner, body)
    }

    pub(crate) fn calling(fut: S::Future) -> Self {
        Self { state: State::Calling { fut, cache_status: None } }
    }
}

impl<S, ReqB> fmt::Debug for ResponseFuture<S, ReqB>
where
    S: Service<Request<ReqB>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<S, ReqB, ResB> Future for ResponseFuture<S, ReqB>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
{
    type Output = Result<Response<ResponseBody<ResB>>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Authorizing { check, next } => {
                    let outcome = ready!(check.as_mut().poll(cx));
                    let Some((mut inner, body)) = next.take() else {
                        panic!("ResponseFuture polled after completion");
                    };
                    match outcome {
                        Ok((parts, cache_status)) => {
                            let fut = inner.call(Request::from_parts(parts, body));
                            this.state.set(State::Calling { fut, cache_status });
                        }
                        Err(rejection) => {
                            this.state.set(State::Done);
                            return Poll::Ready(Ok(rejection.map(ResponseBody::rejection)));
                        }
                    }
                }
                StateProj::Calling { fut, cache_status } => {
                    let mut res = ready!(fut.poll(cx));
                    if let (Ok(res), Some(status)) = (&mut res, cache_status.take()) {
                        res.headers_mut().append(&CACHE_STATUS, status);
                    }
                    this.state.set(State::Done);
                    return Poll::Ready(res.map(|r| r.map(ResponseBody::inner)));
                }
                StateProj::Done => panic!("ResponseFuture polled after completion"),
            }
        }
    }
}
