//! The arithmetic of trials: a set's median and range, the verdict a set of ratios allows,
//! and the goals a figure is held to.

use serde::{Deserialize, Serialize};

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
