//! Checked scalars for policy fields.
//!
//! serde_yaml_ng knows the position of the scalar being deserialised only while its visitor runs, so every
//! per-value rule (port range, duration, class, syscall name) is checked inside a visitor: the error then
//! reads `network.allowed_egress_ports[1]: ...` at the line and column of that very item. The same check
//! functions run again in [`crate::Policy::validate`] for policies built in code.

use std::fmt;
use std::time::Duration;

use serde::de::{self, DeserializeSeed, SeqAccess, Visitor};
use serde::{Deserializer, Serializer};

use crate::class::{class_names, resource_class};
use crate::syscalls::is_known_syscall;

/// Most CPU cores a policy maximum may name.
pub const MAX_CORES: f64 = 4096.0;
/// Most MiB a policy maximum may name (1 PiB).
pub const MAX_MIB: u64 = 1 << 30;
/// Longest `max_duration` or `default_timeout` (a week, the server's own limit).
pub const MAX_DURATION: Duration = Duration::from_secs(7 * 86_400);

/// One scalar as the document wrote it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Scalar<'a> {
    Str(&'a str),
    Int(i128),
    Float(f64),
    Bool(bool),
}

impl fmt::Display for Scalar<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scalar::Str(s) => write!(f, "'{s}'"),
            Scalar::Int(i) => write!(f, "{i}"),
            Scalar::Float(x) => write!(f, "{x}"),
            Scalar::Bool(b) => write!(f, "{b}"),
        }
    }
}

type CheckFn<T> = fn(Scalar<'_>) -> Result<T, String>;

/// A scalar checked by `check`; `expecting` completes "expected ..." in serde's own type errors.
struct Checked<T> {
    expecting: &'static str,
    check: CheckFn<T>,
}

impl<T> Clone for Checked<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for Checked<T> {}

impl<T> Visitor<'_> for Checked<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.expecting)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        (self.check)(Scalar::Str(v)).map_err(E::custom)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
        (self.check)(Scalar::Int(v.into())).map_err(E::custom)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<T, E> {
        (self.check)(Scalar::Int(v.into())).map_err(E::custom)
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<T, E> {
        (self.check)(Scalar::Float(v)).map_err(E::custom)
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<T, E> {
        (self.check)(Scalar::Bool(v)).map_err(E::custom)
    }
}

impl<'de, T> DeserializeSeed<'de> for Checked<T> {
    type Value = T;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<T, D::Error> {
        deserializer.deserialize_any(self)
    }
}

/// A sequence of checked scalars.
struct SeqOf<T>(Checked<T>);

impl<'de, T> Visitor<'de> for SeqOf<T> {
    type Value = Vec<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a list of {}", self.0.expecting)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(item) = seq.next_element_seed(self.0)? {
            items.push(item);
        }
        Ok(items)
    }
}

fn one<'de, D: Deserializer<'de>, T>(
    d: D,
    expecting: &'static str,
    check: CheckFn<T>,
) -> Result<Option<T>, D::Error> {
    Checked { expecting, check }.deserialize(d).map(Some)
}

fn many<'de, D: Deserializer<'de>, T>(
    d: D,
    expecting: &'static str,
    check: CheckFn<T>,
) -> Result<Option<Vec<T>>, D::Error> {
    d.deserialize_seq(SeqOf(Checked { expecting, check })).map(Some)
}

// Field deserialisers (`#[serde(default, deserialize_with = "...")]`).

pub(crate) fn cores<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    one(d, "a number of CPU cores", check_cores)
}

pub(crate) fn mib<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    one(d, "a whole number of MiB", check_mib)
}

pub(crate) fn count<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    one(d, "a whole number", check_count)
}

pub(crate) fn kbps<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    one(d, "a whole number of kbit/s", check_kbps)
}

pub(crate) fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    one(d, "a duration such as 30s, 10m or 1h30m", check_duration)
}

pub(crate) fn class<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    one(d, "a resource class", check_class)
}

pub(crate) fn classes<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    many(d, "resource classes", check_class)
}

pub(crate) fn ports<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u16>>, D::Error> {
    many(d, "ports", check_port)
}

pub(crate) fn syscalls<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    many(d, "system call names", check_syscall)
}

// The checks, shared with `Policy::validate`.

pub(crate) fn check_cores(s: Scalar<'_>) -> Result<f64, String> {
    let cores = match s {
        Scalar::Int(i) => i as f64,
        Scalar::Float(x) => x,
        _ => return Err(format!("expected a number of CPU cores, found {s}")),
    };
    if cores > 0.0 && cores <= MAX_CORES {
        Ok(cores)
    } else {
        Err(format!(
            "{s} CPU cores is out of range: use more than 0 and at most {MAX_CORES}"
        ))
    }
}

pub(crate) fn check_mib(s: Scalar<'_>) -> Result<u64, String> {
    match s {
        Scalar::Int(i) if (1..=MAX_MIB as i128).contains(&i) => Ok(i as u64),
        Scalar::Int(_) => Err(format!("{s} MiB is out of range: use 1-{MAX_MIB}")),
        _ => Err(format!("expected a whole number of MiB, found {s}")),
    }
}

pub(crate) fn check_count(s: Scalar<'_>) -> Result<u32, String> {
    match s {
        Scalar::Int(i) => u32::try_from(i).map_err(|_| format!("{s} is out of range: use 0-{}", u32::MAX)),
        _ => Err(format!("expected a whole number, found {s}")),
    }
}

pub(crate) fn check_kbps(s: Scalar<'_>) -> Result<u64, String> {
    match s {
        Scalar::Int(i) => {
            u64::try_from(i).map_err(|_| format!("{s} is out of range: use 0 (no limit) or more"))
        }
        _ => Err(format!("expected a whole number of kbit/s, found {s}")),
    }
}

/// Keeps the text as written (a bare number of seconds becomes its decimal text).
pub(crate) fn check_duration(s: Scalar<'_>) -> Result<String, String> {
    let text = match s {
        Scalar::Str(t) => t.to_string(),
        Scalar::Int(i) => i.to_string(),
        Scalar::Float(x) => x.to_string(),
        Scalar::Bool(_) => {
            return Err(format!(
                "expected a duration such as 30s, 10m or 1h30m, found {s}"
            ))
        }
    };
    parse_duration(&text)?;
    Ok(text)
}

/// A validated duration: positive, at most [`MAX_DURATION`].
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let d = tartarus_runtime::units::parse_duration(text).map_err(|e| e.to_string())?;
    if d > MAX_DURATION {
        return Err(format!("duration '{text}' is longer than 7 days"));
    }
    Ok(d)
}

pub(crate) fn check_class(s: Scalar<'_>) -> Result<String, String> {
    match s {
        Scalar::Str(name) if resource_class(name).is_some() => Ok(name.to_string()),
        _ => Err(format!(
            "unknown resource class {s}: use one of {}",
            class_names()
        )),
    }
}

pub(crate) fn check_port(s: Scalar<'_>) -> Result<u16, String> {
    match s {
        Scalar::Int(i) if (1..=65535).contains(&i) => Ok(i as u16),
        _ => Err(format!("port {s} is out of range: use 1-65535")),
    }
}

pub(crate) fn check_syscall(s: Scalar<'_>) -> Result<String, String> {
    match s {
        Scalar::Str(name) if tartarus_runtime::process::deniable_syscall(name).is_some() => {
            Ok(name.to_string())
        }
        Scalar::Str(name) if is_known_syscall(name) => {
            let extra: Vec<&str> = tartarus_runtime::process::EXTRA_DENIABLE_SYSCALLS
                .iter()
                .map(|(n, _)| *n)
                .collect();
            Err(format!(
                "system call {s} cannot be denied by a policy (programs need it, or the runtime does not \
                 filter it); deniable beyond the built-in list: {}",
                extra.join(", ")
            ))
        }
        _ => Err(format!(
            "unknown system call {s}: use an x86_64 syscall name such as ptrace"
        )),
    }
}

/// `d` as the shortest text [`tartarus_runtime::units::parse_duration`] reads back: `1h30m`, `45s`, `250ms`.
pub fn format_duration(d: Duration) -> String {
    let millis = d.as_millis();
    if millis % 1000 != 0 || millis == 0 {
        return format!("{millis}ms");
    }
    let secs = d.as_secs();
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    let mut text = String::new();
    for (value, unit) in [(h, "h"), (m, "m"), (s, "s")] {
        if value > 0 {
            text.push_str(&format!("{value}{unit}"));
        }
    }
    text
}

/// Serialises a duration as [`format_duration`]'s text.
pub(crate) fn ser_duration<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&format_duration(*d))
}

/// Serialises an optional duration as [`format_duration`]'s text.
pub(crate) fn ser_opt_duration<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.collect_str(&format_duration(*d)),
        None => s.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_format_duration_round_trips() {
        for (secs, text) in [
            (300, "5m"),
            (5400, "1h30m"),
            (45, "45s"),
            (3601, "1h1s"),
            (86_400, "24h"),
        ] {
            let d = Duration::from_secs(secs);
            assert_eq!(format_duration(d), text);
            assert_eq!(tartarus_runtime::units::parse_duration(text).unwrap(), d);
        }
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
    }

    #[test]
    fn test_checks() {
        assert_eq!(check_port(Scalar::Int(443)), Ok(443));
        assert!(check_port(Scalar::Int(0)).is_err());
        assert!(check_port(Scalar::Int(65536)).is_err());
        assert!(check_port(Scalar::Str("80")).is_err());
        assert_eq!(check_cores(Scalar::Int(2)), Ok(2.0));
        assert!(check_cores(Scalar::Float(0.0)).is_err());
        assert!(check_cores(Scalar::Float(f64::NAN)).is_err());
        assert_eq!(check_duration(Scalar::Int(90)), Ok("90".to_string()));
        assert!(check_duration(Scalar::Str("8d")).is_err());
        assert!(check_duration(Scalar::Str("200h")).is_err());
        assert!(check_mib(Scalar::Int(-1)).is_err());
        assert!(check_count(Scalar::Int(-1)).is_err());
        assert!(check_class(Scalar::Str("flame")).is_ok());
        assert!(check_syscall(Scalar::Str("ptrac")).is_err());
    }
}
