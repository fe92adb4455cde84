//! Canonical encoding: deterministic DAG-CBOR without floats, and a decoder that accepts only the bytes
//! the encoder would have written.
//!
//! One value has exactly one byte string and one byte string decodes to at most one value, so a content id
//! ([`crate::Cid`]) or a signature over the bytes is a statement about the value.

use std::convert::Infallible;

use ipld_core::ipld::Ipld;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::EffectsError;

/// Encodes `value` as canonical DAG-CBOR (effects-v1 §2).
///
/// Map keys (struct fields included) are sorted by length then bytewise, integers and lengths take their
/// shortest form, lengths are always definite. Floats are refused ([`EffectsError::Float`]): a v1 object
/// carries integers (milliseconds, bytes, basis points) so that no two implementations can disagree about
/// rounding.
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, EffectsError> {
    let bytes = serde_ipld_dagcbor::to_vec(value).map_err(|e| EffectsError::Encode(e.to_string()))?;
    // The serializer writes f64 for any float; the generic tree is the simplest place to find one.
    check_no_floats(&decode_ipld(&bytes)?)?;
    Ok(bytes)
}

/// Decodes canonical DAG-CBOR into `T`, refusing anything [`encode`] would not have written.
///
/// Checks, in order: the bytes are one strict DAG-CBOR item (definite lengths, minimal integers, sorted
/// unique keys, nothing after it, nothing missing); it holds no float; it has the shape of `T`; and
/// encoding the decoded `T` gives back exactly `bytes`. The last check rejects fields `T` does not model:
/// they would be silently dropped and the object's id would no longer match its bytes. That check is why
/// `T` must also be `Serialize`.
pub fn decode<T: DeserializeOwned + Serialize>(bytes: &[u8]) -> Result<T, EffectsError> {
    check_no_floats(&decode_ipld(bytes)?)?;
    let value: T = serde_ipld_dagcbor::from_slice(bytes).map_err(decode_error)?;
    let again = encode(&value)?;
    if again != bytes {
        return Err(EffectsError::NotCanonical(
            "re-encoding the decoded value gives different bytes (a field the type does not model?)".into(),
        ));
    }
    Ok(value)
}

/// Checks that `bytes` are one canonical DAG-CBOR object of any shape, as [`decode`] would.
pub fn validate(bytes: &[u8]) -> Result<(), EffectsError> {
    decode::<Ipld>(bytes).map(drop)
}

/// Strictly decodes one DAG-CBOR item into the generic tree.
fn decode_ipld(bytes: &[u8]) -> Result<Ipld, EffectsError> {
    serde_ipld_dagcbor::from_slice(bytes).map_err(decode_error)
}

fn check_no_floats(value: &Ipld) -> Result<(), EffectsError> {
    match value {
        Ipld::Float(_) => Err(EffectsError::Float),
        Ipld::List(items) => items.iter().try_for_each(check_no_floats),
        Ipld::Map(entries) => entries.values().try_for_each(check_no_floats),
        Ipld::Null | Ipld::Bool(_) | Ipld::Integer(_) | Ipld::String(_) | Ipld::Bytes(_) | Ipld::Link(_) => {
            Ok(())
        }
    }
}

fn decode_error(err: serde_ipld_dagcbor::DecodeError<Infallible>) -> EffectsError {
    use serde_ipld_dagcbor::DecodeError as D;
    match err {
        D::Eof { name, expect } => EffectsError::Truncated(format!("reading {name}, expected {expect:?}")),
        D::TrailingData => EffectsError::TrailingBytes,
        D::IndefiniteSize => EffectsError::IndefiniteLength,
        D::NonMinimal { name, found } => EffectsError::NonMinimal {
            what: name,
            head: found,
        },
        D::UnorderedKey => EffectsError::UnsortedKeys,
        D::Msg(message) => EffectsError::Malformed(message),
        other => EffectsError::Malformed(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde::Deserialize;

    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Forward {
        alpha: u64,
        b: String,
        list: Vec<i64>,
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Reordered {
        list: Vec<i64>,
        b: String,
        alpha: u64,
    }

    fn sample() -> Forward {
        Forward {
            alpha: 300,
            b: "x".into(),
            list: vec![-1, 24, 0],
        }
    }

    /// Every strict-decoder rejection is checked twice: through [`decode`] and straight through
    /// serde_ipld_dagcbor, to prove the library (not only our re-encode check) rejects it.
    fn assert_rejected(bytes: &[u8], kind: &str) {
        let ours = decode::<Ipld>(bytes).expect_err("decode accepted non-canonical input");
        assert_eq!(ours.kind(), kind, "{ours}");
        let library = serde_ipld_dagcbor::from_slice::<Ipld>(bytes);
        assert!(
            library.is_err(),
            "serde_ipld_dagcbor accepted {}",
            hex::encode(bytes)
        );
    }

    #[test]
    fn test_encode_sorts_keys_by_length_then_bytes() {
        let bytes = encode(&sample()).unwrap();
        // {"b": "x", "list": [-1, 24, 0], "alpha": 300}
        assert_eq!(
            hex::encode(&bytes),
            "a361626178646c697374832018180065616c706861 19012c".replace(' ', "")
        );
    }

    #[test]
    fn test_encode_is_stable_under_field_reorder() {
        let forward = encode(&sample()).unwrap();
        let reordered = encode(&Reordered {
            list: vec![-1, 24, 0],
            b: "x".into(),
            alpha: 300,
        })
        .unwrap();
        let json: serde_json::Value = serde_json::json!({"list": [-1, 24, 0], "alpha": 300, "b": "x"});
        let mut map = BTreeMap::new();
        map.insert("list", serde_json::json!([-1, 24, 0]));
        map.insert("alpha", serde_json::json!(300));
        map.insert("b", serde_json::json!("x"));
        assert_eq!(forward, reordered);
        assert_eq!(forward, encode(&json).unwrap());
        assert_eq!(forward, encode(&map).unwrap());
    }

    #[test]
    fn test_decode_round_trips_and_reads_across_field_order() {
        let bytes = encode(&sample()).unwrap();
        assert_eq!(decode::<Forward>(&bytes).unwrap(), sample());
        assert_eq!(decode::<Reordered>(&bytes).unwrap().alpha, 300);
    }

    #[test]
    fn test_encode_uses_shortest_integers() {
        for (value, expected) in [
            (0u64, "00"),
            (23, "17"),
            (24, "1818"),
            (255, "18ff"),
            (256, "190100"),
            (65536, "1a00010000"),
            (u64::MAX, "1bffffffffffffffff"),
        ] {
            assert_eq!(hex::encode(encode(&value).unwrap()), expected, "{value}");
        }
        assert_eq!(hex::encode(encode(&-1i64).unwrap()), "20");
        assert_eq!(hex::encode(encode(&-25i64).unwrap()), "3818");
    }

    #[test]
    fn test_encode_refuses_floats_anywhere() {
        assert_eq!(encode(&1.5f64).unwrap_err().kind(), "float");
        assert_eq!(
            encode(&serde_json::json!({"a": [1, {"b": 0.25}]}))
                .unwrap_err()
                .kind(),
            "float"
        );
    }

    #[test]
    fn test_decode_refuses_floats() {
        // 1.5 as a DAG-CBOR f64: canonical DAG-CBOR, but not an effects-v1 object.
        let bytes = hex::decode("fb3ff8000000000000").unwrap();
        assert!(serde_ipld_dagcbor::from_slice::<f64>(&bytes).is_ok());
        assert_eq!(decode::<Ipld>(&bytes).unwrap_err().kind(), "float");
    }

    #[test]
    fn test_decode_rejects_unsorted_keys() {
        // {"b": 1, "a": 2}
        assert_rejected(&hex::decode("a2616201616102").unwrap(), "unsorted_keys");
        // {"aa": 1, "b": 2}: bytewise order, but DAG-CBOR puts shorter keys first
        assert_rejected(&hex::decode("a262616101616202").unwrap(), "unsorted_keys");
    }

    #[test]
    fn test_decode_rejects_duplicate_keys() {
        assert_rejected(&hex::decode("a2616101616102").unwrap(), "unsorted_keys");
    }

    #[test]
    fn test_decode_rejects_non_minimal_integers_and_lengths() {
        assert_rejected(&hex::decode("1817").unwrap(), "non_minimal"); // 23 in two bytes
        assert_rejected(&hex::decode("190017").unwrap(), "non_minimal");
        assert_rejected(&hex::decode("1a0000ffff").unwrap(), "non_minimal");
        assert_rejected(&hex::decode("3817").unwrap(), "non_minimal"); // -24 in two bytes
        assert_rejected(&hex::decode("780161").unwrap(), "non_minimal"); // "a" with a 1-byte length
        assert_rejected(
            &hex::decode("a1780161 01".replace(' ', "")).unwrap(),
            "non_minimal",
        ); // key length
        assert_rejected(&hex::decode("980100").unwrap(), "non_minimal"); // array length
    }

    #[test]
    fn test_decode_rejects_indefinite_lengths() {
        assert_rejected(&hex::decode("9f01ff").unwrap(), "indefinite_length");
        assert_rejected(&hex::decode("bf616101ff").unwrap(), "indefinite_length");
        assert_rejected(&hex::decode("7f6161ff").unwrap(), "indefinite_length");
    }

    #[test]
    fn test_decode_rejects_trailing_bytes() {
        assert_rejected(&hex::decode("0100").unwrap(), "trailing_bytes");
    }

    #[test]
    fn test_decode_rejects_every_truncation() {
        let bytes = encode(&sample()).unwrap();
        for len in 0..bytes.len() {
            let err = decode::<Ipld>(&bytes[..len]).expect_err("truncated input accepted");
            assert_eq!(err.kind(), "truncated", "at {len}: {err}");
        }
    }

    #[test]
    fn test_decode_rejects_fields_the_type_does_not_model() {
        #[derive(Debug, Serialize, Deserialize)]
        struct Narrow {
            b: String,
        }
        let bytes = encode(&sample()).unwrap();
        assert_eq!(decode::<Narrow>(&bytes).unwrap_err().kind(), "not_canonical");
    }

    #[test]
    fn test_decode_reports_wrong_shape_as_malformed() {
        let bytes = encode(&"text").unwrap();
        assert_eq!(decode::<Forward>(&bytes).unwrap_err().kind(), "malformed");
    }

    #[test]
    fn test_decode_rejects_non_dag_cbor_tags_and_undefined() {
        assert!(decode::<Ipld>(&hex::decode("c100").unwrap()).is_err()); // tag 1
        assert!(decode::<Ipld>(&hex::decode("f7").unwrap()).is_err()); // undefined
    }

    #[test]
    fn test_encode_refuses_non_string_map_keys() {
        let map: BTreeMap<u32, u32> = [(1, 2)].into();
        assert_eq!(encode(&map).unwrap_err().kind(), "encode");
    }

    #[test]
    fn test_validate_accepts_canonical_bytes() {
        validate(&encode(&sample()).unwrap()).unwrap();
    }
}
