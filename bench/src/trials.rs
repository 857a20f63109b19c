//! Interleaved trials: one table from several runs of every figure (scm, nginx, scm, nginx, …),
//! each value the median of its trials with their range, each ratio the median of the per-trial
//! ratios (scm and nginx of the same trial, measured minutes apart), and a verdict that refuses to
//! name a winner when the ratios' range straddles the tie band.
//!
//! Why per-trial ratios and not the ratio of medians: on a shared machine the load of the moment
//! moves both sides of one trial together, so their ratio is steadier than either figure, and its
//! range says how far a single run can be trusted.

use crate::report::Row;
pub use crate::stats::{Goal, GoalResult, GoalState, Spread, TIE_BAND, Verdict};

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

    #[test]
    fn trials_render_medians_ranges_verdicts_and_goals() {
        use crate::report::{Report, markdown};
        let t = |s: f64, n: f64| vec![row("max requests/s", Some(s), Some(n))];
        let mut ktls = row("kTLS: bulk", None, None);
        ktls.metric = "kTLS: bulk".into();
        ktls.missing = Some("not measured: kernel without TLS".into());
        let rows = merge(&[
            [t(90.0, 100.0), vec![ktls.clone()]].concat(),
            [t(130.0, 100.0), vec![ktls.clone()]].concat(),
            [t(120.0, 100.0), vec![ktls]].concat(),
        ]);
        let goals = check(
            &[Goal {
                what: "http per CPU-s / nginx".into(),
                figure: 1,
                metric: "max requests/s".into(),
                scm_system: "scm-proxy http".into(),
                peer_system: "nginx http".into(),
                bound: 2.0,
                at_least: true,
            }],
            &rows,
        );
        let r = Report {
            rows,
            goals,
            trials: 3,
            ..Report::default()
        };
        let md = markdown(&r);
        assert!(md.contains("3 interleaved trials"), "{md}");
        assert!(
            md.contains(
                "| 120 [90.0–130] (scm-proxy http) | 100 [100–100] (nginx http) | 1.20 [0.90–1.30] | spread too wide to call |"
            ),
            "{md}"
        );
        assert!(
            md.contains("| not measured: kernel without TLS (scm-proxy http) |"),
            "{md}"
        );
        assert!(
            md.contains("| http per CPU-s / nginx | ≥ 2.00 | 1.20 [0.90–1.30] | missed |"),
            "{md}"
        );
    }
}
