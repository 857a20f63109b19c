//! The results: rows of figures for scm and its nginx peer with their ratio, the latency curves,
//! the machine's ceilings and the versions, rendered as markdown and serialised as JSON.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::stats::{GoalResult, Spread, TIE_BAND, Verdict};

/// Where and with what the figures were measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Meta {
    /// UTC time of the run.
    pub date: String,
    /// `--quick` or full.
    pub quick: bool,
    /// CPU model from /proc/cpuinfo.
    pub cpu_model: String,
    /// CPUs online.
    pub cpus: usize,
    /// `uname -r`.
    pub kernel: String,
    /// `nginx -v`.
    pub nginx: String,
    /// `openssl version`.
    pub openssl: String,
    /// `rustc -V`.
    pub rustc: String,
    /// `git rev-parse HEAD` of scm (with `-dirty` when the tree had changes).
    pub scm_rev: String,
    /// Which CPU the proxy under test was pinned to, and the others' placement.
    pub placement: String,
    /// Things the reader must know (a system that could not be measured, and why).
    pub notes: Vec<String>,
}

/// One figure for scm and for its nginx peer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    /// Figure number of the issue (1..=4).
    pub figure: u8,
    /// What is measured.
    pub metric: String,
    /// Unit of the values.
    pub unit: String,
    /// The scm system measured (e.g. `scm-proxy http`).
    pub scm_system: String,
    /// The nginx system measured.
    pub nginx_system: String,
    /// scm's value, if it was measured.
    pub scm: Option<f64>,
    /// nginx's value, if it was measured.
    pub nginx: Option<f64>,
    /// Whether a larger value is better (throughput) or worse (latency, memory).
    pub higher_is_better: bool,
    /// scm's value in each trial that measured it (`scm` is their median).
    #[serde(default)]
    pub scm_trials: Vec<f64>,
    /// The peer's value in each trial that measured it (`nginx` is their median).
    #[serde(default)]
    pub nginx_trials: Vec<f64>,
    /// scm / peer of each trial that measured both.
    #[serde(default)]
    pub ratio_trials: Vec<f64>,
    /// Why the row was not measured (e.g. "not measured: kernel without TLS"), shown in place
    /// of a missing value.
    #[serde(default)]
    pub missing: Option<String>,
}

impl Row {
    /// A row of one measurement (no trials merged yet).
    pub fn single(
        figure: u8,
        metric: String,
        unit: &str,
        systems: (&str, &str),
        values: (Option<f64>, Option<f64>),
        higher_is_better: bool,
    ) -> Row {
        Row {
            figure,
            metric,
            unit: unit.into(),
            scm_system: systems.0.into(),
            nginx_system: systems.1.into(),
            scm: values.0,
            nginx: values.1,
            higher_is_better,
            scm_trials: Vec::new(),
            nginx_trials: Vec::new(),
            ratio_trials: Vec::new(),
            missing: None,
        }
    }

    /// The trials' ratios, where several trials measured both sides.
    pub fn ratio_spread(&self) -> Option<Spread> {
        Spread::of(&self.ratio_trials).filter(|s| s.n >= 2)
    }

    /// scm / nginx: the median of the trials' ratios, or of the one measurement when there are
    /// no trials, when both exist and nginx's is not zero.
    pub fn ratio(&self) -> Option<f64> {
        if let Some(s) = Spread::of(&self.ratio_trials) {
            return Some(s.median);
        }
        match (self.scm, self.nginx) {
            (Some(s), Some(n)) if n != 0.0 => Some(s / n),
            _ => None,
        }
    }

    /// Which side wins this row, if both were measured (within 2 %: a tie). With two or more
    /// trials, only when every trial's ratio agrees; otherwise the spread is too wide to call.
    pub fn better(&self) -> &'static str {
        if let Some(s) = self.ratio_spread() {
            return Verdict::of(&s, self.higher_is_better).word();
        }
        match self.ratio() {
            None => "",
            Some(r) if (r - 1.0).abs() <= TIE_BAND => "tie",
            Some(r) if (r > 1.0) == self.higher_is_better => "scm",
            Some(_) => "nginx",
        }
    }
}

/// One point of a latency-versus-offered-rate curve.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CurvePoint {
    /// Requests/s offered.
    pub offered: f64,
    /// Requests/s answered.
    pub achieved: f64,
    /// Median latency, µs.
    pub p50_us: u64,
    /// 99th percentile, µs.
    pub p99_us: u64,
    /// Failed requests.
    pub errors: u64,
}

/// The curve of one system.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Curve {
    /// System name.
    pub system: String,
    /// Points in order of offered rate.
    pub points: Vec<CurvePoint>,
}

/// A ceiling of the machine, for context.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Ceiling {
    /// What was measured.
    pub what: String,
    /// Value.
    pub value: f64,
    /// Unit.
    pub unit: String,
}

/// Everything one run produced.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Report {
    /// Versions and machine.
    pub meta: Meta,
    /// The side-by-side figures.
    pub rows: Vec<Row>,
    /// Latency curves (figure 1).
    pub curves: Vec<Curve>,
    /// Machine ceilings (figure 5).
    pub ceilings: Vec<Ceiling>,
    /// Cross-checks with other tools (wrk, h2load): what, our value, theirs.
    pub cross_checks: Vec<CrossCheck>,
    /// How many interleaved trials each figure had (scm, nginx, scm, nginx, …).
    #[serde(default)]
    pub trials: usize,
    /// The data-plane goals, checked against the trials.
    #[serde(default)]
    pub goals: Vec<GoalResult>,
}

/// A figure measured by scm-bench and by an independent tool.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CrossCheck {
    /// What was measured.
    pub what: String,
    /// scm-bench's value.
    pub ours: f64,
    /// The other tool's value.
    pub theirs: f64,
    /// The other tool and how it was run.
    pub tool: String,
}

/// A number with as many digits as a reader needs.
pub fn fmt_num(v: f64) -> String {
    let a = v.abs();
    if a >= 10_000.0 {
        // Thousands separated by a thin space for reading, not parsing.
        let s = format!("{:.0}", v);
        let (sign, digits) = s.split_at(usize::from(s.starts_with('-')));
        let mut out = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i) % 3 == 0 {
                out.push(' ');
            }
            out.push(c);
        }
        format!("{sign}{out}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// A value: the median with the trials' range when there were several, else the value.
fn cell(v: Option<f64>, trials: &[f64], missing: Option<&str>) -> String {
    match (v, Spread::of(trials)) {
        (Some(_), Some(s)) if s.n >= 2 => format!(
            "{} [{}–{}]",
            fmt_num(s.median),
            fmt_num(s.min),
            fmt_num(s.max)
        ),
        (Some(v), _) => fmt_num(v),
        (None, _) => missing.unwrap_or("not run").to_owned(),
    }
}

/// A ratio: the median of the trials' ratios with their range.
fn ratio_cell(row: &Row) -> String {
    match (row.ratio(), row.ratio_spread()) {
        (Some(_), Some(s)) => format!("{:.2} [{:.2}–{:.2}]", s.median, s.min, s.max),
        (Some(r), None) => format!("{r:.2}"),
        (None, _) => String::new(),
    }
}

/// The figure of the steering overhead: the tunnel behind XDP steering against the same tunnel
/// without it (not against nginx), so it has its own table.
pub const STEERING_FIGURE: u8 = 6;

/// The report as markdown: versions, the side-by-side table, ceilings, cross-checks, notes.
pub fn markdown(r: &Report) -> String {
    let m = &r.meta;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# scm vs nginx ({})\n",
        if m.quick { "quick run" } else { "full run" }
    );
    let _ = writeln!(s, "| | |\n|---|---|");
    for (k, v) in [
        ("date", m.date.as_str()),
        ("cpu", m.cpu_model.as_str()),
        ("kernel", m.kernel.as_str()),
        ("nginx", m.nginx.as_str()),
        ("openssl", m.openssl.as_str()),
        ("rustc", m.rustc.as_str()),
        ("scm", m.scm_rev.as_str()),
        ("placement", m.placement.as_str()),
    ] {
        let _ = writeln!(s, "| {k} | {} |", v.replace('|', "/"));
    }
    let _ = writeln!(s, "| cpus | {} |", m.cpus);
    if r.trials >= 2 {
        let _ = writeln!(
            s,
            "\n{} interleaved trials (nginx, scm, nginx, scm, …): each value is the median \
             [smallest–largest trial]; each ratio is the median [range] of the trials' own \
             ratios. A winner is named only when every trial's ratio agrees (a tie within {:.0}%).",
            r.trials,
            TIE_BAND * 100.0
        );
    }
    let _ = writeln!(
        s,
        "\n| # | figure | unit | scm | nginx | scm/nginx | better |\n|---|---|---|---|---|---|---|"
    );
    for row in r.rows.iter().filter(|r| r.figure != STEERING_FIGURE) {
        table_row(&mut s, row);
    }
    let steering: Vec<&Row> = r
        .rows
        .iter()
        .filter(|r| r.figure == STEERING_FIGURE)
        .collect();
    if !steering.is_empty() {
        let _ = writeln!(
            s,
            "\n| {STEERING_FIGURE}: steering overhead | unit | with XDP steering | without | with/without | better |\n|---|---|---|---|---|---|"
        );
        for row in steering {
            let better = match row.better() {
                "scm" => "with",
                "nginx" => "without",
                other => other,
            };
            let (scm, peer) = system_cells(row);
            let _ = writeln!(
                s,
                "| {} | {} | {scm} | {peer} | {} | {better} |",
                row.metric,
                row.unit,
                ratio_cell(row),
            );
        }
    }
    if !r.goals.is_empty() {
        let _ = writeln!(
            s,
            "\n| goal | bound | measured: median [range] | state |\n|---|---|---|---|"
        );
        for g in &r.goals {
            let bound = format!(
                "{} {}",
                if g.goal.at_least { "≥" } else { "≤" },
                fmt_num(g.goal.bound)
            );
            let measured = g.measured.map_or_else(String::new, |m| {
                format!(
                    "{} [{}–{}]",
                    fmt_num(m.median),
                    fmt_num(m.min),
                    fmt_num(m.max)
                )
            });
            let _ = writeln!(
                s,
                "| {} | {bound} | {measured} | {} |",
                g.goal.what,
                g.state.word()
            );
        }
    }
    if !r.ceilings.is_empty() {
        let _ = writeln!(s, "\n| 5: machine ceiling | value | unit |\n|---|---|---|");
        for c in &r.ceilings {
            let _ = writeln!(s, "| {} | {} | {} |", c.what, fmt_num(c.value), c.unit);
        }
    }
    if !r.cross_checks.is_empty() {
        let _ = writeln!(
            s,
            "\n| cross-check | scm-bench | other tool | tool |\n|---|---|---|---|"
        );
        for c in &r.cross_checks {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} |",
                c.what,
                fmt_num(c.ours),
                fmt_num(c.theirs),
                c.tool
            );
        }
    }
    if !m.notes.is_empty() {
        let _ = writeln!(s, "\nNotes:");
        for n in &m.notes {
            let _ = writeln!(s, "- {n}");
        }
    }
    s
}

/// The row's two value cells, each with the system that was measured.
fn system_cells(row: &Row) -> (String, String) {
    let missing = row.missing.as_deref();
    (
        format!(
            "{} ({})",
            cell(row.scm, &row.scm_trials, missing),
            row.scm_system
        ),
        format!(
            "{} ({})",
            cell(row.nginx, &row.nginx_trials, missing),
            row.nginx_system
        ),
    )
}

/// One line of the side-by-side table.
fn table_row(s: &mut String, row: &Row) {
    let (scm, nginx) = system_cells(row);
    let _ = writeln!(
        s,
        "| {} | {} | {} | {scm} | {nginx} | {} | {} |",
        row.figure,
        row.metric,
        row.unit,
        ratio_cell(row),
        row.better(),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(scm: Option<f64>, nginx: Option<f64>, higher: bool) -> Row {
        Row {
            figure: 1,
            metric: "max requests/s".into(),
            unit: "req/s".into(),
            scm_system: "scm-proxy http".into(),
            nginx_system: "nginx http".into(),
            scm,
            nginx,
            higher_is_better: higher,
            scm_trials: Vec::new(),
            nginx_trials: Vec::new(),
            ratio_trials: Vec::new(),
            missing: None,
        }
    }

    #[test]
    fn ratios_and_winners() {
        assert_eq!(row(Some(50.0), Some(100.0), true).ratio(), Some(0.5));
        assert_eq!(row(Some(50.0), Some(100.0), true).better(), "nginx");
        assert_eq!(row(Some(50.0), Some(100.0), false).better(), "scm");
        assert_eq!(row(Some(101.0), Some(100.0), true).better(), "tie");
        assert_eq!(row(None, Some(100.0), true).ratio(), None);
        assert_eq!(row(Some(1.0), Some(0.0), true).ratio(), None);
        assert_eq!(row(None, Some(1.0), true).better(), "");
    }

    #[test]
    fn numbers() {
        assert_eq!(fmt_num(1_234_567.4), "1 234 567");
        assert_eq!(fmt_num(-12_345.0), "-12 345");
        assert_eq!(fmt_num(512.4), "512");
        assert_eq!(fmt_num(12.345), "12.3");
        assert_eq!(fmt_num(0.1234), "0.12");
    }

    #[test]
    fn table_has_every_row_and_marks_missing_values() {
        let r = Report {
            meta: Meta {
                quick: true,
                notes: vec!["scm-proxy not built".into()],
                ..Meta::default()
            },
            rows: vec![
                row(Some(9_000.0), Some(12_000.0), true),
                row(None, Some(3.0), false),
            ],
            ceilings: vec![Ceiling {
                what: "AES-128-GCM 16 KiB".into(),
                value: 4_000.0,
                unit: "MB/s".into(),
            }],
            ..Report::default()
        };
        let md = markdown(&r);
        assert!(md.starts_with("# scm vs nginx (quick run)"));
        assert!(md.contains("| 1 | max requests/s | req/s | 9000 (scm-proxy http) | 12 000 (nginx http) | 0.75 | nginx |"), "{md}");
        assert!(
            md.contains("| not run (scm-proxy http) | 3.00 (nginx http) |  |  |"),
            "{md}"
        );
        assert!(md.contains("| AES-128-GCM 16 KiB | 4000 | MB/s |"));
        assert!(md.contains("- scm-proxy not built"));
        let json = serde_json::to_string(&r).unwrap();
        let back: Report = serde_json::from_str(&json).unwrap();
        assert_eq!(back.rows.len(), 2);
    }
}
