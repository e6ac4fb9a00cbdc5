//! What the built-in shared tiers accept as their names (a Redis namespace, a Postgres schema):
//! one definition, used by the tier builders and by `CacheConfig`, which checks the environment
//! without the tiers' features.

/// What [`RedisTierBuilder::namespace`](crate::RedisTierBuilder::namespace) accepts: 1 to 64 of
/// `A-Z a-z 0-9 - _ . /`.
pub(crate) fn namespace_ok(namespace: &str) -> bool {
    (1..=64).contains(&namespace.len())
        && namespace.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/'))
}

/// What [`PostgresTierBuilder::schema`](crate::PostgresTierBuilder::schema) accepts: 1 to 40 of
/// `a-z 0-9 _`, not starting with a digit (it is spliced into SQL as an identifier).
pub(crate) fn schema_ok(schema: &str) -> bool {
    (1..=40).contains(&schema.len())
        && !schema.starts_with(|c: char| c.is_ascii_digit())
        && schema.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(namespace_ok("my-app_1.v2/x"));
        assert!(!namespace_ok("") && !namespace_ok("a b") && !namespace_ok(&"a".repeat(65)));
        assert!(schema_ok("authz_cache") && schema_ok("_x1"));
        assert!(!schema_ok("1abc") && !schema_ok("Authz") && !schema_ok("a;drop") && !schema_ok(&"a".repeat(41)));
    }
}
