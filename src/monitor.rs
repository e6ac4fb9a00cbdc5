//! Performance monitoring: [`Monitor`] compares each interval's hit rate and latency with the
//! targets, follows the trend, and raises [`Alert`]s.
//!
//! Every interval (`CACHE_MONITORING_INTERVAL`), [`Monitor::tick`] takes a [`StatsSnapshot`],
//! subtracts the previous one it saw (counters are cumulative) and reports on that window in a
//! [`Report`]:
//!
//! - per tier, hits, misses and hit rate; overall, the share of checks answered from a tier,
//!   `(l1 hits + min(l2 hits + l3 hits, l1 misses)) / (l1 hits + l1 misses)`: a check that misses
//!   L1 and is answered by L2 or L3 counts as answered, one answered by the authorizer does not.
//!   Remote hits are capped at the L1 misses: L3 reads made by background warming
//!   (`AuthzCache::warm_from_l3`, team-mate warming) count as L3 hits without being checks, so a
//!   window with warming can read a little high;
//! - authorizer calls and errors;
//! - the p95 latency of L1 hits and of misses, as the stats keep it: **cumulative since the cache
//!   was built**, not per window;
//! - the hit rates of the last windows and their [`Trend`];
//! - the [`Alert`]s, each with a recommendation when one is clear.
//!
//! Alerts go to the callbacks given to [`MonitorBuilder::on_alert`] and are logged as `warn!`
//! events with target `authz_cache::monitor`, unless alerts are disabled (then they are only in
//! the report). [`Monitor::spawn`] runs the ticks on a Tokio task.
//!
//! ```
//! use std::time::Duration;
//! use tower_authz_cache::{AlertKind, AuthzCache, Decision, Monitor, Permission, Principal};
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let cache = AuthzCache::builder(|_: Principal, _: Permission| async {
//!     Ok::<_, std::convert::Infallible>(Decision::allow())
//! })
//! .build();
//! let monitor = Monitor::builder(cache.clone())
//!     .hit_rate_target_percent(90.0)
//!     .response_time_target(Duration::from_secs(1))
//!     .interval(Duration::from_secs(30))
//!     .on_alert(|alert| eprintln!("{}: {}", alert.kind, alert.message))
//!     .build();
//!
//! // 25 different keys, each asked once: every check misses.
//! for i in 0..25 {
//!     cache.check(&Principal::new(format!("user{i}")), &Permission::new("documents:1", "read")).await.unwrap();
//! }
//! let report = monitor.tick(&cache.stats());
//! assert_eq!((report.checks, report.hit_rate_percent), (25, Some(0.0)));
//! assert_eq!(report.alerts[0].kind, AlertKind::HitRateBelowTarget);
//!
//! // Or every interval, on a task; the handle stops it when dropped.
//! let handle = monitor.spawn();
//! assert!(handle.last_report().is_none(), "the first report comes after one interval");
//! # });
//! ```

use std::collections::VecDeque;
use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::Serialize;
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;

use crate::{AuthzCache, CacheConfig, RemoteTierSnapshot, StatsSnapshot};

/// Windows with fewer checks than this raise no hit-rate alert: too few to mean anything.
const MIN_CHECKS: u64 = 20;
/// The difference, in percentage points, between the older and the newer half of the history
/// that makes a trend.
const TREND_THRESHOLD: f64 = 1.0;
/// L1 counts as full from this share of its bound.
const L1_FULL_PERCENT: u64 = 90;

const FULL_L1: &str = "L1 is full: raise L1_CACHE_SIZE_MB";
const SHORT_TTL: &str = "decisions expire before reuse: consider a longer AUTHZ_CACHE_ALLOW_TTL_S";
const BREAKER: &str = "check Redis reachability; the cache keeps serving from L1 and the authorizer";
const BREAKER_L3: &str =
    "check Postgres reachability; the cache keeps serving from L1, L2 when configured, and the authorizer";
const SILENT: &str = "check the Redis pub/sub connection; if heartbeats only arrive late, raise \
                      AUTHZ_CACHE_MAX_STALENESS_MS (the bound on serving an invalidated allow)";
const AUTHORIZER: &str =
    "check the authorizer; decisions already cached are served until they expire, other checks fail closed";

const MISMATCH: &str = "an invalidation hook is missing: something changes permissions in the source of truth \
                        without calling invalidate() (the authz_cache::audit log names the principal hash and \
                        resource); until it is added, decisions stay stale up to their ttl";

type Callback = Arc<dyn Fn(&Alert) + Send + Sync>;

/// What an [`Alert`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum AlertKind {
    /// The window's overall hit rate is below the target (windows of at least 20 checks).
    HitRateBelowTarget,
    /// The p95 latency of a path (L1 hits, or misses) is above the response-time target.
    LatencyAboveTarget,
    /// A remote tier's (L2 or L3) circuit breaker opened during the window; the message names
    /// the tier.
    BreakerOpened,
    /// The invalidation backplane went silent past `max_staleness`: L1 is not trusted.
    BackplaneSilent,
    /// The authorizer failed during the window.
    AuthorizerFailing,
    /// The consistency auditor found cached decisions the authorizer disagrees with, that no
    /// invalidation explained, during the window; the message names the tiers.
    ConsistencyMismatch,
}

impl AlertKind {
    fn as_str(self) -> &'static str {
        match self {
            AlertKind::HitRateBelowTarget => "hit_rate_below_target",
            AlertKind::LatencyAboveTarget => "latency_above_target",
            AlertKind::BreakerOpened => "breaker_opened",
            AlertKind::BackplaneSilent => "backplane_silent",
            AlertKind::AuthorizerFailing => "authorizer_failing",
            AlertKind::ConsistencyMismatch => "consistency_mismatch",
        }
    }
}

impl fmt::Display for AlertKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A missed target or a failing part, found by [`Monitor::tick`].
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct Alert {
    /// What it is about.
    pub kind: AlertKind,
    /// What was seen, with the numbers, e.g. `hit rate 42.0% over 50 checks, target 95.0%`.
    pub message: String,
    /// What to do about it, when that is clear, e.g. `L1 is full: raise L1_CACHE_SIZE_MB`.
    pub recommendation: Option<&'static str>,
}

impl Alert {
    fn new(kind: AlertKind, message: String, recommendation: Option<&'static str>) -> Self {
        Self { kind, message, recommendation }
    }
}

/// Whether the hit rate is going up, down or neither over the last windows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Trend {
    /// The newer half of the history is more than 1 point above the older half.
    Improving,
    /// Within 1 point, or fewer than two windows with checks.
    #[default]
    Stable,
    /// The newer half of the history is more than 1 point below the older half.
    Degrading,
}

impl Trend {
    /// Compares the mean of the older half of `history` (oldest first) with the mean of the
    /// newer half; with an odd length the middle value is in neither.
    fn of(history: &[f64]) -> Self {
        let half = history.len() / 2;
        if half == 0 {
            return Trend::Stable;
        }
        let mean = |values: &[f64]| values.iter().sum::<f64>() / values.len() as f64;
        let change = mean(&history[history.len() - half..]) - mean(&history[..half]);
        if change > TREND_THRESHOLD {
            Trend::Improving
        } else if change < -TREND_THRESHOLD {
            Trend::Degrading
        } else {
            Trend::Stable
        }
    }
}

/// One tier's reads during a window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
#[non_exhaustive]
pub struct TierWindow {
    /// Reads answered with a valid entry.
    pub hits: u64,
    /// Reads that were not answered: nothing valid found or, for a remote tier, the read failed
    /// or was skipped by the open breaker.
    pub misses: u64,
    /// Misses where the entry had expired.
    pub expired: u64,
    /// Misses where the entry predated an invalidation.
    pub stale: u64,
    /// `hits / (hits + misses)` in percent; `None` without reads.
    pub hit_rate_percent: Option<f64>,
}

impl TierWindow {
    fn new(hits: u64, misses: u64, expired: u64, stale: u64) -> Self {
        Self { hits, misses, expired, stale, hit_rate_percent: percent(hits, hits + misses) }
    }
}

/// What [`Monitor::tick`] found in one window: the time between two ticks.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct Report {
    /// Checks made: L1 hits + L1 misses.
    pub checks: u64,
    /// Share of the checks answered from a tier, in percent:
    /// `(l1 hits + min(l2 hits + l3 hits, l1 misses)) / (l1 hits + l1 misses)`; `None` without
    /// checks.
    pub hit_rate_percent: Option<f64>,
    /// The target it was compared with.
    pub hit_rate_target_percent: f64,
    /// L1.
    pub l1: TierWindow,
    /// L2, when configured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub l2: Option<TierWindow>,
    /// L3, when configured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub l3: Option<TierWindow>,
    /// Calls made to the authorizer.
    pub authorizer_calls: u64,
    /// Authorizer calls that failed, timed out or panicked.
    pub authorizer_errors: u64,
    /// p95 latency of checks answered from L1, in microseconds. Cumulative since the cache was
    /// built (the stats keep no per-window histogram), from a sample of the hits.
    pub l1_hit_p95_us: f64,
    /// p95 latency of checks that went past L1, in microseconds. Cumulative since the cache was
    /// built.
    pub miss_p95_us: f64,
    /// The target both are compared with, in microseconds.
    pub response_time_target_us: f64,
    /// Overall hit rates of the last windows that had checks, oldest first, this one included.
    pub history: Vec<f64>,
    /// Where [`history`](Self::history) is going.
    pub trend: Trend,
    /// What missed its target, in this window. Filled even when alerts are disabled.
    pub alerts: Vec<Alert>,
}

/// Watches an [`AuthzCache`]'s stats against performance targets: the hit rate and latency of
/// each window between two ticks, the trend over the last windows, and [`Alert`]s when a target
/// is missed or a part fails.
///
/// Built with [`Monitor::builder`] (or from a [`CacheConfig`] with
/// [`MonitorBuilder::from_config`]). Call [`tick`](Self::tick) yourself with
/// [`AuthzCache::stats`], or [`spawn`](Self::spawn) a task that does it every interval
/// (`CACHE_MONITORING_INTERVAL`). Alerts are logged as `warn!` events with target
/// `authz_cache::monitor` and given to the [`on_alert`](MonitorBuilder::on_alert) callbacks,
/// unless alerts are disabled; reports list them either way.
pub struct Monitor {
    cache: AuthzCache,
    settings: Settings,
    callbacks: Vec<Callback>,
    state: Mutex<State>,
}

/// The targets and pacing a monitor runs with.
#[derive(Debug, Clone, Copy)]
struct Settings {
    hit_rate_target_percent: f64,
    response_time_target: Duration,
    interval: Duration,
    windows: usize,
    alerts_enabled: bool,
}

/// What a tick remembers for the next.
#[derive(Default)]
struct State {
    previous: StatsSnapshot,
    history: VecDeque<f64>,
}

impl fmt::Debug for Monitor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Monitor")
            .field("settings", &self.settings)
            .field("callbacks", &self.callbacks.len())
            .finish_non_exhaustive()
    }
}

impl Monitor {
    /// Starts building a monitor of `cache`. Defaults: hit-rate target 95 %, response-time
    /// target 5 ms, interval 60 s, trend over 6 windows, alerts enabled, no callbacks.
    pub fn builder(cache: AuthzCache) -> MonitorBuilder {
        MonitorBuilder {
            cache,
            settings: Settings {
                hit_rate_target_percent: 95.0,
                response_time_target: Duration::from_millis(5),
                interval: Duration::from_secs(60),
                windows: 6,
                alerts_enabled: true,
            },
            callbacks: Vec::new(),
        }
    }

    /// Reports on the window between the previous snapshot this monitor saw (for the first
    /// tick: the cache's start, when every counter was zero) and `snapshot`, then remembers
    /// `snapshot` for the next tick. Deterministic: the result depends only on the snapshots.
    ///
    /// Alerts, in this order:
    ///
    /// - [`HitRateBelowTarget`](AlertKind::HitRateBelowTarget): the window had at least 20
    ///   checks and its hit rate is below target. Recommendation: with L1 at 90 % of its bound
    ///   or more, a bigger `L1_CACHE_SIZE_MB`; else, when expired entries make over half the L1
    ///   misses, a longer `AUTHZ_CACHE_ALLOW_TTL_S`.
    /// - [`LatencyAboveTarget`](AlertKind::LatencyAboveTarget), per path (L1 hit, miss): the
    ///   path recorded samples in the window and its cumulative p95 is above target.
    /// - [`BreakerOpened`](AlertKind::BreakerOpened), per remote tier (L2, L3): its breaker opened
    ///   in the window. Recommendation: check that tier's reachability (Redis, Postgres).
    /// - [`BackplaneSilent`](AlertKind::BackplaneSilent): L1 is not trusted now, or was
    ///   distrusted during the window. Recommendation: `AUTHZ_CACHE_MAX_STALENESS_MS`.
    /// - [`AuthorizerFailing`](AlertKind::AuthorizerFailing): authorizer calls failed in the
    ///   window.
    /// - [`ConsistencyMismatch`](AlertKind::ConsistencyMismatch): the consistency auditor found
    ///   mismatches in the window. Recommendation: an invalidation hook is missing.
    ///
    /// With alerts enabled, each alert is logged as a `warn!` event (target
    /// `authz_cache::monitor`) and given to every callback, in order, after this monitor's state
    /// is updated. A callback that panics is logged and skipped.
    pub fn tick(&self, snapshot: &StatsSnapshot) -> Report {
        let report = {
            let mut guard = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            let state = &mut *guard;
            let report = self.assess(&state.previous, snapshot, &mut state.history);
            state.previous = *snapshot;
            report
        };
        if self.settings.alerts_enabled {
            for alert in &report.alerts {
                tracing::warn!(
                    target: "authz_cache::monitor",
                    kind = %alert.kind,
                    recommendation = alert.recommendation,
                    "{}",
                    alert.message
                );
                for callback in &self.callbacks {
                    if catch_unwind(AssertUnwindSafe(|| callback(alert))).is_err() {
                        tracing::error!(target: "authz_cache::monitor", kind = %alert.kind, "alert callback panicked");
                    }
                }
            }
        }
        report
    }

    fn assess(&self, prev: &StatsSnapshot, now: &StatsSnapshot, history: &mut VecDeque<f64>) -> Report {
        let d = |now: u64, prev: u64| now.saturating_sub(prev);
        let (l1_now, l1_prev) = (&now.tiers.l1, &prev.tiers.l1);
        let l1 = TierWindow::new(
            d(l1_now.hits, l1_prev.hits),
            d(l1_now.misses, l1_prev.misses),
            d(l1_now.expired, l1_prev.expired),
            d(l1_now.stale, l1_prev.stale),
        );
        // A remote tier's window; a failed or skipped read is a miss.
        let remote = |cur: Option<RemoteTierSnapshot>, old: Option<RemoteTierSnapshot>| {
            cur.map(|t| {
                let before = |f: fn(&RemoteTierSnapshot) -> u64| old.as_ref().map_or(0, f);
                TierWindow::new(
                    d(t.hits, before(|p| p.hits)),
                    d(t.misses, before(|p| p.misses)) + d(t.errors, before(|p| p.errors)),
                    d(t.expired, before(|p| p.expired)),
                    d(t.stale, before(|p| p.stale)),
                )
            })
        };
        let l2 = remote(now.tiers.l2, prev.tiers.l2);
        let l3 = remote(now.tiers.l3, prev.tiers.l3);
        let checks = l1.hits + l1.misses;
        let shared_hits = l2.map_or(0, |t| t.hits) + l3.map_or(0, |t| t.hits);
        let answered = l1.hits + shared_hits.min(l1.misses);
        let hit_rate_percent = percent(answered, checks);
        if let Some(rate) = hit_rate_percent {
            history.push_back(rate);
            while history.len() > self.settings.windows {
                history.pop_front();
            }
        }
        let history: Vec<f64> = history.iter().copied().collect();
        let target_us = self.settings.response_time_target.as_secs_f64() * 1e6;
        let authorizer_calls = d(now.authorizer_calls, prev.authorizer_calls);
        let authorizer_errors = d(now.authorizer_errors, prev.authorizer_errors);

        let mut alerts = Vec::new();
        if let Some(rate) =
            hit_rate_percent.filter(|rate| checks >= MIN_CHECKS && *rate < self.settings.hit_rate_target_percent)
        {
            let full = l1_now.max_bytes > 0 && l1_now.bytes * 100 >= l1_now.max_bytes * L1_FULL_PERCENT;
            let recommendation = if full {
                Some(FULL_L1)
            } else if l1.expired * 2 > l1.misses {
                Some(SHORT_TTL)
            } else {
                None
            };
            let message = format!(
                "hit rate {rate:.1}% over {checks} checks, target {:.1}% ({} l1 misses, {} expired, {} invalidated)",
                self.settings.hit_rate_target_percent, l1.misses, l1.expired, l1.stale
            );
            alerts.push(Alert::new(AlertKind::HitRateBelowTarget, message, recommendation));
        }
        for (path, cur, old) in
            [("l1 hit", &now.latency.l1_hit, &prev.latency.l1_hit), ("miss", &now.latency.miss, &prev.latency.miss)]
        {
            if cur.count > old.count && cur.p95_us > target_us {
                let message = format!("{path} p95 latency {:.1} us (cumulative), target {target_us:.1} us", cur.p95_us);
                alerts.push(Alert::new(AlertKind::LatencyAboveTarget, message, None));
            }
        }
        for (tier, t, p, recommendation) in
            [("l2", now.tiers.l2, prev.tiers.l2, BREAKER), ("l3", now.tiers.l3, prev.tiers.l3, BREAKER_L3)]
        {
            let Some(t) = t else { continue };
            let opens = d(t.breaker_opens, p.map_or(0, |p| p.breaker_opens));
            if opens > 0 {
                let message = format!(
                    "{tier} circuit breaker opened {opens} time(s) in the window, now {} ({} call errors, {} timeouts)",
                    t.breaker,
                    d(t.call_errors, p.map_or(0, |p| p.call_errors)),
                    d(t.call_timeouts, p.map_or(0, |p| p.call_timeouts)),
                );
                alerts.push(Alert::new(AlertKind::BreakerOpened, message, Some(recommendation)));
            }
        }
        if let Some(b) = &now.backplane {
            let distrusts = d(b.distrusts, prev.backplane.map_or(0, |p| p.distrusts));
            if !b.l1_trusted || distrusts > 0 {
                let message = format!(
                    "invalidation backplane silent for {} ms ({}, l1 {}, distrusted {distrusts} time(s) in the window)",
                    b.silent_for_ms,
                    if b.connected { "subscribed" } else { "not subscribed" },
                    if b.l1_trusted { "trusted again" } else { "not trusted" },
                );
                alerts.push(Alert::new(AlertKind::BackplaneSilent, message, Some(SILENT)));
            }
        }
        if authorizer_errors > 0 && authorizer_calls > 0 {
            let message = format!(
                "authorizer failed {authorizer_errors} of {authorizer_calls} calls in the window ({} checks undecided)",
                d(now.undecided, prev.undecided)
            );
            alerts.push(Alert::new(AlertKind::AuthorizerFailing, message, Some(AUTHORIZER)));
        }

        let mismatches = [
            ("l1", d(now.audit.mismatches_l1, prev.audit.mismatches_l1)),
            ("l2", d(now.audit.mismatches_l2, prev.audit.mismatches_l2)),
            ("l3", d(now.audit.mismatches_l3, prev.audit.mismatches_l3)),
        ];
        if mismatches.iter().any(|(_, n)| *n > 0) {
            let by_tier: Vec<String> =
                mismatches.iter().filter(|(_, n)| *n > 0).map(|(tier, n)| format!("{n} from {tier}")).collect();
            let message = format!(
                "consistency audit: {} cached decision(s) disagree with the authorizer with no invalidation to explain them ({})",
                mismatches.iter().map(|(_, n)| n).sum::<u64>(),
                by_tier.join(", ")
            );
            alerts.push(Alert::new(AlertKind::ConsistencyMismatch, message, Some(MISMATCH)));
        }

        Report {
            checks,
            hit_rate_percent,
            hit_rate_target_percent: self.settings.hit_rate_target_percent,
            l1,
            l2,
            l3,
            authorizer_calls,
            authorizer_errors,
            l1_hit_p95_us: now.latency.l1_hit.p95_us,
            miss_p95_us: now.latency.miss.p95_us,
            response_time_target_us: target_us,
            trend: Trend::of(&history),
            history,
            alerts,
        }
    }

    /// Runs [`tick`](Self::tick) on the cache's stats every interval on a Tokio task, the first
    /// time one interval from now. A late tick delays the next ones rather than bunching them.
    /// With the `metrics` feature, each tick also publishes the stats through the `metrics`
    /// facade (as `AuthzCache::export_metrics` does).
    ///
    /// The task stops when the returned handle is dropped.
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime.
    pub fn spawn(self) -> MonitorHandle {
        let last = Arc::new(Mutex::new(None));
        let out = last.clone();
        let period = self.settings.interval;
        let task = tokio::spawn(async move {
            let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
            ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                let stats = self.cache.stats();
                #[cfg(feature = "metrics")]
                crate::exposition::export(&stats);
                let report = self.tick(&stats);
                *out.lock().unwrap_or_else(PoisonError::into_inner) = Some(report);
            }
        });
        MonitorHandle { task, last }
    }
}

/// `part / whole` in percent; `None` when `whole` is zero.
fn percent(part: u64, whole: u64) -> Option<f64> {
    (whole > 0).then(|| part as f64 * 100.0 / whole as f64)
}

/// Builds a [`Monitor`]; from [`Monitor::builder`].
#[must_use]
pub struct MonitorBuilder {
    cache: AuthzCache,
    settings: Settings,
    callbacks: Vec<Callback>,
}

impl fmt::Debug for MonitorBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MonitorBuilder")
            .field("settings", &self.settings)
            .field("callbacks", &self.callbacks.len())
            .finish_non_exhaustive()
    }
}

impl MonitorBuilder {
    /// The overall hit rate, in percent, below which a window raises an alert
    /// (`CACHE_HIT_RATE_TARGET`).
    pub fn hit_rate_target_percent(mut self, percent: f64) -> Self {
        self.settings.hit_rate_target_percent = percent;
        self
    }

    /// The p95 latency above which a path raises an alert (`AUTHORIZATION_RESPONSE_TIME_TARGET`).
    pub fn response_time_target(mut self, target: Duration) -> Self {
        self.settings.response_time_target = target;
        self
    }

    /// How often [`Monitor::spawn`]'s task ticks (`CACHE_MONITORING_INTERVAL`); at least 1 ms.
    pub fn interval(mut self, interval: Duration) -> Self {
        self.settings.interval = interval.max(Duration::from_millis(1));
        self
    }

    /// How many windows the trend looks at; at least 1 (which makes every trend stable).
    pub fn windows(mut self, windows: usize) -> Self {
        self.settings.windows = windows.max(1);
        self
    }

    /// Whether alerts are logged and given to the callbacks. When disabled, reports still list
    /// them.
    pub fn alerts_enabled(mut self, enabled: bool) -> Self {
        self.settings.alerts_enabled = enabled;
        self
    }

    /// Adds a callback that receives every alert (when alerts are enabled). Callbacks run in
    /// the order they were added, on the thread that ticks: keep them short.
    pub fn on_alert(mut self, callback: impl Fn(&Alert) + Send + Sync + 'static) -> Self {
        self.callbacks.push(Arc::new(callback));
        self
    }

    /// Takes the targets, the interval and the alerts flag (`PERFORMANCE_ALERTS_ENABLED`) from
    /// `config`.
    pub fn from_config(self, config: &CacheConfig) -> Self {
        self.hit_rate_target_percent(config.hit_rate_target_percent())
            .response_time_target(config.response_time_target())
            .interval(config.monitoring_interval())
            .alerts_enabled(config.performance_alerts_enabled())
    }

    /// Builds the monitor.
    pub fn build(self) -> Monitor {
        Monitor {
            cache: self.cache,
            settings: self.settings,
            callbacks: self.callbacks,
            state: Mutex::new(State::default()),
        }
    }
}

/// The task started by [`Monitor::spawn`]; dropping it stops the task.
#[derive(Debug)]
pub struct MonitorHandle {
    task: JoinHandle<()>,
    last: Arc<Mutex<Option<Report>>>,
}

impl MonitorHandle {
    /// The latest report, once the first interval has passed.
    pub fn last_report(&self) -> Option<Report> {
        self.last.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

impl Drop for MonitorHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use crate::cache::clock::Clock;
    use crate::{BoxError, Decision, Permission, Principal};

    const ALLOW_TTL: Duration = Duration::from_secs(60);
    const KEYS: u32 = 30;

    fn user(i: u32) -> Principal {
        Principal::new(format!("user{i}"))
    }

    fn read() -> Permission {
        Permission::new("documents:1", "read")
    }

    /// A cache on a manual clock whose authorizer allows unless told to fail.
    fn cache(clock: &Clock, failing: &Arc<AtomicBool>) -> AuthzCache {
        let failing = failing.clone();
        AuthzCache::builder(move |_: Principal, _: Permission| {
            let fail = failing.load(Ordering::SeqCst);
            async move { if fail { Err::<Decision, BoxError>("down".into()) } else { Ok(Decision::allow()) } }
        })
        .allow_ttl(ALLOW_TTL)
        .clock(clock.clone())
        .build()
    }

    /// Checks each of the `KEYS` users `rounds` times.
    async fn checks(cache: &AuthzCache, rounds: u32) {
        for _ in 0..rounds {
            for i in 0..KEYS {
                let _ = cache.check(&user(i), &read()).await;
            }
        }
    }

    /// A monitor with a 90 % target and a latency target nothing reaches, collecting alerts.
    fn monitor(cache: &AuthzCache, alerts_enabled: bool) -> (Monitor, Arc<Mutex<Vec<Alert>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let monitor = Monitor::builder(cache.clone())
            .hit_rate_target_percent(90.0)
            .response_time_target(Duration::from_secs(3600))
            .alerts_enabled(alerts_enabled)
            .on_alert(move |alert| s.lock().unwrap().push(alert.clone()))
            .build();
        (monitor, seen)
    }

    fn kinds(alerts: &[Alert]) -> Vec<AlertKind> {
        alerts.iter().map(|a| a.kind).collect()
    }

    #[tokio::test]
    async fn an_alert_fires_when_the_hit_rate_drops_below_target_after_entries_expire() {
        let clock = Clock::manual();
        let cache = cache(&clock, &Arc::default());
        let (monitor, seen) = monitor(&cache, true);

        // Warm: 30 misses, then 570 hits.
        checks(&cache, 20).await;
        let warm = monitor.tick(&cache.stats());
        assert_eq!((warm.checks, warm.l1.hits, warm.l1.misses), (600, 570, 30));
        assert_eq!(warm.hit_rate_percent, Some(95.0));
        assert_eq!(warm.authorizer_calls, 30);
        assert!(warm.alerts.is_empty(), "{:?}", warm.alerts);
        assert!(seen.lock().unwrap().is_empty());

        // Every entry expires; the next window's checks all miss.
        clock.advance(ALLOW_TTL);
        checks(&cache, 1).await;
        let cold = monitor.tick(&cache.stats());
        assert_eq!((cold.checks, cold.l1.misses, cold.l1.expired), (30, 30, 30));
        assert_eq!(cold.hit_rate_percent, Some(0.0));
        assert_eq!(kinds(&cold.alerts), [AlertKind::HitRateBelowTarget]);
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen, cold.alerts, "the callback got the report's alerts");
        assert_eq!(seen.len(), 1, "one alert, through the callback");
        assert_eq!(seen[0].recommendation, Some(SHORT_TTL));
        assert!(seen[0].message.starts_with("hit rate 0.0% over 30 checks, target 90.0%"), "{}", seen[0].message);

        // The trend after the drop.
        assert_eq!(cold.history, [95.0, 0.0]);
        assert_eq!(cold.trend, Trend::Degrading);
    }

    #[tokio::test]
    async fn with_alerts_disabled_reports_list_alerts_but_no_callback_runs() {
        let clock = Clock::manual();
        let cache = cache(&clock, &Arc::default());
        let config = CacheConfig::default()
            .with_hit_rate_target_percent(90.0)
            .with_response_time_target(Duration::from_secs(60))
            .with_performance_alerts_enabled(false);
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        let monitor = Monitor::builder(cache.clone())
            .on_alert(move |_| {
                c.fetch_add(1, Ordering::SeqCst);
            })
            .from_config(&config)
            .build();
        checks(&cache, 20).await;
        assert!(monitor.tick(&cache.stats()).alerts.is_empty());
        clock.advance(ALLOW_TTL);
        checks(&cache, 1).await;
        let report = monitor.tick(&cache.stats());
        assert_eq!(kinds(&report.alerts), [AlertKind::HitRateBelowTarget]);
        assert_eq!(calls.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn small_and_empty_windows_raise_no_hit_rate_alert() {
        let clock = Clock::manual();
        let cache = cache(&clock, &Arc::default());
        let (monitor, seen) = monitor(&cache, true);
        let empty = monitor.tick(&cache.stats());
        assert_eq!((empty.checks, empty.hit_rate_percent, empty.trend), (0, None, Trend::Stable));
        assert!(empty.history.is_empty());
        // 19 misses: below target, too few to alert.
        for i in 0..19 {
            cache.check(&user(i), &read()).await.unwrap();
        }
        let small = monitor.tick(&cache.stats());
        assert_eq!(small.hit_rate_percent, Some(0.0));
        assert!(small.alerts.is_empty());
        assert!(seen.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn the_trend_follows_the_last_windows() {
        let clock = Clock::manual();
        let cache = cache(&clock, &Arc::default());
        let (monitor, _) = monitor(&cache, true);
        let monitor = Monitor { settings: Settings { windows: 4, ..monitor.settings }, ..monitor };
        // Hit rates: 0, 50, 75, 90: improving.
        let mut report = None;
        for rounds in [1, 2, 4, 10] {
            clock.advance(ALLOW_TTL);
            checks(&cache, rounds).await;
            report = Some(monitor.tick(&cache.stats()));
        }
        let report = report.unwrap();
        assert_eq!(report.history, [0.0, 50.0, 75.0, 90.0]);
        assert_eq!(report.trend, Trend::Improving);
        // Two more windows at 90 %: the oldest fall out of the history.
        for _ in 0..2 {
            clock.advance(ALLOW_TTL);
            checks(&cache, 10).await;
        }
        let flat = monitor.tick(&cache.stats());
        assert_eq!(flat.history, [50.0, 75.0, 90.0, 90.0], "one window of 600 checks at 90 %");
        assert_eq!(Trend::of(&[90.0, 90.5, 89.5, 90.0]), Trend::Stable);
        assert_eq!(Trend::of(&[95.0]), Trend::Stable);
        assert_eq!(Trend::of(&[95.0, 80.0, 93.0]), Trend::Degrading);
    }

    #[tokio::test]
    async fn a_failing_authorizer_and_a_slow_path_raise_alerts() {
        let clock = Clock::manual();
        let failing = Arc::new(AtomicBool::new(true));
        let cache = cache(&clock, &failing);
        let monitor = Monitor::builder(cache.clone())
            .hit_rate_target_percent(0.0)
            .response_time_target(Duration::from_nanos(1))
            .build();
        for i in 0..3 {
            assert!(cache.check(&user(i), &read()).await.is_err());
        }
        let report = monitor.tick(&cache.stats());
        assert_eq!((report.authorizer_calls, report.authorizer_errors), (3, 3));
        assert_eq!(kinds(&report.alerts), [AlertKind::LatencyAboveTarget, AlertKind::AuthorizerFailing]);
        assert!(report.alerts[0].message.starts_with("miss p95 latency"), "{}", report.alerts[0].message);
        assert!(report.alerts[1].message.starts_with("authorizer failed 3 of 3 calls"), "{}", report.alerts[1].message);
        // Nothing new in the next window: no alert, though the cumulative p95 is unchanged.
        assert!(monitor.tick(&cache.stats()).alerts.is_empty());
    }

    #[tokio::test]
    async fn consistency_mismatches_raise_an_alert_naming_the_tiers() {
        let cache = cache(&Clock::manual(), &Arc::default());
        let (monitor, fired) = monitor(&cache, true);
        let quiet = cache.stats();
        assert!(monitor.tick(&quiet).alerts.is_empty());
        let mut stats = quiet;
        stats.audit.mismatches_l1 = 2;
        stats.audit.mismatches_l3 = 1;
        let report = monitor.tick(&stats);
        assert_eq!(kinds(&report.alerts), [AlertKind::ConsistencyMismatch]);
        assert!(report.alerts[0].message.contains("3 cached decision(s)"), "{}", report.alerts[0].message);
        assert!(report.alerts[0].message.contains("2 from l1, 1 from l3"), "{}", report.alerts[0].message);
        assert_eq!(report.alerts[0].recommendation, Some(MISMATCH));
        assert_eq!(fired.lock().unwrap().len(), 1);
        // Nothing new in the next window: no alert.
        assert!(monitor.tick(&stats).alerts.is_empty());
    }

    #[tokio::test]
    async fn a_full_l1_recommends_a_bigger_l1() {
        let clock = Clock::manual();
        let cache = cache(&clock, &Arc::default());
        let (monitor, _) = monitor(&cache, true);
        checks(&cache, 1).await;
        let mut stats = cache.stats();
        stats.tiers.l1.bytes = (stats.tiers.l1.max_bytes * 9).div_ceil(10);
        let report = monitor.tick(&stats);
        assert_eq!(report.alerts[0].recommendation, Some(FULL_L1));
    }

    #[tokio::test]
    async fn a_breaker_that_opens_and_a_silent_backplane_raise_alerts() {
        use crate::{BackplaneSnapshot, BreakerState, RemoteTierSnapshot};

        let cache = cache(&Clock::manual(), &Arc::default());
        let (monitor, _) = monitor(&cache, true);
        let l2 = |opens, breaker| RemoteTierSnapshot {
            hits: 0,
            misses: 0,
            expired: 0,
            stale: 0,
            rejected: 0,
            errors: 0,
            writes: 0,
            write_errors: 0,
            write_drops: 0,
            swept: 0,
            breaker,
            breaker_opens: opens,
            call_errors: 5,
            call_timeouts: 0,
            calls_skipped: 0,
            warning: None,
            owed: 0,
        };
        let mut stats = StatsSnapshot::default();
        stats.tiers.l2 = Some(l2(0, BreakerState::Closed));
        stats.backplane = Some(BackplaneSnapshot { connected: true, l1_trusted: true, ..Default::default() });
        assert!(monitor.tick(&stats).alerts.is_empty());
        stats.tiers.l2 = Some(l2(1, BreakerState::Open));
        stats.backplane = Some(BackplaneSnapshot { connected: false, silent_for_ms: 1500, ..Default::default() });
        let report = monitor.tick(&stats);
        assert_eq!(kinds(&report.alerts), [AlertKind::BreakerOpened, AlertKind::BackplaneSilent]);
        assert_eq!(report.alerts[0].recommendation, Some(BREAKER));
        assert_eq!(report.alerts[1].recommendation, Some(SILENT));
        // Still open, still silent: the breaker did not open again, the backplane is still silent.
        assert_eq!(kinds(&monitor.tick(&stats).alerts), [AlertKind::BackplaneSilent]);
    }

    /// A remote tier's counters: reads, breaker opens and state; the rest zero.
    fn remote(hits: u64, misses: u64, errors: u64, opens: u64, breaker: crate::BreakerState) -> RemoteTierSnapshot {
        RemoteTierSnapshot {
            hits,
            misses,
            expired: 0,
            stale: 0,
            rejected: 0,
            errors,
            writes: 0,
            write_errors: 0,
            write_drops: 0,
            swept: 0,
            breaker,
            breaker_opens: opens,
            call_errors: 2 * opens,
            call_timeouts: opens,
            calls_skipped: errors,
            warning: None,
            owed: 0,
        }
    }

    #[tokio::test]
    async fn l3_hits_count_as_answered_and_an_l3_breaker_that_opens_raises_an_alert_naming_l3() {
        use crate::BreakerState::{Closed, Open};

        let cache = cache(&Clock::manual(), &Arc::default());
        let (monitor, seen) = monitor(&cache, true);
        // 100 checks: 60 L1 hits; of the 40 L1 misses L2 answers 10, L3 25, the authorizer 5.
        let mut stats = StatsSnapshot::default();
        (stats.tiers.l1.hits, stats.tiers.l1.misses) = (60, 40);
        stats.tiers.l2 = Some(remote(10, 30, 0, 0, Closed));
        stats.tiers.l3 = Some(remote(25, 5, 0, 0, Closed));
        let report = monitor.tick(&stats);
        assert_eq!(report.checks, 100);
        assert_eq!(report.hit_rate_percent, Some(95.0), "l1 60 + l2 10 + l3 25 answered");
        assert_eq!(report.l3, Some(TierWindow::new(25, 5, 0, 0)));
        assert_eq!(report.l3.unwrap().hit_rate_percent, Some(25.0 * 100.0 / 30.0));
        assert!(report.alerts.is_empty(), "{:?}", report.alerts);

        // 20 checks miss L1 and L2; L3's breaker opens, its reads fail or are skipped: L3 errors
        // count as misses, the authorizer answers everything.
        stats.tiers.l1.misses += 20;
        stats.tiers.l2 = Some(remote(10, 50, 0, 0, Closed));
        stats.tiers.l3 = Some(remote(25, 5, 20, 1, Open));
        let report = monitor.tick(&stats);
        assert_eq!((report.checks, report.hit_rate_percent), (20, Some(0.0)));
        assert_eq!(report.l3, Some(TierWindow::new(0, 20, 0, 0)));
        assert_eq!(kinds(&report.alerts), [AlertKind::HitRateBelowTarget, AlertKind::BreakerOpened]);
        let alert = &report.alerts[1];
        assert_eq!(
            alert.message,
            "l3 circuit breaker opened 1 time(s) in the window, now open (2 call errors, 1 timeouts)"
        );
        assert_eq!(alert.recommendation, Some(BREAKER_L3));
        assert_eq!(seen.lock().unwrap().last(), Some(alert), "the callback got it");

        // Still open, no new opening; L2's breaker opens: the alert names l2, not l3. Warming read
        // 50 rows from L3 in this window: remote hits are capped at the L1 misses.
        stats.tiers.l1.misses += 20;
        stats.tiers.l2 = Some(remote(10, 70, 0, 1, Open));
        stats.tiers.l3 = Some(remote(75, 5, 40, 1, Open));
        let report = monitor.tick(&stats);
        assert_eq!(report.hit_rate_percent, Some(100.0));
        assert_eq!(kinds(&report.alerts), [AlertKind::BreakerOpened]);
        assert!(report.alerts[0].message.starts_with("l2 circuit breaker opened 1 time(s)"), "{:?}", report.alerts);
        assert_eq!(report.alerts[0].recommendation, Some(BREAKER));
    }

    #[tokio::test]
    async fn report_json_with_l3() {
        let cache = cache(&Clock::manual(), &Arc::default());
        let (monitor, _) = monitor(&cache, false);
        let mut stats = StatsSnapshot::default();
        (stats.tiers.l1.hits, stats.tiers.l1.misses) = (60, 40);
        stats.tiers.l2 = Some(remote(10, 30, 0, 0, crate::BreakerState::Closed));
        stats.tiers.l3 = Some(remote(25, 5, 2, 1, crate::BreakerState::HalfOpen));
        insta::assert_json_snapshot!(monitor.tick(&stats));
    }

    #[tokio::test(start_paused = true)]
    async fn the_spawned_task_ticks_every_interval_until_dropped() {
        let cache = cache(&Clock::manual(), &Arc::default());
        let handle = Monitor::builder(cache.clone()).interval(Duration::from_secs(30)).build().spawn();
        checks(&cache, 2).await;
        tokio::task::yield_now().await;
        assert!(handle.last_report().is_none(), "no tick before the first interval");
        tokio::time::advance(Duration::from_secs(30)).await;
        for _ in 0..10 {
            if handle.last_report().is_some() {
                break;
            }
            tokio::task::yield_now().await;
        }
        let report = handle.last_report().expect("a tick after one interval");
        assert_eq!((report.checks, report.hit_rate_percent), (60, Some(50.0)));
        let task = handle.task.abort_handle();
        drop(handle);
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(task.is_finished(), "dropping the handle stops the task");
    }

    #[test]
    fn monitors_and_handles_are_send_and_sync() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Monitor>();
        send_sync::<MonitorHandle>();
        send_sync::<Report>();
    }
}
