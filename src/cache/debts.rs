//! The ledger of epoch bumps owed to shared tiers that could not be reached, and its payment.
//!
//! An invalidation that a tier missed is owed to it: the authority (the deepest tier) is owed
//! the bump itself, paid with a value assigned at payment time; a mirror (a shallower tier) is
//! owed a raise to the value the authority assigned. While a tier, or any tier deeper than it
//! (which it mirrors), is owed anything, it is not read: its epochs cannot vouch for an entry.
//! The janitor pays the debts every 250 ms, deepest first; a payment of the authority owes the
//! mirrors the value it assigned.

use std::time::Duration;

use super::Inner;
use super::epoch::Target;
use crate::tier::shared::EpochTarget;

/// More debts than this collapse into one global bump.
const MAX_PENDING: usize = 10_000;

/// What a tier is owed for one target: a raise to a value assigned by the authority, or (the
/// authority) a bump. A bump covers any raise; of two raises, the higher.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Owed {
    Raise(u64),
    Bump,
}

/// Debts per tier (by index, shallowest first).
#[derive(Default)]
pub(crate) struct Pending {
    debts: Vec<Vec<(Target, Owed)>>,
}

impl Pending {
    pub(crate) fn new(tiers: usize) -> Self {
        Self { debts: vec![Vec::new(); tiers] }
    }

    fn total(&self) -> usize {
        self.debts.iter().map(Vec::len).sum()
    }

    /// Debts of tier `i`.
    pub(crate) fn owed(&self, i: usize) -> u64 {
        self.debts.get(i).map_or(0, |d| d.len() as u64)
    }

    /// Whether tier `i` or a deeper one is owed anything (tier `i` cannot be read).
    pub(crate) fn blocks(&self, i: usize) -> bool {
        self.debts.iter().skip(i).any(|d| !d.is_empty())
    }
}

impl Inner {
    /// Records what tier `tier` is owed for `target`: one debt per target (paid with a value
    /// assigned at payment time, which covers every failed attempt before it; owing one per
    /// attempt made a burst of bumps on the same scope when the store came back, each
    /// restarting the computations in flight for it). A pending global bump covers every other
    /// target; past `MAX_PENDING` debts, the tier's debts collapse to one on the global epoch.
    pub(crate) fn owe(&self, tier: usize, target: Target, owed: Owed) {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let total = pending.total();
        let Some(debts) = pending.debts.get_mut(tier) else { return };
        if let Some(debt) = debts.iter_mut().find(|(t, _)| *t == target) {
            debt.1 = debt.1.max(owed);
            return;
        }
        if owed == Owed::Bump && debts.contains(&(None, Owed::Bump)) {
            return;
        }
        if total >= MAX_PENDING {
            let top = debts.iter().map(|(_, o)| *o).fold(owed, Owed::max);
            *debts = vec![(None, top)];
        } else {
            debts.push((target, owed));
        }
    }

    /// Whether tier `i` may be read (nothing owed to it or to a deeper tier).
    pub(crate) fn owes_nothing_from(&self, i: usize) -> bool {
        !self.pending.lock().unwrap_or_else(|e| e.into_inner()).blocks(i)
    }

    /// Pays what is owed, deepest tier first, oldest debt first; stops a tier at its first
    /// failure.
    pub(crate) async fn retry_pending(&self) {
        let retention = Duration::from_millis(self.shared_retention_ms);
        for i in (0..self.tiers.len()).rev() {
            let debts = {
                let p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
                match p.debts.get(i) {
                    Some(d) if !d.is_empty() => d.clone(),
                    _ => continue,
                }
            };
            let tier = &self.tiers[i].tier;
            let mut done = 0;
            for (target, owed) in &debts {
                let paid = match owed {
                    Owed::Raise(value) => tier.raise(EpochTarget(*target), *value, retention).await.is_ok(),
                    Owed::Bump => {
                        let before = self.epochs.current_of(*target);
                        match tier.bump(EpochTarget(*target), self.epochs.floor(), retention).await {
                            Ok(value) => {
                                self.epochs.settle_from(*target, before, value);
                                // The mirrors are owed what the authority assigned.
                                for mirror in 0..i {
                                    self.owe(mirror, *target, Owed::Raise(value));
                                }
                                true
                            }
                            Err(_) => false,
                        }
                    }
                };
                if !paid {
                    break;
                }
                done += 1;
            }
            let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            // Remove what was paid, unless the debts collapsed meanwhile.
            let d = &mut p.debts[i];
            let done = debts[..done].iter().zip(d.iter()).take_while(|(a, b)| a == b).count();
            d.drain(..done);
            if done > 0 && d.is_empty() {
                tracing::info!(target: "authz_cache::audit", tier = self.tiers[i].tier.level, "owed invalidations paid: tier read again");
            }
        }
    }
}
