//! Parsing of human-written sizes (`256M`, `1.5GiB`) and durations (`30s`, `1m30s`, `250ms`).

use std::time::Duration;

/// A malformed size or duration, with the text that was given.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UnitError {
    #[error("invalid size '{0}': use a number with an optional unit K, M, G or T (e.g. 256M, 1.5G)")]
    Size(String),
    #[error("invalid duration '{0}': use a number with a unit ms, s, m or h (e.g. 30s, 1m30s, 250ms)")]
    Duration(String),
}

/// Parses a byte size. Units are binary (K = 1024); `B`, `iB` suffixes and lower case are accepted.
pub fn parse_size(text: &str) -> Result<u64, UnitError> {
    let err = || UnitError::Size(text.to_string());
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    if number.is_empty() {
        return Err(err());
    }
    let multiplier: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return Err(err()),
    };
    let value: f64 = number.parse().map_err(|_| err())?;
    let bytes = value * multiplier as f64;
    if !bytes.is_finite() || bytes < 1.0 || bytes > u64::MAX as f64 {
        return Err(err());
    }
    Ok(bytes as u64)
}

/// Parses a duration made of one or more `<number><unit>` parts; a bare number means seconds.
pub fn parse_duration(text: &str) -> Result<Duration, UnitError> {
    let err = || UnitError::Duration(text.to_string());
    let t = text.trim();
    if t.is_empty() {
        return Err(err());
    }
    if let Ok(secs) = t.parse::<f64>() {
        return Duration::try_from_secs_f64(secs)
            .ok()
            .filter(|d| !d.is_zero())
            .ok_or_else(err);
    }
    let mut total = Duration::ZERO;
    let mut rest = t;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (number, tail) = rest.split_at(digits);
        let unit_len = tail.find(|c: char| c.is_ascii_digit()).unwrap_or(tail.len());
        let (unit, next) = tail.split_at(unit_len);
        let value: f64 = number.parse().map_err(|_| err())?;
        let seconds = match unit {
            "ms" => value / 1000.0,
            "s" => value,
            "m" => value * 60.0,
            "h" => value * 3600.0,
            _ => return Err(err()),
        };
        total += Duration::try_from_secs_f64(seconds).map_err(|_| err())?;
        rest = next;
    }
    if total.is_zero() {
        return Err(err());
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_accept_common_spellings() {
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("1.5g"), Ok(3 << 29));
        assert_eq!(parse_size("64KiB"), Ok(64 << 10));
        assert_eq!(parse_size("4096"), Ok(4096));
    }

    #[test]
    fn sizes_reject_garbage_with_the_offending_text() {
        for bad in ["12XB", "", "M", "-5M", "0", "1..2M", "1e400G"] {
            let e = parse_size(bad).unwrap_err();
            assert_eq!(e, UnitError::Size(bad.to_string()), "{bad}");
        }
        assert!(parse_size("12XB").unwrap_err().to_string().contains("'12XB'"));
    }

    #[test]
    fn durations_accept_compound_forms() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("0.5"), Ok(Duration::from_millis(500)));
    }

    #[test]
    fn durations_reject_garbage_and_zero() {
        for bad in ["", "s", "10x", "0s", "0", "-1s", "1d"] {
            assert_eq!(
                parse_duration(bad),
                Err(UnitError::Duration(bad.to_string())),
                "{bad}"
            );
        }
    }
}
