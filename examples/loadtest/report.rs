//! The report: the table on stdout and the SVG latency chart.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use crate::client::ERR_KINDS;
use crate::runner::CacheDelta;
use crate::summary::{Summary, per_request_us, ratio};

pub(crate) fn fmt_us(v: f64) -> String {
    if v < 1000.0 {
        format!("{v:.0} µs")
    } else if v < 1_000_000.0 {
        format!("{:.2} ms", v / 1000.0)
    } else {
        format!("{:.2} s", v / 1e6)
    }
}
/// An axis label for 1, 2 or 5 times a power of ten microseconds: "100 µs", "1 ms", "2 s".
pub(crate) fn fmt_axis(v: f64) -> String {
    if v < 1000.0 {
        format!("{} µs", v.round())
    } else if v < 1_000_000.0 {
        format!("{} ms", (v / 1000.0).round())
    } else {
        format!("{} s", (v / 1e6).round())
    }
}
pub(crate) fn print_table(sums: &[Summary]) {
    let base = sums.iter().find(|s| s.name == "bare");
    let mut rows: Vec<(String, Vec<String>)> = Vec::new();
    let mut row =
        |label: &str, f: &dyn Fn(&Summary) -> String| rows.push((label.to_owned(), sums.iter().map(f).collect()));
    row("requests", &|s| s.issued.to_string());
    row("responses", &|s| s.responses.to_string());
    row("success (as the roles say)", &|s| format!("{:.2}%", s.success() * 100.0));
    let codes: BTreeSet<u16> = sums.iter().flat_map(|s| s.status.keys().copied()).collect();
    for code in codes {
        row(&format!("  status {code}"), &|s| s.status.get(&code).copied().unwrap_or(0).to_string());
    }
    for (i, kind) in ERR_KINDS.iter().enumerate() {
        if sums.iter().any(|s| s.errors[i].1 > 0) {
            row(&format!("  error: {}", kind.name()), &|s| s.errors[i].1.to_string());
        }
    }
    row("latency p50", &|s| fmt_us(s.latency.p50));
    row("latency p95", &|s| fmt_us(s.latency.p95));
    row("latency p99", &|s| fmt_us(s.latency.p99));
    row("latency p99.9", &|s| fmt_us(s.latency.p999));
    row("latency max", &|s| fmt_us(s.latency.max));
    row("service time p50 / p99", &|s| format!("{} / {}", fmt_us(s.service.p50), fmt_us(s.service.p99)));
    row("send lag p50 / p99", &|s| format!("{} / {}", fmt_us(s.lag.p50), fmt_us(s.lag.p99)));
    row("throughput", &|s| format!("{:.0} /s", s.throughput));
    if let Some(b) = base {
        let fmt_ratio = |r: Option<f64>| r.map_or("-".to_owned(), |r| format!("{r:.2}x"));
        row("p50 / bare p50", &|s| fmt_ratio(ratio(s.latency.p50, b.latency.p50)));
        row("p99 / bare p99", &|s| fmt_ratio(ratio(s.latency.p99, b.latency.p99)));
        row("throughput / bare", &|s| fmt_ratio(ratio(s.throughput, b.throughput)));
    }
    let cache = |f: fn(&CacheDelta) -> String| move |s: &Summary| s.cache.as_ref().map_or("-".to_owned(), f);
    let pct = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{:.2}%", v * 100.0));
    row("distinct keys / sent", &|s| format!("{} / {}", s.keys, s.sent));
    row("compulsory-miss bound", &|s| pct(s.bound()));
    if sums.iter().any(|s| s.cache.is_some()) {
        row("hit rate (any tier)", &|s| pct(s.hit_rate()));
        row("hit rate - bound", &|s| {
            s.hit_rate().zip(s.bound()).map_or("-".to_owned(), |(h, b)| format!("{:+.2} pt", (h - b) * 100.0))
        });
        row("L1 hits", &cache(|c| c.l1_hits.to_string()));
        row("L1 misses", &cache(|c| c.l1_misses.to_string()));
        row(
            "  untrusted / stale / expired",
            &cache(|c| format!("{} / {} / {}", c.l1_untrusted, c.l1_stale, c.l1_expired)),
        );
        if sums.iter().any(|s| s.cache.is_some_and(|c| c.l2.is_some() || c.l3.is_some())) {
            row("remote timeouts / write drops", &cache(|c| format!("{} / {}", c.remote_timeouts, c.write_drops)));
        }
        if sums.iter().any(|s| s.cache.is_some_and(|c| c.l2.is_some())) {
            row(
                "L2 hits / misses / errors",
                &cache(|c| c.l2.map_or("-".to_owned(), |l| format!("{} / {} / {}", l.0, l.1, l.2))),
            );
        }
        if sums.iter().any(|s| s.cache.is_some_and(|c| c.l3.is_some())) {
            row(
                "L3 hits / misses / errors",
                &cache(|c| c.l3.map_or("-".to_owned(), |l| format!("{} / {} / {}", l.0, l.1, l.2))),
            );
        }
        row("authorizer calls", &cache(|c| c.authorizer_calls.to_string()));
        row(
            "authorizer calls / check",
            &cache(|c| {
                if c.checks() == 0 {
                    "-".to_owned()
                } else {
                    format!("{:.3}", c.authorizer_calls as f64 / c.checks() as f64)
                }
            }),
        );
        row("single-flight joins", &cache(|c| c.single_flight_joins.to_string()));
        row("undecided (503)", &cache(|c| c.undecided.to_string()));
    }
    row("loadtest CPU (gen+pacer)", &|s| {
        format!("{:.2} s {:.0}%", s.cpu.generator_ns as f64 / 1e9, s.cpu_share(s.cpu.generator_ns) * 100.0)
    });
    row("loadtest CPU / request", &|s| format!("{:.1} µs", per_request_us(s.cpu.generator_ns, s.issued)));
    row("app CPU (in-process)", &|s| {
        if !s.local {
            return "-".to_owned();
        }
        format!("{:.2} s {:.0}%", s.cpu.server_ns as f64 / 1e9, s.cpu_share(s.cpu.server_ns) * 100.0)
    });
    row("app CPU / request", &|s| {
        if s.local { format!("{:.1} µs", per_request_us(s.cpu.server_ns, s.issued)) } else { "-".to_owned() }
    });
    row("postgres CPU / request", &|s| format!("{:.1} µs", s.servers[0] * 1e6 / s.issued.max(1) as f64));
    row("redis CPU / request", &|s| format!("{:.1} µs", s.servers[1] * 1e6 / s.issued.max(1) as f64));
    row("load average (1 min)", &|s| {
        let f = |l: Option<f64>| l.map_or("?".to_owned(), |l| format!("{l:.2}"));
        format!("{} -> {}", f(s.load[0]), f(s.load[1]))
    });

    let label_w = rows.iter().map(|r| r.0.chars().count()).max().unwrap_or(0).max("configuration".len());
    let widths: Vec<usize> = sums
        .iter()
        .enumerate()
        .map(|(i, s)| rows.iter().map(|r| r.1[i].chars().count()).max().unwrap_or(0).max(s.name.chars().count()))
        .collect();
    let mut out = format!("{:<label_w$}", "configuration");
    for (s, w) in sums.iter().zip(&widths) {
        let _ = write!(out, "  {:>w$}", s.name);
    }
    println!("{out}");
    println!("{}", "-".repeat(label_w + widths.iter().map(|w| w + 2).sum::<usize>()));
    for (label, cells) in rows {
        let mut out = format!("{label:<label_w$}");
        for (c, w) in cells.iter().zip(&widths) {
            let _ = write!(out, "  {c:>w$}");
        }
        println!("{out}");
    }
}
pub(crate) fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}
/// A line chart of p50..p99.9 per configuration, log-scale y axis, by hand.
/// Below it, with a `bare` configuration, each configuration's p50, p99 and throughput as
/// ratios to bare (log scale, bars from 1x).
pub(crate) fn svg_chart(sums: &[Summary], subtitle: &[String]) -> String {
    const COLORS: [&str; 6] = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"];
    let labels = ["p50", "p90", "p95", "p99", "p99.9"];
    let values = |s: &Summary| [s.latency.p50, s.latency.p90, s.latency.p95, s.latency.p99, s.latency.p999];
    let (w, h, ml, mr, mt, mb) = (940.0, 440.0, 80.0, 330.0, 40.0 + 16.0 * subtitle.len() as f64, 50.0);
    let base = sums.iter().find(|s| s.name == "bare");
    let panel2 = if base.is_some() && sums.len() > 1 { 300.0 } else { 0.0 };
    let total_h = h + panel2;
    let all: Vec<f64> = sums.iter().flat_map(values).filter(|v| *v > 0.0).collect();
    let lo = all.iter().copied().fold(f64::INFINITY, f64::min).max(1.0);
    let hi = all.iter().copied().fold(0.0, f64::max).max(lo);
    let dlo = if lo.is_finite() { lo.log10().floor() } else { 0.0 };
    let dhi = hi.log10().ceil().max(dlo + 1.0);
    let y = |v: f64| mt + (dhi - v.max(1.0).log10()) / (dhi - dlo) * (h - mt - mb);
    let x = |i: usize| ml + (i as f64 + 0.5) * (w - ml - mr) / labels.len() as f64;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{total_h}" viewBox="0 0 {w} {total_h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{total_h}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{ml}" y="22" font-size="15" font-weight="bold">Latency percentiles from the intended send time (log scale)</text>"#
    );
    for (i, line) in subtitle.iter().enumerate() {
        let _ = writeln!(s, r##"<text x="{ml}" y="{}" fill="#555">{}</text>"##, 40 + 16 * i, xml_escape(line));
    }
    let mut d = dlo;
    while d <= dhi {
        for (m, major) in [(1.0, true), (2.0, false), (5.0, false)] {
            let v = m * 10f64.powf(d);
            if v.log10() > dhi + 1e-9 {
                continue;
            }
            let yy = y(v);
            let (stroke, width) = if major { ("#bbb", 1.0) } else { ("#eee", 1.0) };
            let _ = writeln!(
                s,
                r#"<line x1="{ml}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="{stroke}" stroke-width="{width}"/>"#,
                w - mr
            );
            if major {
                let _ = writeln!(
                    s,
                    r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
                    ml - 8.0,
                    yy + 4.0,
                    xml_escape(&fmt_axis(v))
                );
            }
        }
        d += 1.0;
    }
    for (i, l) in labels.iter().enumerate() {
        let _ = writeln!(s, r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{l}</text>"#, x(i), h - mb + 20.0);
    }
    let _ = writeln!(
        s,
        r##"<line x1="{ml}" y1="{mt}" x2="{ml}" y2="{:.1}" stroke="#333"/><line x1="{ml}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="#333"/>"##,
        h - mb,
        h - mb,
        w - mr,
        h - mb
    );
    for (k, sum) in sums.iter().enumerate() {
        let color = COLORS[k % COLORS.len()];
        let pts: Vec<(f64, f64)> =
            values(sum).iter().enumerate().filter(|(_, v)| **v > 0.0).map(|(i, v)| (x(i), y(*v))).collect();
        let path: Vec<String> = pts.iter().map(|(a, b)| format!("{a:.1},{b:.1}")).collect();
        let _ = writeln!(s, r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"/>"#, path.join(" "));
        for (a, b) in &pts {
            let _ = writeln!(s, r#"<circle cx="{a:.1}" cy="{b:.1}" r="3.5" fill="{color}"/>"#);
        }
        let ly = mt + 10.0 + k as f64 * 36.0;
        let lx = w - mr + 16.0;
        let vs_bare = match base.filter(|b| b.name != sum.name) {
            Some(b) => format!(", {:.2}x bare", ratio(sum.latency.p99, b.latency.p99).unwrap_or(f64::NAN)),
            None => String::new(),
        };
        let _ = writeln!(
            s,
            r#"<line x1="{lx}" y1="{ly}" x2="{:.1}" y2="{ly}" stroke="{color}" stroke-width="3"/><text x="{:.1}" y="{:.1}">{} (p99 {}{})</text>"#,
            lx + 18.0,
            lx + 24.0,
            ly + 4.0,
            xml_escape(&sum.name),
            xml_escape(&fmt_us(sum.latency.p99)),
            xml_escape(&vs_bare)
        );
        let detail = match (sum.hit_rate(), sum.bound()) {
            (Some(hr), Some(b)) => {
                format!("success {:.2}%, hit rate {:.2}% (bound {:.2}%)", sum.success() * 100.0, hr * 100.0, b * 100.0)
            }
            _ => format!("success {:.2}%", sum.success() * 100.0),
        };
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="{:.1}" font-size="11" fill="#555">{}</text>"##,
            lx + 24.0,
            ly + 18.0,
            xml_escape(&detail)
        );
    }
    if let (Some(b), true) = (base, panel2 > 0.0) {
        ratio_panel(&mut s, sums, b, h, w, panel2);
    }
    s.push_str("</svg>\n");
    s
}
/// The ratio panel of `svg_chart`, from `top`, `height` high.
pub(crate) fn ratio_panel(s: &mut String, sums: &[Summary], base: &Summary, top: f64, w: f64, height: f64) {
    const SERIES: [(&str, &str); 3] = [("p50", "#4c78a8"), ("p99", "#e45756"), ("throughput", "#72b7b2")];
    let ratios: Vec<[f64; 3]> = sums
        .iter()
        .map(|x| {
            [
                ratio(x.latency.p50, base.latency.p50).unwrap_or(1.0),
                ratio(x.latency.p99, base.latency.p99).unwrap_or(1.0),
                ratio(x.throughput, base.throughput).unwrap_or(1.0),
            ]
        })
        .collect();
    let (ml, mr, mt, mb) = (80.0, 330.0, 44.0, 40.0);
    let all = ratios.iter().flatten().copied().filter(|r| *r > 0.0 && r.is_finite());
    let (lo, hi) = all.fold((1.0f64, 1.0f64), |(lo, hi), r| (lo.min(r), hi.max(r)));
    let (dlo, dhi) = ((lo.log10() - 0.05).floor().min(-1.0), (hi.log10() + 0.05).ceil().max(1.0));
    let y = |r: f64| top + mt + (dhi - r.max(1e-3).log10()) / (dhi - dlo) * (height - mt - mb);
    let _ = writeln!(
        s,
        r#"<text x="{ml}" y="{:.1}" font-size="15" font-weight="bold">Ratio to bare (log scale; bars start at 1x)</text>"#,
        top + 22.0
    );
    let mut d = dlo;
    while d <= dhi {
        let v = 10f64.powf(d);
        let yy = y(v);
        let _ = writeln!(
            s,
            r##"<line x1="{ml}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="{}"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}x</text>"##,
            w - mr,
            if d == 0.0 { "#333" } else { "#ddd" },
            ml - 8.0,
            yy + 4.0,
            v
        );
        d += 1.0;
    }
    let group = (w - ml - mr) / sums.len() as f64;
    let bar = (group * 0.8 / SERIES.len() as f64).min(28.0);
    for (k, (sum, r)) in sums.iter().zip(&ratios).enumerate() {
        let gx = ml + k as f64 * group + (group - bar * SERIES.len() as f64) / 2.0;
        for (j, ((_, color), v)) in SERIES.iter().zip(r).enumerate() {
            let (y0, y1) = (y(1.0), y(*v));
            let (top_y, bottom_y) = (y0.min(y1), y0.max(y1));
            let x = gx + j as f64 * bar;
            let _ = writeln!(
                s,
                r#"<rect x="{x:.1}" y="{top_y:.1}" width="{:.1}" height="{:.1}" fill="{color}"/>"#,
                bar - 2.0,
                (bottom_y - top_y).max(1.0)
            );
            let ly = if y1 <= y0 { top_y - 4.0 } else { bottom_y + 12.0 };
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{ly:.1}" text-anchor="middle" font-size="10">{v:.2}</text>"#,
                x + bar / 2.0 - 1.0
            );
        }
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            ml + (k as f64 + 0.5) * group,
            top + height - mb + 22.0,
            xml_escape(&sum.name)
        );
    }
    for (j, (label, color)) in SERIES.iter().enumerate() {
        let ly = top + mt + 10.0 + j as f64 * 20.0;
        let lx = w - mr + 16.0;
        let _ = writeln!(
            s,
            r#"<rect x="{lx}" y="{:.1}" width="14" height="10" fill="{color}"/><text x="{:.1}" y="{:.1}">{label} / bare {label}</text>"#,
            ly - 5.0,
            lx + 20.0,
            ly + 4.0
        );
    }
}
