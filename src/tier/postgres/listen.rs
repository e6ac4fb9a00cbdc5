//! LISTEN/NOTIFY: the Postgres [`Transport`] (the epochs and changes channels, on a connection
//! of its own) and the heartbeat.

use diesel::sql_types::Text;
use diesel_async::{AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};

use super::{PgError, PgFailure, PostgresShared, PostgresTier};
use crate::tier::shared::{Notice, NoticeFuture, Subscription, TierError, TierFuture, Transport};

impl PostgresShared {
    /// Publishes a heartbeat on the epochs channel.
    pub(crate) async fn heartbeat(&self, instance: &str) -> Result<(), PgError> {
        let payload = format!("h {instance}");
        self.with_conn(async |conn| {
            diesel::sql_query("SELECT pg_notify($1, $2)")
                .bind::<Text, _>(&self.epochs_channel)
                .bind::<Text, _>(payload)
                .execute(conn)
                .await
                .map(|_| ())
                .map_err(PgFailure::from)
        })
        .await
    }
}

/// LISTEN on the epochs and changes channels, on a connection of its own (not pooled); a
/// notice on the changes channel is [`Notice::Changed`].
impl Transport for PostgresTier {
    fn subscribe(&self) -> TierFuture<'_, Box<dyn Subscription>> {
        Box::pin(async move {
            let mut conn = self.shared.connect().await.map_err(TierError::new)?;
            let listen =
                format!("LISTEN \"{}\"; LISTEN \"{}\"", self.shared.epochs_channel, self.shared.changes_channel);
            conn.batch_execute(&listen).await.map_err(|e| TierError::new(PgFailure::from(e)))?;
            let changes = self.shared.changes_channel.clone();
            Ok(Box::new(PgSubscription { conn, changes }) as Box<dyn Subscription>)
        })
    }

    fn heartbeat<'a>(&'a self, instance: &'a str) -> TierFuture<'a, ()> {
        Box::pin(self.shared.heartbeat(instance))
    }
}

struct PgSubscription {
    conn: AsyncPgConnection,
    changes: String,
}

impl Subscription for PgSubscription {
    fn next(&mut self) -> NoticeFuture<'_> {
        Box::pin(async move {
            use futures_util::StreamExt;
            let changes = &self.changes;
            let mut stream = std::pin::pin!(self.conn.notifications_stream());
            Some(match stream.next().await? {
                Ok(n) if n.channel == *changes => Ok(Notice::Changed),
                Ok(n) => Ok(Notice::parse(&n.payload)),
                Err(e) => Err(TierError::new(PgFailure::from(e))),
            })
        })
    }
}
