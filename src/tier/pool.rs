//! The connection-health wrapper both built-in pools use (bb8 over bb8-redis or diesel-async).
//!
//! bb8-redis's manager reports a connection as never broken, so a multiplexed connection whose
//! socket died (a Redis restart, a black hole that ended) would stay in the pool, or every
//! checkout would pay a PING round trip; a diesel connection abandoned mid-statement by a
//! timeout must not be reused either. [`Checked`] marks a connection suspect for the length of
//! each call ([`with_conn`]) and clears the mark only when the call completed over a live
//! connection: a call that failed on I/O, or was dropped by a timeout, leaves the mark, and bb8
//! drops the connection when it comes back.

use std::future::Future;

/// A bb8 manager whose connections carry a suspect mark.
pub(crate) struct Checked<M>(pub(crate) M);

/// A pooled connection and its mark.
pub(crate) struct Tracked<C> {
    pub(crate) conn: C,
    suspect: bool,
}

impl<M: bb8::ManageConnection> bb8::ManageConnection for Checked<M> {
    type Connection = Tracked<M::Connection>;
    type Error = M::Error;

    async fn connect(&self) -> Result<Self::Connection, Self::Error> {
        Ok(Tracked { conn: self.0.connect().await?, suspect: false })
    }

    fn is_valid(&self, conn: &mut Self::Connection) -> impl Future<Output = Result<(), Self::Error>> + Send {
        self.0.is_valid(&mut conn.conn)
    }

    fn has_broken(&self, conn: &mut Self::Connection) -> bool {
        conn.suspect || self.0.has_broken(&mut conn.conn)
    }
}

/// Runs `f` on a connection checked out of `pool` (the checkout error mapped by `checkout`),
/// marked suspect until `f` returns a result that `healthy` accepts.
pub(crate) async fn with_conn<M, T, E>(
    pool: &bb8::Pool<Checked<M>>,
    checkout: impl FnOnce(bb8::RunError<M::Error>) -> E,
    healthy: impl FnOnce(&Result<T, E>) -> bool,
    f: impl AsyncFnOnce(&mut M::Connection) -> Result<T, E>,
) -> Result<T, E>
where
    M: bb8::ManageConnection,
{
    let mut conn = pool.get().await.map_err(checkout)?;
    conn.suspect = true;
    let result = f(&mut conn.conn).await;
    if healthy(&result) {
        conn.suspect = false;
    }
    result
}
