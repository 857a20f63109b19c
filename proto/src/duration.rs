//! The one parser of every duration flag (`--session-idle-timeout 15m`, `--handshake-timeout 10s`,
//! ...): a whole number and a unit, bounded so that no value can overflow the clock arithmetic it
//! feeds (`Instant + Duration` panics on overflow).
//!
//! Not humantime: its grammar adds weeks, months and years (of no fixed length) and refuses a bare
//! number, while the flags have always taken a bare number as seconds and refused `1w`.

use std::time::Duration;

/// The longest duration any flag accepts: 3650 days (about ten years), far beyond any sensible
/// timeout or interval, and far below where clock arithmetic could overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(3650 * 86_400);

/// Parses `500ms`, `30s`, `15m`, `12h`, `1d`, or a bare number of seconds; at most
/// [`MAX_DURATION`]. The error (a `String`, as clap's `value_parser` wants) says what was wrong.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (num, unit) = text.split_at(split);
    let ms_per_unit: u64 = match unit {
        "ms" => 1,
        "" | "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => {
            return Err(format!(
                "invalid duration unit in {text:?}: use ms, s, m, h or d (e.g. 30s, 15m, 12h)"
            ));
        }
    };
    let too_long = || {
        format!(
            "duration {text:?} is too long: at most {}d",
            MAX_DURATION.as_secs() / 86_400
        )
    };
    if num.is_empty() {
        return Err(format!(
            "invalid duration {text:?}: expected a number and a unit, e.g. 30s, 15m, 12h"
        ));
    }
    // Only digits remain, so a parse failure is a number past u64.
    let n: u64 = num.parse().map_err(|_| too_long())?;
    let ms = n.checked_mul(ms_per_unit).ok_or_else(too_long)?;
    let d = Duration::from_millis(ms);
    if d > MAX_DURATION {
        return Err(too_long());
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_and_bare_seconds() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("5"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration(" 30s "), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("12h"), Ok(Duration::from_secs(43_200)));
        assert_eq!(parse_duration("1d"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("3650d"), Ok(MAX_DURATION));
    }

    #[test]
    fn bad_input_is_a_clear_error() {
        for bad in ["", "m", "5x", "1w", "-1s", "1.5h", "s5"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
        assert!(
            parse_duration("1w")
                .unwrap_err()
                .contains("use ms, s, m, h or d")
        );
    }

    /// Huge values are refused with a message, never a panic or a wrapped small value.
    #[test]
    fn huge_values_are_bounded() {
        for huge in [
            "99999999999999999h",
            "99999999999999999999h",
            "18446744073709551615ms",
            "18446744073709551616",
            "3651d",
            "5000000000000000s",
        ] {
            let e = parse_duration(huge).unwrap_err();
            assert!(e.contains("too long"), "{huge}: {e}");
        }
    }
}
