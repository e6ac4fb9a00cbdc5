//! CPU time: per thread of this process, the Postgres and Redis server processes', the load
//! average.

use std::collections::HashMap;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Group {
    Generator,
    Server,
    Other,
}
/// CPU nanoseconds of each thread of this process, by thread id, with its group (by name).
/// `/proc/self/task/<tid>/schedstat` is in nanoseconds; without it, `stat`'s utime + stime in
/// clock ticks, assuming 100 Hz.
pub(crate) fn thread_cpu() -> HashMap<u64, (Group, u64)> {
    let mut out = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else { return out };
    for entry in dir.flatten() {
        let Some(tid) = entry.file_name().to_str().and_then(|t| t.parse::<u64>().ok()) else { continue };
        let path = entry.path();
        let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        let group = if comm.starts_with("lt-client") || comm.starts_with("lt-pacer") {
            Group::Generator
        } else if comm.starts_with("lt-server") {
            Group::Server
        } else {
            Group::Other
        };
        let ns = std::fs::read_to_string(path.join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next().and_then(|n| n.parse::<u64>().ok()))
            .or_else(|| stat_ticks(&path.join("stat")).map(|t| t * 10_000_000));
        if let Some(ns) = ns {
            out.insert(tid, (group, ns));
        }
    }
    out
}
/// utime + stime, in clock ticks, from a `stat` file.
pub(crate) fn stat_ticks(path: &std::path::Path) -> Option<u64> {
    let stat = std::fs::read_to_string(path).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Cpu {
    pub(crate) generator_ns: u64,
    pub(crate) server_ns: u64,
    pub(crate) other_ns: u64,
}
pub(crate) fn cpu_between(before: &HashMap<u64, (Group, u64)>, after: &HashMap<u64, (Group, u64)>) -> Cpu {
    let mut cpu = Cpu::default();
    for (tid, (group, ns)) in after {
        let d = ns.saturating_sub(before.get(tid).map_or(0, |b| b.1));
        match group {
            Group::Generator => cpu.generator_ns += d,
            Group::Server => cpu.server_ns += d,
            Group::Other => cpu.other_ns += d,
        }
    }
    cpu
}
/// CPU clock ticks (utime + stime) of every visible `postgres` (index 0) and `redis-server`
/// (index 1) process, by pid. Postgres serves each connection from a process of its own: the
/// pools' backends are up before a run starts (warm-up) and still up when it ends.
pub(crate) fn server_ticks() -> HashMap<u32, (usize, u64)> {
    let mut out = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else { return out };
    for entry in dir.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else { continue };
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        let which = match comm.trim_end() {
            "postgres" => 0,
            "redis-server" => 1,
            _ => continue,
        };
        if let Some(ticks) = stat_ticks(&entry.path().join("stat")) {
            out.insert(pid, (which, ticks));
        }
    }
    out
}
/// Seconds of CPU the Postgres and Redis processes used between two `server_ticks` (100 Hz).
pub(crate) fn server_cpu_between(before: &HashMap<u32, (usize, u64)>, after: &HashMap<u32, (usize, u64)>) -> [f64; 2] {
    let mut s = [0.0; 2];
    for (pid, (which, ticks)) in after {
        s[*which] += ticks.saturating_sub(before.get(pid).map_or(0, |b| b.1)) as f64 / 100.0;
    }
    s
}
/// The 1-minute load average.
pub(crate) fn loadavg() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg").ok()?.split_whitespace().next()?.parse().ok()
}
pub(crate) fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
