//! The workload: a splitmix64 PRNG, a Zipf sampler, the request mix, the request stream every
//! configuration is driven with.

use std::collections::BTreeSet;

use crate::args::Opts;

/// splitmix64: small, fast, and good enough for workload generation.
pub(crate) struct Rng(pub(crate) u64);
impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        let mut r = Rng(seed);
        r.next_u64();
        r
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub(crate) fn f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in [0, n).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}
/// Zipf over ranks 1..=n with exponent s: inverse CDF over precomputed cumulative weights.
pub(crate) struct Zipf {
    pub(crate) cdf: Vec<f64>,
}
impl Zipf {
    pub(crate) fn new(n: usize, s: f64) -> Self {
        let mut acc = 0.0;
        let mut cdf: Vec<f64> = (1..=n)
            .map(|k| {
                acc += (k as f64).powf(-s);
                acc
            })
            .collect();
        for c in &mut cdf {
            *c /= acc;
        }
        if let Some(last) = cdf.last_mut() {
            *last = 1.0;
        }
        Zipf { cdf }
    }

    /// A rank in 1..=n.
    pub(crate) fn sample(&self, rng: &mut Rng) -> u32 {
        let u = rng.f64();
        let i = self.cdf.partition_point(|&c| c <= u).min(self.cdf.len() - 1);
        i as u32 + 1
    }
}
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Read,
    Write,
    Admin,
}
pub(crate) const DEMO_USERS: [&str; 3] = ["alice", "bob", "carol"];
/// Who the requests are made as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Tokens {
    /// The quickstart's three demo users (`--target`).
    Demo,
    /// The population itself: token and principal `user-<n>` (in-process apps).
    Population,
}
#[derive(Clone, Copy, Debug)]
pub(crate) struct Req {
    pub(crate) kind: Kind,
    /// The user's principal, a rank in 1..=population (admin requests are made as alice).
    pub(crate) principal: u32,
    pub(crate) resource: u32,
}
/// The roles every in-process configuration encodes (in memory, or seeded into Postgres): alice
/// is an admin, every tenth user an editor, the others viewers.
pub(crate) fn is_editor(principal: u32) -> bool {
    principal % 10 == 0
}
impl Req {
    /// Whose token the request carries: 0 for alice, else `user-<n>` (population) or the demo
    /// user's index + 1 (demo).
    pub(crate) fn who(&self, tokens: Tokens) -> u32 {
        match (tokens, self.kind) {
            (_, Kind::Admin) => 0,
            (Tokens::Population, _) => self.principal,
            (Tokens::Demo, Kind::Read) => (self.principal - 1) % 3 + 1,
            (Tokens::Demo, Kind::Write) => 3,
        }
    }

    /// The decision cache's key for this request, packed: who, action, resource.
    pub(crate) fn key(&self, tokens: Tokens) -> u64 {
        let (action, resource) = match self.kind {
            Kind::Read => (0, self.resource),
            Kind::Write => (1, self.resource),
            Kind::Admin => (2, 0),
        };
        (u64::from(self.who(tokens)) << 34) | (action << 32) | u64::from(resource)
    }

    /// Whether the roles deny it (a viewer's write; only in-process apps know the population).
    pub(crate) fn denied(&self, tokens: Tokens) -> bool {
        tokens == Tokens::Population && self.kind == Kind::Write && !is_editor(self.principal)
    }
}
pub(crate) struct Workload {
    /// Each virtual user's principal (a rank in 1..=population).
    pub(crate) principals: Vec<u32>,
    pub(crate) resources: Zipf,
    pub(crate) mix: [u64; 3],
}
impl Workload {
    pub(crate) fn new(o: &Opts) -> Self {
        let population = Zipf::new(o.population, o.zipf_s);
        let mut rng = Rng::new(o.seed ^ 0x7573_6572_7300_0001);
        let principals: Vec<u32> = (0..o.users).map(|_| population.sample(&mut rng)).collect();
        Workload { principals, resources: Zipf::new(o.resources, o.zipf_s), mix: o.mix }
    }

    pub(crate) fn users(&self) -> usize {
        self.principals.len()
    }

    pub(crate) fn request(&self, user: usize, rng: &mut Rng) -> Req {
        let total: u64 = self.mix.iter().sum();
        let pick = rng.below(total);
        let resource = self.resources.sample(rng);
        let principal = self.principals[user];
        let kind = if pick < self.mix[0] {
            Kind::Read
        } else if pick < self.mix[0] + self.mix[1] {
            Kind::Write
        } else {
            Kind::Admin
        };
        Req { kind, principal, resource }
    }

    /// Against the demo: how many users map to alice, bob and carol.
    pub(crate) fn token_share(&self) -> [usize; 3] {
        let mut share = [0; 3];
        for &p in &self.principals {
            share[((p - 1) % 3) as usize] += 1;
        }
        share
    }

    pub(crate) fn distinct_principals(&self) -> usize {
        self.principals.iter().collect::<BTreeSet<_>>().len()
    }

    pub(crate) fn editors(&self) -> usize {
        self.principals.iter().filter(|p| is_editor(**p)).count()
    }
}
