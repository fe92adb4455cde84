//! Datasets: a deterministic selection of episodes by a small query language, written down as a manifest
//! whose bytes depend only on the query and the candidate facts (effects-v1 §13).
//!
//! The server reduces each episode to [`EpisodeFacts`] (flat fields: `tenant`, `template`, `outcome`,
//! `signal.quality.score` …); [`build_manifest`] filters them, samples with a seeded hash (no randomness,
//! no clock), optionally stratified by a field with proportional allocation, and returns a [`Manifest`].
//! The same query over the same facts gives the same bytes in any order and on any machine, so the
//! manifest's id (the raw CID of [`Manifest::to_bytes`]) names the dataset.
//!
//! A query is JSON:
//!
//! ```json
//! {"filter": {"and": [{"eq": ["tenant", "team-a"]}, {"ge": ["signal.quality.score", 5000]}]},
//!  "sample": {"seed": 42, "size": 100},
//!  "stratify": "template"}
//! ```
//!
//! Operators: `and`, `or` (non-empty lists of filters), `not` (a filter), `eq`, `ne` (`[field, value]`),
//! `lt`, `le`, `gt`, `ge` (`[field, integer]`), `in` (`[field, [values]]`), `exists` (`field`). A value is
//! an integer, a text or a boolean, and equal only to a fact of the same type. A comparison on a missing
//! field is false, `ne` included; so `{"not": {"eq": …}}` holds for an episode without the field while
//! `{"ne": …}` does not.

use std::collections::BTreeMap;
use std::fmt;

use ipld_core::ipld::Ipld;
use serde::de::Error as _;
use serde::ser::{SerializeMap, SerializeSeq};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

use crate::cid::Cid;
use crate::{canonical, EffectsError};

/// The `format` of every v1 dataset manifest.
pub const DATASET_FORMAT: &str = "tartarus-effects/v1/dataset";
/// Deepest nesting of filters accepted.
pub const MAX_FILTER_DEPTH: usize = 64;

/// The value of one fact about an episode, or a value a query compares with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum FactValue {
    /// An integer (counts, times in ms, scores).
    Int(i64),
    /// Text (names, labels).
    Text(String),
    /// A boolean.
    Bool(bool),
}

impl FactValue {
    /// The stratum this value falls in: the text itself, an integer in decimal, `true` or `false`.
    fn stratum(&self) -> String {
        match self {
            Self::Int(n) => n.to_string(),
            Self::Text(text) => text.clone(),
            Self::Bool(b) => b.to_string(),
        }
    }
}

/// What the dataset builder knows about one episode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EpisodeFacts {
    /// The episode's id.
    pub episode: Cid,
    /// Flat, named facts (`tenant`, `tool.<name>`, `signal.<name>.score` …).
    pub fields: BTreeMap<String, FactValue>,
}

/// One node of a query's filter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Filter {
    /// Every filter holds (non-empty).
    And(Vec<Filter>),
    /// At least one filter holds (non-empty).
    Or(Vec<Filter>),
    /// The filter does not hold.
    Not(Box<Filter>),
    /// The field is present, of the value's type and equal to it.
    Eq(String, FactValue),
    /// The field is present and not equal to the value (another type is not equal).
    Ne(String, FactValue),
    /// The field is an integer less than the bound.
    Lt(String, i64),
    /// The field is an integer at most the bound.
    Le(String, i64),
    /// The field is an integer greater than the bound.
    Gt(String, i64),
    /// The field is an integer at least the bound.
    Ge(String, i64),
    /// The field is present and equal to one of the values (non-empty).
    In(String, Vec<FactValue>),
    /// The field is present.
    Exists(String),
}

impl Filter {
    /// Whether an episode with these facts passes. A comparison on a missing field is false.
    pub fn matches(&self, fields: &BTreeMap<String, FactValue>) -> bool {
        let int = |field: &str| match fields.get(field) {
            Some(FactValue::Int(n)) => Some(*n),
            _ => None,
        };
        match self {
            Self::And(filters) => filters.iter().all(|f| f.matches(fields)),
            Self::Or(filters) => filters.iter().any(|f| f.matches(fields)),
            Self::Not(filter) => !filter.matches(fields),
            Self::Eq(field, value) => fields.get(field) == Some(value),
            Self::Ne(field, value) => fields.get(field).is_some_and(|fact| fact != value),
            Self::Lt(field, bound) => int(field).is_some_and(|n| n < *bound),
            Self::Le(field, bound) => int(field).is_some_and(|n| n <= *bound),
            Self::Gt(field, bound) => int(field).is_some_and(|n| n > *bound),
            Self::Ge(field, bound) => int(field).is_some_and(|n| n >= *bound),
            Self::In(field, values) => fields.get(field).is_some_and(|fact| values.contains(fact)),
            Self::Exists(field) => fields.contains_key(field),
        }
    }

    fn operator(&self) -> &'static str {
        match self {
            Self::And(_) => "and",
            Self::Or(_) => "or",
            Self::Not(_) => "not",
            Self::Eq(..) => "eq",
            Self::Ne(..) => "ne",
            Self::Lt(..) => "lt",
            Self::Le(..) => "le",
            Self::Gt(..) => "gt",
            Self::Ge(..) => "ge",
            Self::In(..) => "in",
            Self::Exists(_) => "exists",
        }
    }
}

impl Serialize for Filter {
    /// The canonical form: `{"<operator>": <arguments>}`.
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        struct Pair<'a, A: Serialize, B: Serialize>(&'a A, &'a B);
        impl<A: Serialize, B: Serialize> Serialize for Pair<'_, A, B> {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                let mut seq = serializer.serialize_seq(Some(2))?;
                seq.serialize_element(self.0)?;
                seq.serialize_element(self.1)?;
                seq.end()
            }
        }
        let mut map = serializer.serialize_map(Some(1))?;
        let op = self.operator();
        match self {
            Self::And(filters) | Self::Or(filters) => map.serialize_entry(op, filters)?,
            Self::Not(filter) => map.serialize_entry(op, filter)?,
            Self::Eq(field, value) | Self::Ne(field, value) => {
                map.serialize_entry(op, &Pair(field, value))?
            }
            Self::Lt(field, bound)
            | Self::Le(field, bound)
            | Self::Gt(field, bound)
            | Self::Ge(field, bound) => map.serialize_entry(op, &Pair(field, bound))?,
            Self::In(field, values) => map.serialize_entry(op, &Pair(field, values))?,
            Self::Exists(field) => map.serialize_entry(op, field)?,
        }
        map.end()
    }
}

/// Deterministic sampling: how many episodes, and the seed that orders them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Sample {
    /// Any 64-bit seed; another seed gives another selection.
    pub seed: u64,
    /// How many episodes to take (at least 1); fewer when fewer match.
    pub size: u64,
}

/// A parsed, validated dataset query. Serialises to its canonical form (absent parts left out).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DatasetQuery {
    /// Which episodes match; all when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub filter: Option<Filter>,
    /// How many to take and in which order; all matches when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sample: Option<Sample>,
    /// The field whose values split the matches into strata, sampled proportionally.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stratify: Option<String>,
}

impl DatasetQuery {
    /// Parses a query from JSON text; errors name the bad node's path (`filter.and[1].gt`).
    pub fn from_json(text: &str) -> Result<Self, EffectsError> {
        let value: Value =
            serde_json::from_str(text).map_err(|e| query_error("(root)", format!("not JSON: {e}")))?;
        Self::from_value(&value)
    }

    /// Parses a query from a JSON value.
    pub fn from_value(value: &Value) -> Result<Self, EffectsError> {
        let Value::Object(fields) = value else {
            return Err(query_error(
                "(root)",
                "expected an object with filter, sample or stratify",
            ));
        };
        let mut query = Self::default();
        for (key, value) in fields {
            if value.is_null() {
                continue;
            }
            match key.as_str() {
                "filter" => query.filter = Some(parse_filter(value, "filter", 1)?),
                "sample" => query.sample = Some(parse_sample(value)?),
                "stratify" => query.stratify = Some(field_name(value, "stratify", "expected a field name")?),
                _ => {
                    return Err(query_error(
                        key,
                        "unknown field; a query has filter, sample and stratify",
                    ))
                }
            }
        }
        Ok(query)
    }

    /// The canonical form as an IPLD value, as the manifest records it.
    pub fn to_ipld(&self) -> Result<Ipld, EffectsError> {
        canonical::decode(&canonical::encode(self)?)
    }
}

impl<'de> Deserialize<'de> for DatasetQuery {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = Value::deserialize(deserializer)?;
        Self::from_value(&value).map_err(D::Error::custom)
    }
}

fn parse_filter(value: &Value, path: &str, depth: usize) -> Result<Filter, EffectsError> {
    const OPERATORS: &str = "and, or, not, eq, ne, lt, le, gt, ge, in, exists";
    if depth > MAX_FILTER_DEPTH {
        return Err(query_error(
            path,
            format!("filters nested deeper than {MAX_FILTER_DEPTH}"),
        ));
    }
    let entry = match value {
        Value::Object(map) if map.len() == 1 => map.iter().next(),
        _ => None,
    };
    let Some((op, args)) = entry else {
        return Err(query_error(
            path,
            format!("expected an object with one operator ({OPERATORS})"),
        ));
    };
    let here = format!("{path}.{op}");
    let list = |filters: &Value| -> Result<Vec<Filter>, EffectsError> {
        match filters {
            Value::Array(items) if !items.is_empty() => items
                .iter()
                .enumerate()
                .map(|(i, item)| parse_filter(item, &format!("{here}[{i}]"), depth + 1))
                .collect(),
            _ => Err(query_error(&here, "expected a non-empty list of filters")),
        }
    };
    let pair = |expected: &str| -> Result<(String, &Value), EffectsError> {
        match args {
            Value::Array(items) if items.len() == 2 => {
                Ok((field_name(&items[0], &here, expected)?, &items[1]))
            }
            _ => Err(query_error(&here, expected)),
        }
    };
    Ok(match op.as_str() {
        "and" => Filter::And(list(args)?),
        "or" => Filter::Or(list(args)?),
        "not" => Filter::Not(Box::new(parse_filter(args, &here, depth + 1)?)),
        "eq" | "ne" => {
            const EXPECTED: &str = "expected [field, integer, text or boolean]";
            let (field, value) = pair(EXPECTED)?;
            let value = fact_value(value).ok_or_else(|| query_error(&here, EXPECTED))?;
            if op == "eq" {
                Filter::Eq(field, value)
            } else {
                Filter::Ne(field, value)
            }
        }
        "lt" | "le" | "gt" | "ge" => {
            const EXPECTED: &str = "expected [field, integer]";
            let (field, bound) = pair(EXPECTED)?;
            let bound = bound.as_i64().ok_or_else(|| query_error(&here, EXPECTED))?;
            match op.as_str() {
                "lt" => Filter::Lt(field, bound),
                "le" => Filter::Le(field, bound),
                "gt" => Filter::Gt(field, bound),
                _ => Filter::Ge(field, bound),
            }
        }
        "in" => {
            const EXPECTED: &str = "expected [field, [integer, text or boolean, …]] with at least one value";
            let (field, values) = pair(EXPECTED)?;
            let values: Option<Vec<FactValue>> = match values {
                Value::Array(items) if !items.is_empty() => items.iter().map(fact_value).collect(),
                _ => None,
            };
            Filter::In(field, values.ok_or_else(|| query_error(&here, EXPECTED))?)
        }
        "exists" => Filter::Exists(field_name(args, &here, "expected a field name")?),
        other => {
            return Err(query_error(
                path,
                format!("unknown operator {other:?}; use one of {OPERATORS}"),
            ))
        }
    })
}

fn parse_sample(value: &Value) -> Result<Sample, EffectsError> {
    let Value::Object(fields) = value else {
        return Err(query_error(
            "sample",
            "expected {\"seed\": integer, \"size\": integer}",
        ));
    };
    if let Some(key) = fields.keys().find(|key| *key != "seed" && *key != "size") {
        return Err(query_error(
            &format!("sample.{key}"),
            "unknown field; a sample has seed and size",
        ));
    }
    let number = |fields: &Map<String, Value>, key: &str| {
        fields
            .get(key)
            .and_then(Value::as_u64)
            .ok_or_else(|| query_error(&format!("sample.{key}"), "expected an integer from 0 to 2^64 - 1"))
    };
    let sample = Sample {
        seed: number(fields, "seed")?,
        size: number(fields, "size")?,
    };
    if sample.size == 0 {
        return Err(query_error("sample.size", "must be at least 1"));
    }
    Ok(sample)
}

fn field_name(value: &Value, path: &str, expected: &str) -> Result<String, EffectsError> {
    match value {
        Value::String(name) if !name.is_empty() => Ok(name.clone()),
        _ => Err(query_error(path, expected)),
    }
}

/// An integer (fitting i64), a text or a boolean; anything else (floats included) is not a value.
fn fact_value(value: &Value) -> Option<FactValue> {
    match value {
        Value::Number(n) => n.as_i64().map(FactValue::Int),
        Value::String(text) => Some(FactValue::Text(text.clone())),
        Value::Bool(b) => Some(FactValue::Bool(*b)),
        _ => None,
    }
}

fn query_error(path: &str, reason: impl Into<String>) -> EffectsError {
    EffectsError::InvalidQuery {
        path: path.to_string(),
        reason: reason.into(),
    }
}

/// A dataset: the query, how many episodes matched and which were taken.
///
/// Stored as the canonical bytes of [`Manifest::to_bytes`]; the dataset's id is the raw CID of them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// [`DATASET_FORMAT`].
    pub format: String,
    /// The query in canonical form ([`DatasetQuery::to_ipld`]).
    pub query: Ipld,
    /// How many candidates passed the filter.
    pub matched: u64,
    /// The episodes taken: by stratum (in stratum order), then by sampling key.
    pub episodes: Vec<Cid>,
    /// Stratum → episodes taken from it, every stratum with a match included; empty without `stratify`.
    pub strata: BTreeMap<String, u64>,
}

impl Manifest {
    /// The canonical bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>, EffectsError> {
        canonical::encode(self)
    }

    /// The dataset's id: the raw CID of [`Manifest::to_bytes`] (the bytes are stored as a blob).
    pub fn id(&self) -> Result<Cid, EffectsError> {
        Ok(Cid::of_bytes(&self.to_bytes()?))
    }

    /// Reads canonical manifest bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, EffectsError> {
        let manifest: Self = canonical::decode(bytes)?;
        if manifest.format != DATASET_FORMAT {
            return Err(EffectsError::InvalidObject {
                what: "dataset manifest",
                reason: format!("format is {:?}, expected {DATASET_FORMAT:?}", manifest.format),
            });
        }
        Ok(manifest)
    }
}

impl fmt::Display for Manifest {
    /// `N of M episodes`, for logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} of {} matching episodes", self.episodes.len(), self.matched)
    }
}

/// One matching episode with its sampling key.
struct Candidate<'a> {
    key: [u8; 32],
    id: Vec<u8>,
    facts: &'a EpisodeFacts,
}

/// Selects episodes from `candidates` by `query` (effects-v1 §13.3).
///
/// 1. Keep the candidates the filter matches (all without a filter).
/// 2. Give each a key: BLAKE3 of the seed (8 bytes, little-endian) followed by the episode's binary CID,
///    or without `sample` the binary CID itself; order by key, then binary CID.
/// 3. Without `stratify`, take the first `size` (all without `sample`). With it, group by the field's
///    stratum (text as is, integers in decimal, `true`/`false`, missing: `""`), strata in byte order of
///    their names, allocate `size` by the largest-remainder method (ties to the earlier stratum) and take
///    each stratum's share in key order.
///
/// The result depends neither on the order of `candidates` nor on time or randomness. Refuses two
/// candidates with the same episode id.
pub fn build_manifest(query: &DatasetQuery, candidates: &[EpisodeFacts]) -> Result<Manifest, EffectsError> {
    let mut by_id: BTreeMap<&Cid, &EpisodeFacts> = BTreeMap::new();
    for facts in candidates {
        if by_id.insert(&facts.episode, facts).is_some() {
            return Err(EffectsError::InvalidObject {
                what: "dataset candidates",
                reason: format!("episode {} appears more than once", facts.episode),
            });
        }
    }
    let mut matched: Vec<Candidate<'_>> = by_id
        .into_values()
        .filter(|facts| {
            query
                .filter
                .as_ref()
                .is_none_or(|filter| filter.matches(&facts.fields))
        })
        .map(|facts| {
            let id = facts.episode.to_bytes();
            let key = match &query.sample {
                Some(sample) => *blake3::Hasher::new()
                    .update(&sample.seed.to_le_bytes())
                    .update(&id)
                    .finalize()
                    .as_bytes(),
                None => [0; 32],
            };
            Candidate { key, id, facts }
        })
        .collect();
    matched.sort_by(|a, b| a.key.cmp(&b.key).then_with(|| a.id.cmp(&b.id)));
    let total = matched.len() as u64;
    let size = query.sample.map_or(total, |sample| sample.size.min(total));

    let mut episodes = Vec::new();
    let mut strata = BTreeMap::new();
    match &query.stratify {
        None => episodes.extend(matched.iter().take(to_usize(size)).map(|c| c.facts.episode)),
        Some(field) => {
            let mut groups: BTreeMap<String, Vec<&Candidate<'_>>> = BTreeMap::new();
            for candidate in &matched {
                let stratum = candidate
                    .facts
                    .fields
                    .get(field)
                    .map(FactValue::stratum)
                    .unwrap_or_default();
                groups.entry(stratum).or_default().push(candidate);
            }
            let counts: Vec<u64> = groups.values().map(|group| group.len() as u64).collect();
            let shares = largest_remainder(&counts, size);
            for ((stratum, group), share) in groups.iter().zip(shares) {
                episodes.extend(group.iter().take(to_usize(share)).map(|c| c.facts.episode));
                strata.insert(stratum.clone(), share);
            }
        }
    }
    Ok(Manifest {
        format: DATASET_FORMAT.to_string(),
        query: query.to_ipld()?,
        matched: total,
        episodes,
        strata,
    })
}

/// Splits `size` (at most the sum of `counts`) over strata of these sizes in proportion: each gets
/// ⌊size·count/total⌋, and the rest go one each to the strata with the largest remainders
/// (size·count mod total), the earlier stratum first on a tie.
fn largest_remainder(counts: &[u64], size: u64) -> Vec<u64> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return vec![0; counts.len()];
    }
    let (size_wide, total_wide) = (u128::from(size), u128::from(total));
    let mut shares: Vec<u64> = Vec::with_capacity(counts.len());
    let mut remainders: Vec<(u128, usize)> = Vec::with_capacity(counts.len());
    for (index, &count) in counts.iter().enumerate() {
        let product = size_wide * u128::from(count);
        // The quotient is at most `count`, so it fits a u64.
        shares.push(u64::try_from(product / total_wide).unwrap_or(count));
        remainders.push((product % total_wide, index));
    }
    let left = size.saturating_sub(shares.iter().sum());
    // Largest remainder first; on equal remainders the earlier stratum.
    remainders.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    for &(_, index) in remainders.iter().take(to_usize(left)) {
        shares[index] += 1;
    }
    shares
}

fn to_usize(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_largest_remainder_is_proportional_and_sums_to_size() {
        assert_eq!(largest_remainder(&[50, 30, 20], 10), vec![5, 3, 2]);
        // 7·(5,3,2)/10 = 3.5, 2.1, 1.4 → 3, 2, 1 and one more to the largest remainder (.5)
        assert_eq!(largest_remainder(&[5, 3, 2], 7), vec![4, 2, 1]);
        // equal remainders: the earlier stratum wins
        assert_eq!(largest_remainder(&[1, 1, 1], 2), vec![1, 1, 0]);
        assert_eq!(largest_remainder(&[3, 1], 4), vec![3, 1]);
        assert_eq!(largest_remainder(&[], 0), Vec::<u64>::new());
        for size in 0..=20 {
            let shares = largest_remainder(&[7, 1, 9, 3], size);
            assert_eq!(shares.iter().sum::<u64>(), size);
            assert!(shares.iter().zip([7, 1, 9, 3]).all(|(s, c)| *s <= c));
        }
    }
}
