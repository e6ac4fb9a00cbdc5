//! `--saturate P99_MS`: each configuration's highest throughput while p99 stays within a limit.
//!
//! Closed loop without think time: 1, 2, 4, ... concurrent request loops (each on a keep-alive
//! connection of its own, each drawing a user of the workload per request, so every step sends
//! the same kind of stream), `--duration` per step, until p99 passes twice the limit or the loops
//! reach `--connections`. A configuration's figure is the best throughput among the steps whose
//! p99 is within the limit and which answered every request as the roles say; the report gives
//! it as a ratio to bare's, measured in the same run.

use std::sync::Arc;
use std::time::Duration;

use crate::BoxError;
use crate::args::{Mode, Opts};
use crate::driver::Target;
use crate::report::fmt_us;
use crate::runner::run_target;
use crate::summary::Summary;
use crate::workload::Workload;

/// One step: this many loops, what they got.
pub(crate) struct Step {
    pub(crate) loops: usize,
    pub(crate) throughput: f64,
    pub(crate) p99_us: f64,
    pub(crate) success: f64,
    /// The generator's busy share of its threads: near 1, the step measured the generator.
    pub(crate) generator: f64,
}

/// One configuration's steps.
pub(crate) struct Saturation {
    pub(crate) name: String,
    pub(crate) steps: Vec<Step>,
    pub(crate) limit_us: f64,
}

impl Saturation {
    /// The best step within the limit (p99) that answered everything as the roles say.
    pub(crate) fn best(&self) -> Option<&Step> {
        self.steps
            .iter()
            .filter(|s| s.p99_us <= self.limit_us && s.success >= 1.0)
            .max_by(|a, b| a.throughput.total_cmp(&b.throughput))
    }
}

/// Steps the running configuration `target`.
pub(crate) async fn saturate(
    o: &Opts,
    target: Arc<Target>,
    wl: Arc<Workload>,
    about: String,
) -> Result<Saturation, BoxError> {
    let limit_us = o.saturate.map_or(f64::INFINITY, |d| d.as_secs_f64() * 1e6);
    let mut steps = Vec::new();
    let mut loops = 1;
    while loops <= o.connections {
        let step_opts =
            Opts { mode: Mode::Closed, think: Duration::ZERO, loops: Some(loops), connections: loops, ..o.clone() };
        let s = Summary::new(run_target(&step_opts, target.clone(), wl.clone(), about.clone()).await?);
        let generator = s.cpu_share(s.cpu.generator_ns) / o.client_threads as f64;
        println!(
            "{}: {loops:>3} loops: {:>8.0} req/s, p99 {:>9}, success {:.2}%, generator busy {:.0}%, app busy {:.0}%{}",
            target.name,
            s.throughput,
            fmt_us(s.latency.p99),
            s.success() * 100.0,
            generator * 100.0,
            s.cpu_share(s.cpu.server_ns) / o.server_threads as f64 * 100.0,
            if s.latency.p99 <= limit_us { "" } else { " (over the limit)" }
        );
        steps.push(Step { loops, throughput: s.throughput, p99_us: s.latency.p99, success: s.success(), generator });
        if s.latency.p99 > 2.0 * limit_us {
            break;
        }
        loops *= 2;
    }
    Ok(Saturation { name: target.name.clone(), steps, limit_us })
}

/// The table and the target (l1 at least 0.90x bare).
pub(crate) fn print_saturation(all: &[Saturation]) {
    let Some(limit) = all.first().map(|s| s.limit_us) else { return };
    let bare = all.iter().find(|s| s.name == "bare").and_then(Saturation::best).map(|b| b.throughput);
    println!("\nsaturation: the highest throughput with p99 at most {} (closed loop, no think time)", fmt_us(limit));
    println!("| configuration | req/s | loops | p99 | generator busy | vs bare |");
    println!("|---|---:|---:|---:|---:|---:|");
    for s in all {
        match s.best() {
            Some(b) => println!(
                "| {} | {:.0} | {} | {} | {:.0}% | {} |",
                s.name,
                b.throughput,
                b.loops,
                fmt_us(b.p99_us),
                b.generator * 100.0,
                bare.map_or("-".to_owned(), |t| format!("{:.3}x", b.throughput / t))
            ),
            None => println!("| {} | - | - | - | - | no step within the limit |", s.name),
        }
    }
    if all.iter().filter_map(Saturation::best).any(|b| b.generator > 0.85) {
        println!(
            "warning: the generator was busy over 85% at a best step: that step measured the generator as well (try --client-threads 2)"
        );
    }
    if let (Some(bare), Some(l1)) = (bare, all.iter().find(|s| s.name == "l1").and_then(Saturation::best)) {
        let r = l1.throughput / bare;
        println!(
            "\ntargets:\n  [{}] l1: {r:.3}x bare's throughput at the p99 limit (target at least 0.90x)",
            if r >= 0.90 { "met" } else { "MISSED" }
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_best_step_is_the_fastest_within_the_limit_that_answered_everything() {
        let step = |loops, throughput, p99_us, success| Step { loops, throughput, p99_us, success, generator: 0.5 };
        let s = Saturation {
            name: "l1".into(),
            limit_us: 5_000.0,
            steps: vec![
                step(1, 1_000.0, 300.0, 1.0),
                step(2, 3_000.0, 900.0, 1.0),
                step(4, 9_000.0, 4_000.0, 0.99),
                step(8, 12_000.0, 7_000.0, 1.0),
            ],
        };
        assert_eq!(s.best().map(|b| b.loops), Some(2));
        let none = Saturation { name: "x".into(), limit_us: 100.0, steps: vec![step(1, 1_000.0, 300.0, 1.0)] };
        assert!(none.best().is_none());
    }
}
