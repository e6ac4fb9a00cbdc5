//! Cache tiers. L1 ([`memory`]) lives in-process; remote tiers plug in behind the same read path.

pub(crate) mod memory;
pub(crate) mod names;
#[cfg(feature = "postgres")]
pub(crate) mod postgres;
#[cfg(feature = "redis")]
pub(crate) mod redis;
