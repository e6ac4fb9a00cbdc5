//! The Redis pub/sub backplane: the [`Transport`] of the Redis tier.

use super::{RedisTier, failed};
use crate::tier::shared::{Notice, NoticeFuture, Subscription, TierFuture, Transport};

/// The Redis pub/sub backplane: one dedicated connection (not pooled) per subscription.
impl Transport for RedisTier {
    fn subscribe(&self) -> TierFuture<'_, Box<dyn Subscription>> {
        Box::pin(async move {
            let mut pubsub = self.shared.backplane.get_async_pubsub().await.map_err(failed)?;
            pubsub.subscribe(&self.shared.channel).await.map_err(failed)?;
            Ok(Box::new(RedisSubscription(pubsub.into_on_message())) as Box<dyn Subscription>)
        })
    }

    fn heartbeat<'a>(&'a self, instance: &'a str) -> TierFuture<'a, ()> {
        Box::pin(async move {
            let mut cmd = redis::cmd("PUBLISH");
            cmd.arg(&self.shared.channel).arg(Notice::heartbeat_payload(instance));
            self.shared.run::<i64>(&cmd).await.map(|_| ()).map_err(failed)
        })
    }
}

struct RedisSubscription(redis::aio::PubSubStream);

impl Subscription for RedisSubscription {
    fn next(&mut self) -> NoticeFuture<'_> {
        Box::pin(async move {
            use futures_util::StreamExt;
            let msg = self.0.next().await?;
            Some(Ok(msg.get_payload::<String>().map_or(Notice::Malformed, |p| Notice::parse(&p))))
        })
    }
}
