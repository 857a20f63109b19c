//! Interleaved trials: one table from several runs of every figure (scm, nginx, scm, nginx, …),
//! each value the median of its trials with their range, each ratio the median of the per-trial
//! ratios (scm and nginx of the same trial, measured minutes apart), and a verdict that refuses to
//! name a winner when the ratios' range straddles the tie band.
//!
//! Why per-trial ratios and not the ratio of medians: on a shared machine the load of the moment
//! moves both sides of one trial together, so their ratio is steadier than either figure, and its
//! range says how far a single run can be trusted.

use serde::{Deserialize, Serialize};

use crate::report::Row;

/// Within this fraction of 1.0 a ratio is a tie.
pub const TIE_BAND: f64 = 0.02;

/// The median and range of a set of trials.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Spread {
    /// Median (the mean of the middle two for an even count).
    pub median: f64,
    /// Smallest trial.
    pub min: f64,
    /// Largest trial.
    pub max: f64,
    /// How many trials.
    pub n: usize,
}

impl Spread {
    /// The spread of `values`, `None` when there are none. NaNs are ignored.
    pub fn of(values: &[f64]) -> Option<Spread> {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Spread {
            median,
            min: v[0],
            max: v[n - 1],
            n,
        })
    }

    /// (max − min) / median, as a fraction: how far apart the trials were.
    pub fn relative_width(&self) -> f64 {
        if self.median == 0.0 {
            0.0
        } else {
            (self.max - self.min) / self.median.abs()
        }
    }
}

/// What the trials of one ratio say about the winner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Every trial's ratio is on scm's side of the tie band.
    Scm,
    /// Every trial's ratio is on nginx's side.
    Nginx,
    /// Every trial's ratio is inside the tie band.
    Tie,
    /// The trials' ratios fall on both sides: the spread is too wide to call a winner.
    TooWide,
}

impl Verdict {
    /// The word in the table.
    pub fn word(self) -> &'static str {
        match self {
            Verdict::Scm => "scm",
            Verdict::Nginx => "nginx",
            Verdict::Tie => "tie",
            Verdict::TooWide => "spread too wide to call",
        }
    }

    /// The verdict of ratios (scm / peer) in `s`, for a figure where larger is better or not.
    pub fn of(s: &Spread, higher_is_better: bool) -> Verdict {
        let (lo, hi) = (s.min, s.max);
        let scm_side = |r: f64| {
            if higher_is_better {
                r > 1.0 + TIE_BAND
            } else {
                r < 1.0 - TIE_BAND
            }
        };
        let peer_side = |r: f64| {
            if higher_is_better {
                r < 1.0 - TIE_BAND
            } else {
                r > 1.0 + TIE_BAND
            }
        };
        if scm_side(lo) && scm_side(hi) {
            Verdict::Scm
        } else if peer_side(lo) && peer_side(hi) {
            Verdict::Nginx
        } else if (1.0 - TIE_BAND..=1.0 + TIE_BAND).contains(&lo)
            && (1.0 - TIE_BAND..=1.0 + TIE_BAND).contains(&hi)
        {
            Verdict::Tie
        } else {
            Verdict::TooWide
        }
    }
}

fn key(r: &Row) -> (u8, &str, &str, &str) {
    (
        r.figure,
        r.metric.as_str(),
        r.scm_system.as_str(),
        r.nginx_system.as_str(),
    )
}

/// Merges the rows of each trial into one row per figure: the trials' values in `scm_trials`,
/// `nginx_trials` and (where both sides of a trial were measured) `ratio_trials`, and their
/// medians in `scm` and `nginx`. Rows keep the order in which they first appear.
pub fn merge(trials: &[Vec<Row>]) -> Vec<Row> {
    let mut out: Vec<Row> = Vec::new();
    for rows in trials {
        for r in rows {
            let i = match out.iter().position(|o| key(o) == key(r)) {
                Some(i) => i,
                None => {
                    out.push(Row {
                        scm: None,
                        nginx: None,
                        scm_trials: Vec::new(),
                        nginx_trials: Vec::new(),
                        ratio_trials: Vec::new(),
                        ..r.clone()
                    });
                    out.len() - 1
                }
            };
            let o = &mut out[i];
            o.scm_trials.extend(r.scm);
            o.nginx_trials.extend(r.nginx);
            if let (Some(s), Some(n)) = (r.scm, r.nginx)
                && n != 0.0
            {
                o.ratio_trials.push(s / n);
            }
            if o.missing.is_none() {
                o.missing.clone_from(&r.missing);
            }
        }
    }
    for o in &mut out {
        o.scm = Spread::of(&o.scm_trials).map(|s| s.median);
        o.nginx = Spread::of(&o.nginx_trials).map(|s| s.median);
    }
    out
}

/// A goal of the data-plane issue, checked against the merged rows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Goal {
    /// The goal in words.
    pub what: String,
    /// The row it reads: figure and metric (a prefix), scm system, peer system.
    pub figure: u8,
    /// Start of the metric's text.
    pub metric: String,
    /// The scm system.
    pub scm_system: String,
    /// The peer system; empty for a goal on scm's own value.
    pub peer_system: String,
    /// The bound: on the ratio scm/peer, or on scm's value when `peer_system` is empty.
    pub bound: f64,
    /// Whether the figure must be at least (`true`) or at most (`false`) the bound.
    pub at_least: bool,
}

/// Where the trials put a goal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GoalState {
    /// Every trial meets it.
    Met,
    /// No trial meets it.
    Missed,
    /// Some trials meet it and some do not.
    Undecided,
    /// The row was not measured.
    NotMeasured,
}

impl GoalState {
    /// The word in the table.
    pub fn word(self) -> &'static str {
        match self {
            GoalState::Met => "met",
            GoalState::Missed => "missed",
            GoalState::Undecided => "undecided (trials on both sides)",
            GoalState::NotMeasured => "not measured",
        }
    }
}

/// A goal with what the trials gave.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GoalResult {
    /// The goal.
    pub goal: Goal,
    /// The trials of the checked figure (a ratio, or scm's own value).
    pub measured: Option<Spread>,
    /// Where that puts it.
    pub state: GoalState,
}

/// Checks each goal against `rows` (as [`merge`] made them).
pub fn check(goals: &[Goal], rows: &[Row]) -> Vec<GoalResult> {
    goals
        .iter()
        .map(|g| {
            let row = rows.iter().find(|r| {
                r.figure == g.figure
                    && r.metric.starts_with(&g.metric)
                    && r.scm_system == g.scm_system
                    && (g.peer_system.is_empty() || r.nginx_system == g.peer_system)
            });
            let values: Vec<f64> = match row {
                Some(r) if g.peer_system.is_empty() => r.scm_trials.clone(),
                Some(r) => r.ratio_trials.clone(),
                None => Vec::new(),
            };
            let measured = Spread::of(&values);
            let meets = |v: f64| {
                if g.at_least {
                    v >= g.bound
                } else {
                    v <= g.bound
                }
            };
            let state = match measured {
                None => GoalState::NotMeasured,
                Some(s) if meets(s.min) && meets(s.max) => GoalState::Met,
                Some(s) if !meets(s.min) && !meets(s.max) => GoalState::Missed,
                Some(_) => GoalState::Undecided,
            };
            GoalResult {
                goal: g.clone(),
                measured,
                state,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(metric: &str, scm: Option<f64>, nginx: Option<f64>) -> Row {
        Row {
            figure: 1,
            metric: metric.into(),
            unit: "req/s".into(),
            scm_system: "scm-proxy http".into(),
            nginx_system: "nginx http".into(),
            scm,
            nginx,
            higher_is_better: true,
            scm_trials: Vec::new(),
            nginx_trials: Vec::new(),
            ratio_trials: Vec::new(),
            missing: None,
        }
    }

    #[test]
    fn medians_and_ranges() {
        let s = Spread::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.n), (2.0, 1.0, 3.0, 3));
        let s = Spread::of(&[4.0, 1.0, 2.0, 3.0]).unwrap();
        assert_eq!(s.median, 2.5);
        assert!((s.relative_width() - 1.2).abs() < 1e-9);
        assert!(Spread::of(&[]).is_none());
        assert!(Spread::of(&[f64::NAN]).is_none());
    }

    #[test]
    fn a_winner_only_when_every_trial_agrees() {
        let sp = |v: &[f64]| Spread::of(v).unwrap();
        assert_eq!(Verdict::of(&sp(&[1.2, 1.5, 1.3]), true), Verdict::Scm);
        assert_eq!(Verdict::of(&sp(&[1.2, 1.5, 1.3]), false), Verdict::Nginx);
        assert_eq!(Verdict::of(&sp(&[0.9, 1.2, 0.71]), true), Verdict::TooWide);
        assert_eq!(Verdict::of(&sp(&[0.99, 1.01]), true), Verdict::Tie);
        assert_eq!(Verdict::of(&sp(&[1.01, 1.10]), true), Verdict::TooWide);
        assert_eq!(Verdict::of(&sp(&[0.5, 0.51, 0.50]), true), Verdict::Nginx);
    }

    #[test]
    fn trials_merge_by_figure_with_paired_ratios() {
        let t1 = vec![
            row("max", Some(100.0), Some(50.0)),
            row("p99", None, Some(2.0)),
        ];
        let t2 = vec![
            row("max", Some(90.0), Some(60.0)),
            row("p99", Some(1.0), Some(2.0)),
        ];
        let t3 = vec![row("max", Some(120.0), Some(40.0))];
        let m = merge(&[t1, t2, t3]);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].scm_trials, vec![100.0, 90.0, 120.0]);
        assert_eq!(m[0].scm, Some(100.0));
        assert_eq!(m[0].nginx, Some(50.0));
        assert_eq!(m[0].ratio_trials, vec![2.0, 1.5, 3.0]);
        // The second trial's ratio only: the first had no scm value.
        assert_eq!(m[1].ratio_trials, vec![0.5]);
        assert_eq!(m[1].nginx_trials, vec![2.0, 2.0]);
    }

    #[test]
    fn goals_are_met_missed_or_undecided() {
        let rows = merge(&[
            vec![row(
                "requests per proxy CPU-second",
                Some(210.0),
                Some(100.0),
            )],
            vec![row(
                "requests per proxy CPU-second",
                Some(190.0),
                Some(100.0),
            )],
        ]);
        let goal = |bound: f64, at_least: bool, peer: &str| Goal {
            what: "x".into(),
            figure: 1,
            metric: "requests per proxy".into(),
            scm_system: "scm-proxy http".into(),
            peer_system: peer.into(),
            bound,
            at_least,
        };
        let r = check(
            &[
                goal(2.0, true, "nginx http"),
                goal(1.5, true, "nginx http"),
                goal(3.0, true, "nginx http"),
                goal(250.0, false, ""),
                goal(1.0, true, "nginx stream"),
            ],
            &rows,
        );
        let states: Vec<GoalState> = r.iter().map(|g| g.state).collect();
        assert_eq!(
            states,
            vec![
                GoalState::Undecided,
                GoalState::Met,
                GoalState::Missed,
                GoalState::Met,
                GoalState::NotMeasured
            ]
        );
        assert_eq!(r[0].measured.unwrap().median, 2.0);
    }
}
