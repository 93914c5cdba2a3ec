//! The comparison's results: samples per system and figure, a Markdown report with medians,
//! ranges and ratios, Ewii's targets with their gaps, and an SVG chart.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::systems::Kind;

/// A measured figure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Figure {
    /// iperf3, requester → service, one connection.
    BulkUp,
    /// iperf3 `-R`, service → requester, one connection.
    BulkDown,
    /// CPU seconds of the tunnel's processes per GiB moved in the two bulk runs.
    CpuPerGib,
    /// One-byte round trip on an open connection, median, from the harness's async client (a
    /// tokio runtime of two workers, the echo service on a thread beside it).
    RttP50,
    /// … 99th percentile.
    RttP99,
    /// The same round trips from a blocking client on a thread of its own (as psql), median.
    RttBlockingP50,
    /// … 99th percentile.
    RttBlockingP99,
    /// CPU time of the tunnel's processes per round trip (the round trips above).
    CpuPerRoundTrip,
    /// New connection → 1-byte echo → close, one at a time.
    RateC1,
    /// CPU time of the tunnel's processes per new connection, in the c=1 run.
    CpuPerNewC1,
    /// The same, 32 at once.
    RateC32,
    /// The customer-side agent's RSS before any load.
    RssIdle,
    /// … with 100 idle connections open through it.
    Rss100,
    /// … after the whole run, idle again.
    RssAfter,
    /// The agent's anonymous memory before any load (`RssAnon`: heap, stacks; without the
    /// mapped binary and libraries, which are file-backed, shared and reclaimable).
    AnonIdle,
    /// … after the whole run.
    AnonAfter,
    /// Ewii: the Client's process start to its `session_up`.
    StartToServing,
    /// The machine's steal time while the system was measured, in percent of all CPU time: how
    /// much the hypervisor took from this VM, which moves every figure of a shared machine.
    Steal,
}

impl Figure {
    /// Every figure, in report order.
    pub const ALL: [Figure; 18] = [
        Figure::BulkUp,
        Figure::BulkDown,
        Figure::CpuPerGib,
        Figure::RttP50,
        Figure::RttP99,
        Figure::RttBlockingP50,
        Figure::RttBlockingP99,
        Figure::CpuPerRoundTrip,
        Figure::RateC1,
        Figure::CpuPerNewC1,
        Figure::RateC32,
        Figure::RssIdle,
        Figure::Rss100,
        Figure::RssAfter,
        Figure::AnonIdle,
        Figure::AnonAfter,
        Figure::StartToServing,
        Figure::Steal,
    ];

    /// Title in the report.
    pub fn title(self) -> &'static str {
        match self {
            Figure::BulkUp => "Bulk, requester → service (iperf3, one connection)",
            Figure::BulkDown => "Bulk, service → requester (iperf3 -R, one connection)",
            Figure::CpuPerGib => "CPU-seconds per GiB moved, tunnel processes together",
            Figure::RttP50 => "1-byte round trip on an open connection, async client, p50",
            Figure::RttP99 => "1-byte round trip on an open connection, async client, p99",
            Figure::RttBlockingP50 => {
                "1-byte round trip on an open connection, blocking client (as psql), p50"
            }
            Figure::RttBlockingP99 => {
                "1-byte round trip on an open connection, blocking client (as psql), p99"
            }
            Figure::CpuPerRoundTrip => "CPU per round trip, tunnel processes together",
            Figure::RateC1 => "New connection → 1-byte echo → close, c=1",
            Figure::CpuPerNewC1 => "CPU per new connection at c=1, tunnel processes together",
            Figure::RateC32 => "New connection → 1-byte echo → close, c=32",
            Figure::RssIdle => "Agent RSS, idle",
            Figure::Rss100 => "Agent RSS, 100 idle connections open",
            Figure::RssAfter => "Agent RSS after the run",
            Figure::AnonIdle => "Agent anonymous memory (RssAnon), idle",
            Figure::AnonAfter => "Agent anonymous memory (RssAnon) after the run",
            Figure::StartToServing => "Agent process start to serving (Ewii: to `session_up`)",
            Figure::Steal => "The host's steal time while the system was measured",
        }
    }

    /// Unit of the values.
    pub fn unit(self) -> &'static str {
        match self {
            Figure::BulkUp | Figure::BulkDown => "Gbit/s",
            Figure::CpuPerGib => "CPU-s/GiB",
            Figure::RttP50 | Figure::RttP99 | Figure::RttBlockingP50 | Figure::RttBlockingP99 => {
                "µs"
            }
            Figure::CpuPerRoundTrip | Figure::CpuPerNewC1 => "CPU-µs",
            Figure::RateC1 | Figure::RateC32 => "conn/s",
            Figure::RssIdle
            | Figure::Rss100
            | Figure::RssAfter
            | Figure::AnonIdle
            | Figure::AnonAfter => "MB",
            Figure::StartToServing => "ms",
            Figure::Steal => "% of CPU time",
        }
    }

    /// "higher" or "lower", as in "higher is better".
    pub fn better(self) -> &'static str {
        if self.higher_is_better() {
            "higher"
        } else {
            "lower"
        }
    }

    /// Whether the figure describes the host rather than a system (no ratios, no "better").
    pub fn context_only(self) -> bool {
        matches!(self, Figure::Steal)
    }

    /// How a reader weighs the figure: "higher is better", or that it is only context.
    pub fn judged(self) -> String {
        if self.context_only() {
            "context for the other figures, not a result".to_owned()
        } else {
            format!("{} is better", self.better())
        }
    }

    /// Whether a larger value is better.
    pub fn higher_is_better(self) -> bool {
        matches!(
            self,
            Figure::BulkUp | Figure::BulkDown | Figure::RateC1 | Figure::RateC32
        )
    }
}

/// Every sample of the run: system → figure → one value per repetition.
#[derive(Debug, Default)]
pub struct Samples(BTreeMap<usize, BTreeMap<Figure, Vec<f64>>>);

fn index(kind: Kind) -> usize {
    Kind::ALL.iter().position(|k| *k == kind).unwrap_or(0)
}

impl Samples {
    /// Records one value.
    pub fn add(&mut self, kind: Kind, figure: Figure, value: f64) {
        self.0
            .entry(index(kind))
            .or_default()
            .entry(figure)
            .or_default()
            .push(value);
    }

    fn values(&self, kind: Kind, figure: Figure) -> Option<&[f64]> {
        self.0
            .get(&index(kind))
            .and_then(|f| f.get(&figure))
            .map(Vec::as_slice)
            .filter(|v| !v.is_empty())
    }

    /// The median of a figure of a system.
    pub fn median(&self, kind: Kind, figure: Figure) -> Option<f64> {
        let mut v = self.values(kind, figure)?.to_vec();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        Some(if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        })
    }

    fn range(&self, kind: Kind, figure: Figure) -> Option<(f64, f64)> {
        let v = self.values(kind, figure)?;
        let min = v.iter().copied().fold(f64::INFINITY, f64::min);
        let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        Some((min, max))
    }

    fn systems(&self) -> Vec<Kind> {
        Kind::ALL
            .into_iter()
            .filter(|k| self.0.contains_key(&index(*k)))
            .collect()
    }
}

fn fmt(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// What the report says about the run besides the numbers.
#[derive(Debug)]
pub struct Context {
    /// ISO date of the run.
    pub date: String,
    /// CPU, cores, memory, kernel.
    pub machine: String,
    /// Commit of this checkout.
    pub commit: String,
    /// Versions of the peers and tools.
    pub versions: String,
    /// How the run was made (repetitions, durations).
    pub method: String,
    /// Systems that could not be run, and why.
    pub missing: Vec<String>,
    /// File name of the chart beside the report.
    pub chart: String,
}

/// A target of the performance issue, checked against the medians.
struct Target {
    what: &'static str,
    ewii: Option<f64>,
    goal: Option<f64>,
    /// `true`: Ewii's value must be at least the goal; `false`: at most.
    at_least: bool,
    unit: &'static str,
    /// Ewii's values over the repetitions (min, max), and the goal's (from the peer's range;
    /// a fixed goal is both ends): the verdict of every pairing of repetitions.
    ewii_range: Option<(f64, f64)>,
    goal_range: Option<(f64, f64)>,
}

impl Target {
    /// Whether every repetition of Ewii meets the goal set by every repetition of the peer,
    /// none does, or the ranges straddle it: a median's verdict within the spread reads
    /// differently from one apart from it.
    fn spread(&self) -> &'static str {
        let (Some((e_lo, e_hi)), Some((g_lo, g_hi))) = (self.ewii_range, self.goal_range) else {
            return "—";
        };
        let (all, none) = if self.at_least {
            (e_lo >= g_hi, e_hi < g_lo)
        } else {
            (e_hi <= g_lo, e_lo > g_hi)
        };
        if all {
            "met in every pairing"
        } else if none {
            "missed in every pairing"
        } else {
            "within the spread"
        }
    }
}

/// What a target's goal is set by.
#[derive(Clone, Copy)]
enum Goal {
    /// This many times a peer's figure, in the same run.
    Peer(Kind, f64),
    /// A fixed value.
    Fixed(f64),
}

fn targets(s: &Samples) -> Vec<Target> {
    use Figure as F;
    use Goal::{Fixed, Peer};
    let noise = |by| Peer(Kind::RatholeNoise, by);
    // One row per target: what it says, the figure, the goal, whether Ewii's value must be at
    // least the goal (or at most), the unit.
    #[rustfmt::skip]
    let table: [(&'static str, Figure, Goal, bool, &'static str); 13] = [
        ("bulk up ≥ 1.2× rathole noise", F::BulkUp, noise(1.2), true, "Gbit/s"),
        ("bulk down ≥ 1.2× rathole noise", F::BulkDown, noise(1.2), true, "Gbit/s"),
        ("CPU-s per GiB ≤ rathole noise", F::CpuPerGib, noise(1.0), false, "CPU-s/GiB"),
        ("round trip p50 ≤ 0.8× rathole noise (async client)", F::RttP50, noise(0.8), false, "µs"),
        ("round trip p99 ≤ 0.8× rathole noise (async client)", F::RttP99, noise(0.8), false, "µs"),
        ("round trip p50 ≤ 0.8× rathole noise (blocking client)", F::RttBlockingP50, noise(0.8), false, "µs"),
        ("round trip p99 ≤ 0.8× rathole noise (blocking client)", F::RttBlockingP99, noise(0.8), false, "µs"),
        ("new connections c=1 ≥ 2× rathole noise", F::RateC1, noise(2.0), true, "conn/s"),
        ("new connections c=32 ≥ rathole tcp", F::RateC32, Peer(Kind::RatholeTcp, 1.0), true, "conn/s"),
        ("Client RSS idle ≤ 5 MB", F::RssIdle, Fixed(5.0), false, "MB"),
        ("Client RSS, 100 idle queries ≤ 7 MB", F::Rss100, Fixed(7.0), false, "MB"),
        ("Client RSS after the load ≤ 8 MB", F::RssAfter, Fixed(8.0), false, "MB"),
        ("process start to session_up ≤ 50 ms", F::StartToServing, Fixed(50.0), false, "ms"),
    ];
    let scaled = |r: Option<(f64, f64)>, by: f64| r.map(|(lo, hi)| (lo * by, hi * by));
    let mut targets: Vec<Target> = table
        .into_iter()
        .map(|(what, figure, goal, at_least, unit)| {
            let (goal, goal_range) = match goal {
                Peer(peer, by) => (
                    s.median(peer, figure).map(|v| v * by),
                    scaled(s.range(peer, figure), by),
                ),
                Fixed(v) => (Some(v), Some((v, v))),
            };
            Target {
                what,
                ewii: s.median(Kind::Ewii, figure),
                goal,
                at_least,
                unit,
                ewii_range: s.range(Kind::Ewii, figure),
                goal_range,
            }
        })
        .collect();
    // The lock's cost: the locked Client's bulk over the unlocked one's, and, repetition by
    // repetition, the locked bulk against 0.97 of the unlocked.
    let (on, off) = (Kind::EwiiLocked, Kind::Ewii);
    targets.push(Target {
        what: "eBPF lock: bulk with / without ≥ 0.97",
        ewii: match (s.median(on, F::BulkUp), s.median(off, F::BulkUp)) {
            (Some(on), Some(off)) if off > 0.0 => Some(on / off),
            _ => None,
        },
        goal: Some(0.97),
        at_least: true,
        unit: "ratio",
        ewii_range: s.range(on, F::BulkUp),
        goal_range: scaled(s.range(off, F::BulkUp), 0.97),
    });
    targets
}

/// The Markdown report.
pub fn markdown(s: &Samples, ctx: &Context) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Ewii against the tunnels customers know — {}\n",
        ctx.date
    );
    let _ = writeln!(out, "- machine: {}", ctx.machine);
    let _ = writeln!(out, "- commit: {}", ctx.commit);
    let _ = writeln!(out, "- versions: {}", ctx.versions);
    let _ = writeln!(out, "- method: {}", ctx.method);
    for m in &ctx.missing {
        let _ = writeln!(out, "- not run: {m}");
    }
    let _ = writeln!(out, "\n![chart]({})\n", ctx.chart);
    candidate_table(s, &mut out);
    let _ = writeln!(out, "## Ewii's targets (medians of this run)\n");
    let _ = writeln!(
        out,
        "The status reads the medians; the last column sets every repetition of Ewii against the goal from every repetition of the peer (min–max of both), so that a verdict within the run's spread reads as such.\n"
    );
    let _ = writeln!(
        out,
        "| target | Ewii | goal | status | every pairing of repetitions |\n|---|---|---|---|---|"
    );
    for t in targets(s) {
        let status = match (t.ewii, t.goal) {
            (Some(v), Some(g)) if (t.at_least && v >= g) || (!t.at_least && v <= g) => {
                "met".to_owned()
            }
            (Some(v), Some(g)) if g > 0.0 => {
                let gap = if t.at_least { g / v } else { v / g };
                format!("**not met**: {gap:.2}× off")
            }
            _ => "not measured".to_owned(),
        };
        let show =
            |v: Option<f64>| v.map_or("—".to_owned(), |v| format!("{} {}", fmt(v), t.unit));
        let _ = writeln!(
            out,
            "| {} | {} | {} | {status} | {} |",
            t.what,
            show(t.ewii),
            show(t.goal),
            t.spread()
        );
    }
    let systems = s.systems();
    for figure in Figure::ALL {
        if !systems.iter().any(|k| s.values(*k, figure).is_some()) {
            continue;
        }
        let _ = writeln!(
            out,
            "\n## {} ({}, {})\n",
            figure.title(),
            figure.unit(),
            figure.judged()
        );
        let _ = writeln!(
            out,
            "| system | median | min–max | × raw TCP | × rathole noise |\n|---|---|---|---|---|"
        );
        let raw = s.median(Kind::RawTcp, figure);
        let noise = s.median(Kind::RatholeNoise, figure);
        for k in &systems {
            let (Some(m), Some((lo, hi))) = (s.median(*k, figure), s.range(*k, figure)) else {
                continue;
            };
            let ratio = |base: Option<f64>| match base {
                Some(b) if b > 0.0 && !figure.context_only() => format!("{:.2}", m / b),
                _ => "—".to_owned(),
            };
            let name = if k.ewii() {
                format!("**{}**", k.label())
            } else {
                k.label().to_owned()
            };
            let _ = writeln!(
                out,
                "| {name} | {} | {}–{} | {} | {} |",
                fmt(m),
                fmt(lo),
                fmt(hi),
                ratio(raw),
                ratio(noise)
            );
        }
    }
    out
}

/// With a candidate build in the run: each figure's median for `Ewii` and the candidate, their
/// ratio, and whether the two ranges overlap (when they do, the run shows no difference).
fn candidate_table(s: &Samples, out: &mut String) {
    if s.values(Kind::EwiiCandidate, Figure::BulkUp).is_none()
        && s.values(Kind::EwiiCandidate, Figure::RttP50).is_none()
    {
        return;
    }
    let _ = writeln!(out, "## The candidate against Ewii (medians of this run)\n");
    let _ = writeln!(
        out,
        "| figure | Ewii | candidate | candidate / Ewii | ranges |\n|---|---|---|---|---|"
    );
    for figure in Figure::ALL {
        let (Some(a), Some(b), Some((alo, ahi)), Some((blo, bhi))) = (
            s.median(Kind::Ewii, figure),
            s.median(Kind::EwiiCandidate, figure),
            s.range(Kind::Ewii, figure),
            s.range(Kind::EwiiCandidate, figure),
        ) else {
            continue;
        };
        let ratio = if a > 0.0 {
            format!("{:.2}", b / a)
        } else {
            "—".to_owned()
        };
        let apart = if figure.context_only() {
            "context"
        } else if bhi < alo || ahi < blo {
            let better = (b > a) == figure.higher_is_better();
            if better {
                "apart: the candidate is better"
            } else {
                "apart: the candidate is worse"
            }
        } else {
            "overlap"
        };
        let _ = writeln!(
            out,
            "| {} ({}, {}) | {} | {} | {ratio} | {apart} |",
            figure.title(),
            figure.unit(),
            figure.judged(),
            fmt(a),
            fmt(b)
        );
    }
    let _ = writeln!(out);
}

/// An SVG chart: one panel per figure, one bar per system, the median written beside it.
pub fn svg(s: &Samples, ctx: &Context) -> String {
    const W: f64 = 760.0;
    const LABEL: f64 = 130.0;
    const BAR: f64 = 14.0;
    const GAP: f64 = 4.0;
    let systems = s.systems();
    let figures: Vec<Figure> = Figure::ALL
        .into_iter()
        .filter(|f| {
            !matches!(f, Figure::StartToServing | Figure::Steal)
                && systems.iter().any(|k| s.values(*k, *f).is_some())
        })
        .collect();
    let panel = 26.0 + systems.len() as f64 * (BAR + GAP) + 10.0;
    let height = 40.0 + panel * figures.len() as f64 + 20.0;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{height}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        out,
        r#"<text x="8" y="20" font-size="14" font-weight="bold">Ewii against the tunnels customers know — {} (medians)</text>"#,
        xml(&ctx.date)
    );
    for (i, figure) in figures.iter().enumerate() {
        let top = 40.0 + panel * i as f64;
        let better = figure.better();
        let _ = writeln!(
            out,
            r#"<text x="8" y="{}" font-weight="bold">{} ({}, {better} is better)</text>"#,
            top + 14.0,
            xml(figure.title()),
            xml(figure.unit())
        );
        let max = systems
            .iter()
            .filter_map(|k| s.median(*k, *figure))
            .fold(0.0, f64::max);
        for (j, k) in systems.iter().enumerate() {
            let y = top + 22.0 + j as f64 * (BAR + GAP);
            let _ = writeln!(
                out,
                r#"<text x="8" y="{}">{}</text>"#,
                y + BAR - 3.0,
                xml(k.label())
            );
            let Some(m) = s.median(*k, *figure) else {
                continue;
            };
            let width = if max > 0.0 {
                (W - LABEL - 90.0) * m / max
            } else {
                0.0
            };
            let colour = match k {
                _ if k.ewii() => "#d9480f",
                Kind::RawTcp => "#868e96",
                _ if k.encrypted() => "#1c7ed6",
                _ => "#74c0fc",
            };
            let _ = writeln!(
                out,
                r#"<rect x="{LABEL}" y="{y}" width="{width:.1}" height="{BAR}" fill="{colour}"/><text x="{:.1}" y="{}">{}</text>"#,
                LABEL + width + 4.0,
                y + BAR - 3.0,
                fmt(m)
            );
        }
    }
    let _ = writeln!(
        out,
        r##"<text x="8" y="{}" fill="#495057">orange: Ewii · dark blue: encrypted peers · light blue: plaintext peers · grey: no tunnel</text>"##,
        height - 6.0
    );
    out.push_str("</svg>\n");
    out
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> Context {
        Context {
            date: "2026-12-01".into(),
            machine: "test".into(),
            commit: "abc".into(),
            chart: "latest.svg".into(),
            versions: "v".into(),
            method: "m".into(),
            missing: vec!["bore (not installed)".into()],
        }
    }

    #[test]
    fn medians_ranges_and_ratios_come_from_the_samples_of_the_same_run() {
        let mut s = Samples::default();
        for v in [3.0, 1.0, 2.0] {
            s.add(Kind::RatholeNoise, Figure::BulkUp, v);
        }
        for v in [6.0, 2.0, 4.0, 100.0] {
            s.add(Kind::Ewii, Figure::BulkUp, v);
        }
        assert_eq!(s.median(Kind::RatholeNoise, Figure::BulkUp), Some(2.0));
        assert_eq!(
            s.median(Kind::Ewii, Figure::BulkUp),
            Some(5.0),
            "even count: mean of the middle two"
        );
        assert_eq!(s.median(Kind::Bore, Figure::BulkUp), None);
        let md = markdown(&s, &ctx());
        assert!(
            md.contains("| **Ewii** | 5.00 | 2.00–100 | — | 2.50 |"),
            "{md}"
        );
        assert!(
            md.contains("| rathole noise | 2.00 | 1.00–3.00 | — | 1.00 |"),
            "{md}"
        );
        assert!(md.contains("- not run: bore (not installed)"), "{md}");
    }

    #[test]
    fn the_hosts_steal_is_shown_as_context_without_ratios() {
        let mut s = Samples::default();
        s.add(Kind::RawTcp, Figure::Steal, 0.5);
        s.add(Kind::RatholeNoise, Figure::Steal, 1.0);
        s.add(Kind::Ewii, Figure::Steal, 4.0);
        let md = markdown(&s, &ctx());
        assert!(
            md.contains("(% of CPU time, context for the other figures, not a result)"),
            "{md}"
        );
        assert!(
            md.contains("| **Ewii** | 4.00 | 4.00–4.00 | — | — |"),
            "{md}"
        );
    }

    #[test]
    fn a_candidate_is_set_against_ewii_with_its_ranges() {
        let mut s = Samples::default();
        let md = markdown(&s, &ctx());
        assert!(!md.contains("The candidate against Ewii"), "{md}");
        for v in [3.0, 3.2, 3.1] {
            s.add(Kind::Ewii, Figure::BulkUp, v);
            s.add(Kind::EwiiCandidate, Figure::BulkUp, v + 1.0);
        }
        for (a, b) in [(200.0, 150.0), (180.0, 210.0), (190.0, 170.0)] {
            s.add(Kind::Ewii, Figure::RttP50, a);
            s.add(Kind::EwiiCandidate, Figure::RttP50, b);
        }
        // Lower is better: a higher value, apart from Ewii's range, is worse.
        s.add(Kind::Ewii, Figure::CpuPerGib, 4.0);
        s.add(Kind::EwiiCandidate, Figure::CpuPerGib, 5.0);
        let md = markdown(&s, &ctx());
        assert!(md.contains("| Bulk, requester → service (iperf3, one connection) (Gbit/s, higher is better) | 3.10 | 4.10 | 1.32 | apart: the candidate is better |"), "{md}");
        assert!(md.contains("| 1-byte round trip on an open connection, async client, p50 (µs, lower is better) | 190 | 170 | 0.89 | overlap |"), "{md}");
        assert!(
            md.contains("| 4.00 | 5.00 | 1.25 | apart: the candidate is worse |"),
            "{md}"
        );
    }

    #[test]
    fn a_target_is_met_or_shows_its_gap_in_the_right_direction() {
        let mut s = Samples::default();
        s.add(Kind::RatholeNoise, Figure::BulkUp, 2.0);
        s.add(Kind::Ewii, Figure::BulkUp, 3.0); // goal 2.4: met
        s.add(Kind::RatholeNoise, Figure::RttP50, 100.0);
        s.add(Kind::Ewii, Figure::RttP50, 160.0); // goal ≤ 80: 2× off
        s.add(Kind::Ewii, Figure::RssIdle, 4.0); // ≤ 5: met
        let md = markdown(&s, &ctx());
        assert!(
            md.contains("| bulk up ≥ 1.2× rathole noise | 3.00 Gbit/s | 2.40 Gbit/s | met | met in every pairing |"),
            "{md}"
        );
        assert!(md.contains("| round trip p50 ≤ 0.8× rathole noise (async client) | 160 µs | 80.0 µs | **not met**: 2.00× off | missed in every pairing |"), "{md}");
        assert!(
            md.contains(
                "| Client RSS idle ≤ 5 MB | 4.00 MB | 5.00 MB | met | met in every pairing |"
            ),
            "{md}"
        );
        assert!(
            md.contains("| bulk down ≥ 1.2× rathole noise | — | — | not measured | — |"),
            "{md}"
        );
        let svg = svg(&s, &ctx());
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    }

    /// A median's verdict inside the run's spread says so: the lock's bulk at 0.95 of the
    /// unlocked Client's by the medians, where the two ranges overlap, is "not met" and
    /// "within the spread"; CPU per GiB over the peer's by the medians but under it in some
    /// pairing, the same; the direction of "lower is better" holds.
    #[test]
    fn a_targets_verdict_within_the_spread_says_so() {
        let mut s = Samples::default();
        for (off, on) in [(6.0, 5.7), (5.5, 5.0), (6.5, 6.3)] {
            s.add(Kind::Ewii, Figure::BulkUp, off);
            s.add(Kind::EwiiLocked, Figure::BulkUp, on);
        }
        for (noise, ewii) in [(2.5, 2.6), (2.6, 2.7), (2.9, 2.45)] {
            s.add(Kind::RatholeNoise, Figure::CpuPerGib, noise);
            s.add(Kind::Ewii, Figure::CpuPerGib, ewii);
        }
        for (noise, ewii) in [(60.0, 76.0), (62.0, 77.0), (64.0, 78.0)] {
            s.add(Kind::RatholeNoise, Figure::RttBlockingP50, noise);
            s.add(Kind::Ewii, Figure::RttBlockingP50, ewii);
        }
        let md = markdown(&s, &ctx());
        assert!(
            md.contains("| eBPF lock: bulk with / without ≥ 0.97 | 0.95 ratio | 0.97 ratio | **not met**: 1.02× off | within the spread |"),
            "{md}"
        );
        assert!(
            md.contains("| CPU-s per GiB ≤ rathole noise | 2.60 CPU-s/GiB | 2.60 CPU-s/GiB | met | within the spread |"),
            "{md}"
        );
        assert!(
            md.contains("| round trip p50 ≤ 0.8× rathole noise (blocking client) | 77.0 µs | 49.6 µs | **not met**: 1.55× off | missed in every pairing |"),
            "{md}"
        );
    }
}
